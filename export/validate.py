"""Validation: every exported graph against the PyTorch reference, through ONNX Runtime.

The reference side is the model's own sampling path (`FlowBlock.prefill`/`step` on a `KVCache`,
`FlowBlock.forward`), not the export wrappers, so a wrapper bug cannot hide. Each graph runs at
three shape cases that differ from the export example: another batch, a non-square grid and a
small one, chunk 1 and chunk c, an empty and a non-empty cache, two text lengths.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from starflow.errors import StarflowError
from starflow.export.manifest import load_manifest
from starflow.model import FlowBlock, StarFlow, apply_rope


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """A tensor passes when max|onnx - torch| <= atol + rtol * max|torch|."""

    atol: float
    rtol: float


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


@dataclasses.dataclass(frozen=True)
class Result:
    graph: str
    case: str
    tensor: str
    shape: tuple[int, ...]
    max_abs_error: float
    max_abs_reference: float
    limit: float

    @property
    def severity(self) -> float:
        """Error as a fraction of the limit (inf when the limit is 0 and the error is not)."""
        if self.limit > 0:
            return self.max_abs_error / self.limit
        return float("inf") if self.max_abs_error > 0 else 0.0

    @property
    def passed(self) -> bool:
        return bool(self.max_abs_error <= self.limit)  # NaN fails

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "shape": list(self.shape), "passed": self.passed}

    def describe(self) -> str:
        return (
            f"graph {self.graph}, tensor {self.tensor}, shape {list(self.shape)} ({self.case}): "
            f"max abs error {self.max_abs_error:.3g} > limit {self.limit:.3g} "
            f"(max |reference| {self.max_abs_reference:.3g})"
        )


def shape_cases(manifest: dict[str, Any]) -> list[Case]:
    """Three shape sets inside the exported profile, none equal to the export example.

    Grids stay at or below the training size so that validating a 3B-sized block stays minutes.
    """
    latent, p = manifest["latent"], manifest["latent"]["patch_size"]
    g = latent["train"][0] // p
    lo = (latent["min"][0] // p, latent["min"][1] // p)
    if lo[1] < g:
        narrow = max(lo[1], g // 2)
    else:  # the profile allows no narrower grid: go wider if it can, else stay square
        narrow = min(g + 1, latent["max"][1] // p)
    L = manifest["text"]["max_length"] if manifest["text"] else 0
    square, small = g * g, lo[0] * lo[1]
    return [
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
def reference(model: StarFlow, block: FlowBlock, case: Case, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Feeds and PyTorch outputs of every graph kind of `block` at `case` (fp32)."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    B, (h, w), D = case.batch, case.grid, cfg.token_dim
    L = case.text_length if block.text_conditioned else 0
    rope = model.rope_tables(block, h, w, L)
    end = case.start + case.chunk
    tokens = torch.randn(B, end, D, generator=gen)
    tokens[:, :1] = block.sos_embed  # position 0 always sees the start-of-sequence token
    text = torch.randn(B, L, cfg.txt_dim, generator=gen) if L else None
    grid = np.array([h, w], dtype=np.int64)
    out: dict[str, dict[str, np.ndarray]] = {}

    cache = block.new_cache(B, L + end, tokens)
    if text is not None:
        block.prefill(text, cache, rope)
    if case.start:
        block.step(tokens[:, : case.start], L, cache, rope, L)
    mu, sigma = block.step(tokens[:, case.start :], L + case.start, cache, rope, L)
    # the reference caches keys before RoPE; the graphs exchange them rotated (see run_layers)
    keys = apply_rope(cache.keys, rope[0][: L + end], rope[1][: L + end]).numpy()
    if text is not None:
        out["prefill"] = {
            "in:text": text.numpy(),
            "keys": keys[:, :, :, :L],
            "values": cache.values[:, :, :, :L].numpy(),
        }
    P = L + case.start
    out["step"] = {
        "in:x": tokens[:, case.start :].numpy(),
        "in:past_keys": keys[:, :, :, :P],
        "in:past_values": cache.values[:, :, :, :P].numpy(),
        "in:grid": grid,
        "in:start": np.array(case.start, dtype=np.int64),
        "mu": mu.numpy(),
        "sigma": sigma.numpy(),
        "new_keys": keys[:, :, :, P:],
        "new_values": cache.values[:, :, :, P:].numpy(),
    }

    x = torch.randn(B, h * w, D, generator=gen)  # block order
    z, logdet = block(block.permute(x), text, rope)
    out["forward"] = {
        "in:x": x.numpy(),
        "in:grid": grid,
        "z": block.permute(z).numpy(),
        "logdet": logdet.numpy(),
    }
    if text is not None:
        out["forward"]["in:text"] = text.numpy()
    return out


def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def validate_export(
    directory: str | Path, model: StarFlow, seed: int = 0, verify_files: bool = True
) -> list[Result]:
    """Compare every graph in `directory` with `model` at every shape case; returns all results."""
    directory = Path(directory)
    manifest = load_manifest(directory, verify_files)
    graphs = {g["name"]: g for g in manifest["graphs"]}
    results: list[Result] = []
    cases = shape_cases(manifest)
    for block_entry in manifest["blocks"]:
        block = model.blocks[block_entry["index"]]
        refs = [reference(model, block, case, seed + i) for i, case in enumerate(cases)]
        # One session alive at a time: a 3B-sized block's graphs are GBs each.
        for precision, kinds in block_entry["graphs"].items():
            tol = TOLERANCES[precision]
            for kind, name in kinds.items():
                graph = graphs[name]
                session = _session(directory / graph["file"])
                for case, ref in zip(cases, refs, strict=True):
                    results += _compare(session, graph, case, ref[kind], tol)
                del session
    return results


def _compare(
    session: Any, graph: dict[str, Any], case: Case, data: dict[str, np.ndarray], tol: Tolerance
) -> list[Result]:
    """Run one graph on the reference feeds; one Result per output tensor."""
    name = graph["name"]
    feeds = {}
    for spec in graph["inputs"]:
        value = data[f"in:{spec['name']}"]
        feeds[spec["name"]] = value.astype(spec["dtype"]) if value.dtype != np.int64 else value
    try:
        outputs = session.run(None, feeds)
    except Exception as err:  # onnxruntime raises its own exception types
        shapes = {k: list(v.shape) for k, v in feeds.items()}
        raise StarflowError(
            f"graph {name} ({case.name}): onnxruntime failed with inputs {shapes}: {err}"
        ) from None
    results = []
    for spec, actual in zip(graph["outputs"], outputs, strict=True):
        expected = data[spec["name"]]
        if actual.shape != expected.shape:
            raise StarflowError(
                f"graph {name} ({case.name}), tensor {spec['name']}: shape "
                f"{list(actual.shape)}, PyTorch gives {list(expected.shape)}"
            )
        error = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
        scale = float(np.abs(expected).max(initial=0.0))
        limit = tol.atol + tol.rtol * scale
        results.append(
            Result(
                name,
                case.name,
                spec["name"],
                tuple(actual.shape),
                float(error.max(initial=0.0)),
                scale,
                limit,
            )
        )
    return results


def check_results(results: list[Result]) -> None:
    """Raise naming every failing graph/tensor/shape, worst first."""
    failed = sorted((r for r in results if not r.passed), key=lambda r: -r.severity)
    if failed:
        listed = "\n  ".join(r.describe() for r in failed[:10])
        raise StarflowError(f"validation failed for {len(failed)} of {len(results)} tensors:\n  {listed}")


def validate_directory(
    directory: str | Path, checkpoint: str | Path, config: str | Path | None = None
) -> list[Result]:
    """Reload the checkpoint (config from the manifest unless given) and rerun validation."""
    from starflow.checkpoint import load_model
    from starflow.config import config_from_dict

    manifest = load_manifest(directory)  # checks every sha256 once; validate_export need not again
    model_config = config if config is not None else config_from_dict(manifest["model"], "manifest model")
    results = validate_export(directory, load_model(model_config, checkpoint), verify_files=False)
    check_results(results)
    return results


def validate_command(directory: Path, checkpoint: Path, config: str | None) -> str:
    """`starflow validate`: rerun validation, describe the tensor closest to its limit."""
    results = validate_directory(directory, checkpoint, config)
    worst = max(results, key=lambda r: r.severity)
    return (
        f"validation passed: {len(results)} tensors in {len({r.graph for r in results})} graphs; closest to "
        f"its limit: {worst.graph} {worst.tensor} {list(worst.shape)} error {worst.max_abs_error:.3g} "
        f"(limit {worst.limit:.3g})"
    )
