"""The `denoise.fp32` graph: the gradient of each sample's total NLL, for the self-denoise step,
or, for models with one (STARFlow-V), the learned denoiser's correction.

The runtime applies one Tweedie step `x - noise_std^2 * grad` to the sampled latent; the graph
holds the teacher-forced forward *and* backward pass through every flow block, so it is exported
as an autograd graph (`starflow.export.trace.export_module`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from starflow.contract.manifest import Denoise, TensorSpec, Tolerance
from starflow.core.sampler import patchify, unpatchify
from starflow.export.graphs import ComponentGraph, GraphSpec
from starflow.export.validate import TOLERANCES
from starflow.model.flow import LEARNED_DENOISER_STEP, StarFlow

TOLERANCE = Tolerance(atol=0.0, rtol=1e-4)  # relative to max|grad| of the case
# (batch, latent grid in tokens, text length) checked after export; none is the trace example.
CASES = ((1, (4, 4), 3), (2, (2, 3), 5))


class NLLGradient(nn.Module):
    """x (B, C, H, W) [, text (B, L, txt_dim)] -> d(each sample's total NLL)/dx, (B, C, H, W).

    NLL of a sample = 0.5*sum(z^2) - sum of every block's logdet: the per-sample sum behind the
    model's per-dim mean loss, so its gradient is `numel * grad(loss)` as in `StarFlow.denoise`.
    The blocks run their own `forward`, with RoPE positions from a grid of the symbolic sizes.
    """

    def __init__(self, model: StarFlow):
        super().__init__()
        self.patch_size = model.config.patch_size
        self.flows = nn.ModuleList(model.sampling_blocks()[::-1])  # forward order

    def forward(self, x: Tensor, text: Tensor | None = None) -> Tensor:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.nll(x, text).sum(), [x])
        return grad

    def nll(self, x: Tensor, text: Tensor | None) -> Tensor:
        """(B,) total NLL of each sample."""
        p = self.patch_size
        seq = patchify(x, p)  # (B, T, D) raster order
        h, w = x.size(2) // p, x.size(3) // p
        grid = torch.stack([torch.full((), h, dtype=torch.int64), torch.full((), w, dtype=torch.int64)])
        logdets = []
        for block in self.flows:
            seq, logdet = block(seq, text if block.text_conditioned else None, grid)
            logdets.append(logdet.sum(dim=(1, 2)))
        return 0.5 * seq.pow(2).sum(dim=(1, 2)) - sum(logdets)


def _has_text(model: StarFlow) -> bool:
    return any(b.text_conditioned for b in model.blocks)


def denoise_spec(model: StarFlow) -> GraphSpec:
    """Inputs x (and text on text-conditioned models), output grad; dims batch/height/width/text."""
    C, config = model.config.channel_size, model.config
    latent = ("batch", C, "height", "width")
    inputs = (TensorSpec("x", "float32", latent),)
    if _has_text(model):
        inputs += (TensorSpec("text", "float32", ("batch", "text", config.txt_dim)),)
    return GraphSpec(None, "denoise", "fp32", inputs, (TensorSpec("grad", "float32", latent),))


def denoise_graph(model: StarFlow, seed: int = 0) -> ComponentGraph:
    """The model's denoise graph: its learned denoiser's, or else the NLL gradient's."""
    if model.learnable_self_denoiser is not None:
        return learned_graph(model, seed)
    config, p, spec = model.config, model.config.patch_size, denoise_spec(model)
    shapes = [((batch, config.channel_size, h * p, w * p), length) for batch, (h, w), length in CASES]
    x = torch.randn(2, config.channel_size, 3 * p, 5 * p)  # every symbolic dim >= 2 and distinct
    return ComponentGraph(
        spec=spec,
        module=NLLGradient(model).eval(),
        example=(x, torch.randn(2, 4, config.txt_dim)) if _has_text(model) else (x,),
        cases=_cases(
            shapes,
            _has_text(model),
            config.txt_dim,
            seed,
            lambda x, length: f"batch {x.size(0)}, latent {x.size(2)}x{x.size(3)}, text {length}",
        ),  # fmt: skip
        reference=lambda feeds: {"grad": reference_gradient(model, *_tensors(feeds)).numpy()},
        tolerance=TOLERANCE,
        entry=Denoise("nll-gradient", spec.name, config.noise_std),
        autograd=True,
    )


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
