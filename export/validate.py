"""Validation: every exported graph against the PyTorch block it was exported from, in ONNX Runtime.

The reference side runs the block's own methods eagerly in fp32 (`FlowBlock.open`, the cached
step the PyTorch sampler uses, `FlowBlock.density` and `FlowBlock.vjp`), so the comparison
covers the exporter and the fp16 casts. Each graph runs at three shape cases that differ from
the export example: another batch, a non-square grid and a small one, chunk 1 and chunk c, an
empty and a non-empty cache, two text lengths. Pipeline-level parity (the runtime's samples
against the reference's and the official goldens) is tested separately, in
tests/runtime/test_pipeline.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from starflow.contract.manifest import Comparison, Graph, Latent, Manifest, Tolerance, Video
from starflow.core.errors import StarflowError
from starflow.core.limits import release_freed_memory
from starflow.export.graphs import block_entry
from starflow.model.flow import FlowBlock, StarFlow
from starflow.runtime.backends import OrtRunner

# Measured worst max|error|/max|reference|: fp32 7e-6 on the 3B-shaped block; fp16 9.6e-4 on the
# fixture and 5.7e-3 on the 3B-shaped block (fp16 weights and matmuls over 3072 channels), which
# keeps the fp16 limit about 2x above the worst error seen (benchmarks/export_scale.py).
TOLERANCES = {"fp32": Tolerance(atol=1e-4, rtol=1e-4), "fp16": Tolerance(atol=1e-2, rtol=1e-2)}


@dataclasses.dataclass(frozen=True)
class Case:
    """One shape set: grid is in tokens (h, w); start/chunk index the block's token order."""

    name: str
    batch: int
    grid: tuple[int, int]
    start: int
    chunk: int
    text_length: int
    frames: int = 1  # a clip's frames: the forward graph sees all, the step starts in a later one


