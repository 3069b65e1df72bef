"""The bottom layer, torch-free: errors, atomic files and limits, the model config, the sampler
(the one sampling algorithm), sampling presets, outputs, latent sizes and the generation loop."""
