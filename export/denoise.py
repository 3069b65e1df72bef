"""The `denoise.fp32` graph: the gradient of each sample's total NLL, for the self-denoise step,
or, for models with one (STARFlow-V), the learned denoiser's correction.

The runtime applies one Tweedie step `x - noise_std^2 * grad` to the sampled latent; the graph
holds the teacher-forced forward *and* backward pass through every flow block.

torch 2.13 cannot export `torch.autograd.grad` directly with symbolic shapes: non-strict export
fails inside the autograd engine (an n-ary SymInt product it cannot rebuild, `batch*h*w`), and
strict export refuses it unless `trace_autograd_ops` is set, and then turns saved activations
into constants. So the joint graph is traced first with `make_fx` over fake inputs whose batch,
height, width (and text length) are symbolic; the result is plain ATen ops, backward included,
and exports like any other module through `export_module`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch._dynamo
from torch import Tensor, fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from starflow.contract.manifest import Comparison, TensorSpec, Tolerance
from starflow.core.errors import StarflowError
from starflow.core.sampler import patchify, unpatchify
from starflow.export.exporter import DEFAULT_OPSET, dynamic_shapes_of, export_module
from starflow.export.graphs import GraphSpec
from starflow.export.validate import TOLERANCES, check_results, compare
from starflow.model.flow import StarFlow
from starflow.runtime.backends import OrtRunner

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


def _example_args(model: StarFlow) -> tuple[Tensor, ...]:
    """Every symbolic dim >= 2 and distinct (batch 2, grid 3x5 tokens, text 4)."""
    config = model.config
    p = config.patch_size
    x = torch.randn(2, config.channel_size, 3 * p, 5 * p)
    return (x, torch.randn(2, 4, config.txt_dim)) if _has_text(model) else (x,)


def trace_joint(
    module: nn.Module, args: tuple[Tensor, ...], dynamic_shapes: tuple[dict[int, Any] | None, ...]
) -> fx.GraphModule:
    """`module` traced to ATen ops (autograd included); the axes in `dynamic_shapes` stay symbolic.

    Parameters stay real tensors; make_fx records them as parameters of the returned module,
    so the exporter sees (and externalises) them like any other weights.
    """
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    fakes = []
    for arg, axes in zip(args, dynamic_shapes, strict=True):
        sizes = [DimDynamic.DYNAMIC if i in (axes or {}) else DimDynamic.STATIC for i in range(arg.dim())]
        fakes.append(mode.from_tensor(arg, symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes)))
    with mode:
        graph = make_fx(module, tracing_mode="real")(*fakes)
    return graph.eval()


def export_denoise(model: StarFlow, path: Path, opset: int = DEFAULT_OPSET) -> GraphSpec:
    """Export and validate `denoise.fp32` of `model` to `path`; returns its spec."""
    spec = denoise_spec(model)
    args = _example_args(model)
    dynamic_shapes = dynamic_shapes_of(spec)
    # The fake-tensor cache costs more than it saves on this graph's symbolic shapes: measured
    # about 27 s instead of 35 s (trace and export) for a one-layer model.
    with torch._dynamo.config.patch(fake_tensor_cache_enabled=False):
        try:
            joint = trace_joint(NLLGradient(model).eval(), args, dynamic_shapes)
        except Exception as err:  # make_fx raises many types; name the graph and keep the cause
            raise StarflowError(f"tracing graph {spec.name} failed: {type(err).__name__}: {err}") from err
        # onnxscript's optimizer pattern-matches every node: minutes on this joint graph (~270
        # nodes per layer), measured 240 s -> 105 s for the 10-layer demo model without it
        export_module(joint, args, dynamic_shapes, spec, path, opset, optimize=False)
    check_results(validate_denoise(model, path))
    return spec


def reference_gradient(model: StarFlow, x: Tensor, text: Tensor | None) -> Tensor:
    """The model's own gradient, as `StarFlow.denoise` takes it: numel * grad of the mean loss."""
    with torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(model.loss(model(x, text)), [x])
    return (x.numel() * grad).detach()


def validate_denoise(model: StarFlow, path: Path, seed: int = 0) -> list[Comparison]:
    """Run the graph through ONNX Runtime on `CASES` against `reference_gradient`."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    runner = OrtRunner("denoise.fp32", path)
    results = []
    for batch, (h, w), length in CASES:
        x = torch.randn(
            batch, config.channel_size, h * config.patch_size, w * config.patch_size, generator=generator
        )
        text = torch.randn(batch, length, config.txt_dim, generator=generator) if _has_text(model) else None
        expected = reference_gradient(model, x, text).numpy()
        feeds = {"x": x.numpy()} | ({"text": text.numpy()} if text is not None else {})
        actual = runner.run(feeds)["grad"]
        case = f"batch {batch}, latent {x.size(2)}x{x.size(3)}, text {0 if text is None else length}"
        results.append(compare("denoise.fp32", case, "grad", actual, expected, TOLERANCE))
    return results


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


def export_learned_denoise(model: StarFlow, path: Path, opset: int = DEFAULT_OPSET) -> GraphSpec:
    """Export and validate the learned denoiser's graph of `model` to `path`; returns its spec."""
    spec, config = learned_spec(model), model.config
    p = config.patch_size
    args = (torch.randn(2, 5, config.channel_size, 3 * p, 4 * p),)  # every symbolic dim >= 2, distinct
    if len(spec.inputs) == 2:
        args += (torch.randn(2, 6, config.txt_dim),)
    export_module(LearnedCorrection(model).eval(), args, dynamic_shapes_of(spec), spec, path, opset)
    check_results(validate_learned_denoise(model, path))
    return spec


def validate_learned_denoise(model: StarFlow, path: Path, seed: int = 0) -> list[Comparison]:
    """The graph through ONNX Runtime against the PyTorch denoiser, at two frame counts."""
    config, p = model.config, model.config.patch_size
    generator = torch.Generator().manual_seed(seed)
    runner = OrtRunner("denoise.fp32", path)
    reference = LearnedCorrection(model).eval()
    conditioned = model.learnable_self_denoiser.text_conditioned
    results = []
    for batch, frames, (h, w), length in LEARNED_CASES:
        x = torch.randn(batch, frames, config.channel_size, h * p, w * p, generator=generator)
        text = torch.randn(batch, length, config.txt_dim, generator=generator) if conditioned else None
        with torch.no_grad():
            expected = reference(x, text).numpy()
        feeds = {"x": x.numpy()} | ({"text": text.numpy()} if text is not None else {})
        actual = runner.run(feeds)["correction"]
        size = f"{x.size(3)}x{x.size(4)}"
        case = f"batch {batch}, {frames} frames of {size}, text {length if conditioned else 0}"
        results.append(compare("denoise.fp32", case, "correction", actual, expected, VALIDATION))
    return results