def shape_cases(latent: Latent, text_length: int, video: Video | None) -> list[Case]:
    """Three shape sets inside an export's profile (its latent range, longest text and clip
    range), none equal to the export example.

    Grids stay at or below the training size so that validating a 3B-sized block stays minutes.
    """
    p = latent.patch_size
    g = latent.train[0] // p
    lo = (latent.min[0] // p, latent.min[1] // p)
    if lo[1] < g:
        narrow = max(lo[1], g // 2)
    else:  # the profile allows no narrower grid: go wider if it can, else stay square
        narrow = min(g + 1, latent.max[1] // p)
    L = text_length
    square, small = g * g, lo[0] * lo[1]
    clips = []
    if video is not None:  # RoPE's frame axis: positions in frames 1 and 2, two clip lengths
        most = min(3, video.frames.max)
        clips = [
            Case(f"batch 2, {most} frames, chunk c in the last frame", 2, (g, g), (most - 1) * square + 1,
                 min(16, square - 1), L, most),
            Case("batch 1, 2 frames, chunk 1 in frame 1", 1, lo, small + small // 2, 1, L, 2),
        ]  # fmt: skip
    return clips + [
        Case("batch 2, square grid, chunk c, start 0", 2, (g, g), 0, min(16, square), L),
        Case("batch 1, non-square grid, chunk 1, mid cache", 1, (g, narrow), g * narrow // 2, 1, L),
        Case(
            "batch 3, small grid, chunk c, late cache",
            3,
            lo,
            small // 3,
            min(5, small - small // 3),
            max(1, L - 1),
        ),
    ]


@torch.no_grad()
def reference(
    block: FlowBlock, text_dim: int, case: Case, seed: int, vjp: bool = True
) -> dict[str, dict[str, np.ndarray]]:
    """Feeds and PyTorch outputs of every graph kind of `block` at `case` (fp32); the vjp's (a
    backward pass) only with `vjp`."""
    gen = torch.Generator().manual_seed(seed)
    B, (h, w), D = case.batch, case.grid, block.proj_in.in_features
    L = case.text_length if block.text_conditioned else 0
    end, P = case.start + case.chunk, L + case.start
    tokens = torch.randn(B, end, D, generator=gen)
    tokens[:, :1] = block.sos_embed  # position 0 always sees the start-of-sequence token
    text = torch.randn(B, L, text_dim, generator=gen) if L else None
    grid = np.array([h, w], dtype=np.int64)
    step = block.open(B, (h, w), text, case.frames * h * w)
    if case.start:
        step(tokens[:, : case.start], 0)
    past = {
        "in:past_keys": step.keys[:, :, :, :P].numpy().copy(),
        "in:past_values": step.values[:, :, :, :P].numpy().copy(),
    }
    mu, sigma = step(tokens[:, case.start :], case.start)
    out: dict[str, dict[str, np.ndarray]] = {}
    if text is not None:
        out["prefill"] = {
            "in:text": text.numpy(),
            "keys": step.keys[:, :, :, :L].numpy(),
            "values": step.values[:, :, :, :L].numpy(),
        }
    out["step"] = {
        "in:x": tokens[:, case.start :].numpy(), **past, "in:grid": grid,
        "in:start": np.array(case.start, dtype=np.int64), "mu": mu.numpy(), "sigma": sigma.numpy(),
        "new_keys": step.keys[:, :, :, P : L + end].numpy(),
        "new_values": step.values[:, :, :, P : L + end].numpy(),
    }  # fmt: skip
    x = torch.randn(B, case.frames * h * w, D, generator=gen)  # block order
    z, logdet = block.density(x, torch.from_numpy(grid), text)
    out["forward"] = {"in:x": x.numpy(), "in:grid": grid, "z": z.numpy(), "logdet": logdet.numpy()}
    if vjp:
        grad_z = torch.randn(x.shape, generator=gen)
        grad_x = block.vjp(x, torch.from_numpy(grid), grad_z, text)
        out["vjp"] = {
            "in:x": x.numpy(),
            "in:grid": grid,
            "in:grad_z": grad_z.numpy(),
            "grad_x": grad_x.numpy(),
        }
    for kind in ("forward", "vjp"):
        if text is not None and kind in out:
            out[kind]["in:text"] = text.numpy()
    return out


References = list[dict[str, dict[str, np.ndarray]]]  # per case: graph kind -> feeds and outputs


def manifest_cases(manifest: Manifest) -> list[Case]:
    return shape_cases(manifest.latent, manifest.text.max_length if manifest.text else 0, manifest.video)


def block_references(
    block: FlowBlock, text_dim: int, cases: list[Case], kinds: set[str], seed: int = 0
) -> References:
    """PyTorch's feeds and outputs of `block`'s graph kinds at every case: computed while the
    block's weights are loaded, compared after they are released."""
    return [reference(block, text_dim, case, seed + i, "vjp" in kinds) for i, case in enumerate(cases)]


def compare_block(
    directory: Path, graphs: list[Graph], cases: list[Case], refs: References
) -> list[Comparison]:
    """Every graph of one block in `directory` against its references. One session alive at a
    time, opened without prepacking weights (a 3B-sized block's graphs are GBs each, and a
    prepacked copy would double that)."""
    results: list[Comparison] = []
    for graph in graphs:
        runner = OrtRunner(graph.name, directory / graph.file, few_runs=True)
        for case, ref in zip(cases, refs, strict=True):
            results += _compare(runner, graph, case, ref[graph.kind], TOLERANCES[graph.precision])
        del runner
        release_freed_memory(graph.bytes + sum(f.bytes for f in graph.external_data))
    return results


def validate_export(
    directory: str | Path, model: StarFlow, manifest: Manifest, seed: int = 0
) -> list[Comparison]:
    """Compare every block graph in `directory` with `model` at every shape case."""
    directory = Path(directory)
    results: list[Comparison] = []
    cases = manifest_cases(manifest)
    for entry in manifest.blocks:
        kinds = {kind for names in entry.graphs.values() for kind in names}
        refs = block_references(model.blocks[entry.index], model.config.txt_dim, cases, kinds, seed)
        graphs = [manifest.graph(name) for kinds in entry.graphs.values() for name in kinds.values()]
        results += compare_block(directory, graphs, cases, refs)
    return results


def _compare(
    runner: OrtRunner, graph: Graph, case: Case, data: dict[str, np.ndarray], tol: Tolerance
) -> list[Comparison]:
    """Run one graph on the reference feeds; one Comparison per output tensor."""
    feeds = {t.name: data[f"in:{t.name}"].astype(t.dtype) for t in graph.inputs}
    try:
        outputs = runner.run(feeds)
    except Exception as err:  # onnxruntime raises its own exception types
        shapes = {k: list(v.shape) for k, v in feeds.items()}
        raise StarflowError(
            f"graph {graph.name} ({case.name}): onnxruntime failed with inputs {shapes}: {err}"
        ) from None
    return [
        compare(graph.name, case.name, spec.name, outputs[spec.name], data[spec.name], tol)
        for spec in graph.outputs
    ]


def compare(
    graph: str, case: str, tensor: str, actual: np.ndarray, expected: np.ndarray, tol: Tolerance
) -> Comparison:
    """One output against its reference: passes when max|error| <= atol + rtol * max|reference|."""
    if actual.shape != expected.shape:
        raise StarflowError(
            f"graph {graph} ({case}), tensor {tensor}: shape {list(actual.shape)}, "
            f"PyTorch gives {list(expected.shape)}"
        )
    scale = float(np.abs(expected).max(initial=0.0))
    error = float(np.abs(actual.astype(np.float64) - expected.astype(np.float64)).max(initial=0.0))
    return Comparison.of(graph, case, tensor, actual.shape, error, scale, tol.atol + tol.rtol * scale)


def check_results(results: list[Comparison]) -> None:
    """Raise naming every failing graph/tensor/shape, worst first."""
    failed = sorted((r for r in results if not r.passed), key=lambda r: -r.severity)
    if failed:
        listed = "\n  ".join(r.describe() for r in failed[:10])
        raise StarflowError(f"validation failed for {len(failed)} of {len(results)} tensors:\n  {listed}")


def describe_results(results: tuple[Comparison, ...] | list[Comparison]) -> str:
    """One line: how many tensors passed, and the one closest to its limit."""
    if not results:
        return "validation skipped (--no-validate)"
    worst = max(results, key=lambda r: r.severity)
    return (
        f"validation passed: {len(results)} tensors in {len({r.graph for r in results})} graphs; "
        "closest to its "
        f"limit: {worst.graph} {worst.tensor} {list(worst.shape)} error {worst.max_abs_error:.3g} "
        f"(limit {worst.limit:.3g})"
    )


def check_manifest(manifest: Manifest, model: StarFlow) -> None:
    """The manifest's own fields against the checkpoint: block order, roles, permutations, shapes,
    sos_embed, latent and text sizes, guidance and noise (the graphs are compared separately)."""
    config = model.config
    expected = [
        block_entry(model, b, list(manifest.graphs), list(manifest.precisions))
        for b in model.sampling_blocks()
    ]
    problems = []
    if len(expected) != len(manifest.blocks):
        problems.append(f"{len(manifest.blocks)} blocks, the checkpoint has {len(expected)}")
    for position, (want, got) in enumerate(zip(expected, manifest.blocks, strict=False)):  # counted above
        for field in ("index", "role", "permutation", "frame_local", "layers", "width", "heads", "kv_heads",
                      "head_dim", "text_conditioned", "sos_embed"):  # fmt: skip
            if getattr(got, field) != getattr(want, field):
                problems.append(f"block {position} in sampling order: {field} differs from the checkpoint's")
    latent, text = manifest.latent, manifest.text
    facts = {
        "latent channels": (latent.channels, config.channel_size),
        "patch_size": (latent.patch_size, config.patch_size),
        "latent train size": (latent.train, (config.latent_size, config.latent_size)),
        "text dim": (text.dim if text else 0, config.txt_dim),
        "guidance blocks": (manifest.guidance.blocks, "deep" if config.cond_top_only else "all"),
        "noise_std": (manifest.noise_std, config.noise_std),
    }
    problems += [
        f"{name} is {got!r}, the checkpoint gives {want!r}"
        for name, (got, want) in facts.items()
        if got != want
    ]
    if problems:
        raise StarflowError(f"manifest does not describe this checkpoint: {'; '.join(problems)}")


def validate_directory(
    directory: str | Path, checkpoint: str | Path, config: str | Path | None = None
) -> list[Comparison]:
    """Reload the checkpoint (config from the manifest unless given) and rerun validation."""
    from starflow.core.config import config_from_dict
    from starflow.model.checkpoint import load_model

    manifest = Manifest.load(directory)  # checks every sha256 once
    model_config = config if config is not None else config_from_dict(manifest.model, "manifest model")
    model = load_model(model_config, checkpoint)
    check_manifest(manifest, model)
    results = validate_export(directory, model, manifest)
    check_results(results)
    return results
