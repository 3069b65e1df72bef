"""The PyTorch side (needs torch): the reference model, its checkpoints, text encoders, the SD-VAE,
and `ReferenceGenerator`, the prompts-to-images loop over these modules."""
