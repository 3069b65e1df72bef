"""The denoise step's PyTorch side: the learned denoiser's graph (`denoise.fp32`, STARFlow-V), and
the self-denoise's reference gradient with the shapes its runtime chain is checked at.

The self-denoise has no graph of its own: the runtime takes the gradient of each sample's NLL
through the blocks' forward and vjp graphs (`starflow.core.sampler.nll_gradient`) and applies one
Tweedie step `x - noise_std^2 * grad`; `starflow.export.validate` checks that chain against
`reference_gradient`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from starflow.contract.manifest import Comparison, Denoise, Manifest, TensorSpec, Tolerance
from starflow.core.sampler import patchify, unpatchify
from starflow.export.graphs import ComponentGraph, GraphSpec
from starflow.export.validate import TOLERANCES, compare
from starflow.model.flow import LEARNED_DENOISER_STEP, StarFlow

TOLERANCE = Tolerance(atol=0.0, rtol=1e-4)  # relative to max|grad| of the case


def _cases(
    shapes: list[tuple[tuple[int, ...], int]],
    conditioned: bool,
    text_dim: int,
    seed: int,
    name: Callable[[Tensor, int], str],
) -> dict[str, dict[str, np.ndarray]]:
    """Validation feeds: x of each shape, and text of its length when `conditioned`, by name."""
    generator = torch.Generator().manual_seed(seed)
    cases = {}
    for shape, length in shapes:
        x = torch.randn(*shape, generator=generator)
        feeds = {"x": x.numpy()}
        if conditioned:
            feeds["text"] = torch.randn(shape[0], length, text_dim, generator=generator).numpy()
        cases[name(x, length if conditioned else 0)] = feeds
    return cases


def _tensors(feeds: dict[str, np.ndarray]) -> tuple[Tensor, Tensor | None]:
    """(x, text or None) of a case's feeds."""
    text = feeds.get("text")
    return torch.from_numpy(feeds["x"]), None if text is None else torch.from_numpy(text)


def validate_gradient(
    directory: Path, model: StarFlow, manifest: Manifest, seed: int = 0
) -> list[Comparison]:
    """The runtime's self-denoise gradient (the blocks' fp32 forward and vjp graphs in `directory`,
    chained by `Pipeline.nll_gradient`) against PyTorch's whole-model autograd, at the training
    latent and a narrower one, at two text lengths."""
    from starflow.runtime.pipeline import Pipeline, graph_blocks

    pipeline = Pipeline(directory, manifest, graph_blocks(directory, manifest, "fp32"), "fp32")
    config, latent = model.config, manifest.latent
    longest = manifest.text.max_length if manifest.text else 0
    shapes = [  # the training latent, and one of the narrowest height
        ((1, config.channel_size, *latent.train), longest),
        ((2, config.channel_size, latent.min[0], latent.train[1]), max(1, longest // 2)),
    ]
    cases = _cases(
        shapes,
        model.text_dim > 0,
        config.txt_dim,
        seed,
        lambda x, length: f"batch {x.size(0)}, latent {x.size(2)}x{x.size(3)}, text {length}",
    )
    results = []
    for case, feeds in cases.items():
        expected = reference_gradient(model, *_tensors(feeds)).numpy()
        actual = pipeline.nll_gradient(feeds["x"], feeds.get("text"))
        results.append(compare("denoise nll-gradient", case, "grad", actual, expected, TOLERANCE))
    return results


def reference_gradient(model: StarFlow, x: Tensor, text: Tensor | None) -> Tensor:
    """The model's own gradient, as `StarFlow.denoise` takes it: numel * grad of the mean loss."""
    with torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(model.loss(model(x, text)), [x])
    return (x.numel() * grad).detach()


# ---- the learned denoiser (STARFlow-V) ------------------------------------------------------------
LEARNED_CASES = ((1, 1, (3, 2), 2), (2, 3, (2, 3), 4))  # (batch, frames, grid in tokens, text length)
VALIDATION = TOLERANCES["fp32"]  # a plain forward, like the block graphs


class LearnedCorrection(nn.Module):
    """Clips x (B, F, C, H, W) [, text (B, L, txt_dim)] -> the learned denoiser's correction
    (B, F, C, H, W); the runtime applies x - step * correction (`StarFlow.learned_denoise_step`)."""

    def __init__(self, model: StarFlow):
        super().__init__()
        self.patch_size = model.config.patch_size
        self.denoiser = model.learnable_self_denoiser

    def forward(self, x: Tensor, text: Tensor | None = None) -> Tensor:
        p = self.patch_size
        frames, h, w = x.size(1), x.size(3) // p, x.size(4) // p
        grid = torch.stack([torch.full((), h, dtype=torch.int64), torch.full((), w, dtype=torch.int64)])
        out = self.denoiser(patchify(x, p), text if self.denoiser.text_conditioned else None, grid)
        # written into an x-shaped tensor, so the output keeps x's symbolic height and width
        # (unpatchify alone gives p*(height//p))
        correction = torch.zeros_like(x)
        correction[:, :, :, : h * p, : w * p] = unpatchify(out, p, h, w, frames)
        return correction


def learned_spec(model: StarFlow) -> GraphSpec:
    """Inputs x (batch, frames, C, height, width) and text when the denoiser is conditioned."""
    config = model.config
    clip = ("batch", "frames", config.channel_size, "height", "width")
    inputs = (TensorSpec("x", "float32", clip),)
    if model.learnable_self_denoiser.text_conditioned:
        inputs += (TensorSpec("text", "float32", ("batch", "text", config.txt_dim)),)
    return GraphSpec(None, "denoise", "fp32", inputs, (TensorSpec("correction", "float32", clip),))


def learned_graph(model: StarFlow, seed: int = 0) -> ComponentGraph:
    """The learned denoiser's graph, checked against the PyTorch denoiser at two frame counts."""
    spec, config, p = learned_spec(model), model.config, model.config.patch_size
    conditioned = len(spec.inputs) == 2
    shapes = [
        ((batch, frames, config.channel_size, h * p, w * p), length)
        for batch, frames, (h, w), length in LEARNED_CASES
    ]
    example = (torch.randn(2, 5, config.channel_size, 3 * p, 4 * p),)  # every symbolic dim >= 2, distinct
    if conditioned:
        example += (torch.randn(2, 6, config.txt_dim),)
    module = LearnedCorrection(model).eval()

    @torch.no_grad()
    def reference(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"correction": module(*_tensors(feeds)).numpy()}

    return ComponentGraph(
        spec=spec,
        module=module,
        example=example,
        cases=_cases(
            shapes,
            conditioned,
            config.txt_dim,
            seed,
            lambda x, length: (
                f"batch {x.size(0)}, {x.size(1)} frames of {x.size(3)}x{x.size(4)}, text {length}"
            ),
        ),  # fmt: skip
        reference=reference,
        tolerance=VALIDATION,
        entry=Denoise("learned", spec.name, config.noise_std, LEARNED_DENOISER_STEP, config.denoiser_window),
    )
