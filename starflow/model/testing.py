"""Random but non-trivial models for tests, benchmarks and the quickstart.

The official initialisation zeroes `proj_out`, which makes every block the identity and lets
Jacobi converge at once. Like the shared fixtures, we perturb every parameter instead.
"""

from __future__ import annotations

import torch

from starflow.core.config import StarFlowConfig
from starflow.model.flow import StarFlow


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int = 0, std: float = 0.05, proj_out_std: float = 0.02) -> None:
    """Add N(0, std) noise to every parameter (N(0, proj_out_std) to `proj_out`), in place."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        scale = proj_out_std if ".proj_out." in name else std
        noise = torch.randn(param.shape, generator=generator) * scale
        param.add_(noise.to(param.device, param.dtype))


def random_model(config: StarFlowConfig, seed: int = 0) -> StarFlow:
    """A seeded, perturbed, eval-mode model of the given config."""
    torch.manual_seed(seed)
    model = StarFlow(config)
    perturb_(model, seed)
    return model.eval()
