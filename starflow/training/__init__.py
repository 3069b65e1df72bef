"""Training (FSDP2) and its data: image folders, latent shards, the embedded digits and moving digits."""
