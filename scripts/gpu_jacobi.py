"""The PyTorch reference's Jacobi on a GPU: the official loop, sequential, compiled steps.

Prepared for a lent GPU machine (PyTorch with CUDA only there: no TensorRT, no onnxruntime-gpu),
to run once in a few minutes and be quoted in the README. On random weights of a preset's shapes
(default: the official 3B text-to-image model, bf16), one seeded noise, it times:

- sequential: token by token (the baseline Jacobi is measured against);
- jacobi, official loop: `StarFlow.sample`, whose loop is the official sampler's: the stop test is
  read back to the host after every iteration (and all-reduced across GPUs in a distributed run).
  Apple's code itself is not vendored here; with a checkout of it, time its sampler on these
  weights (`starflow.model.checkpoint.save_model` + its loader) beside this row;
- jacobi, torch.compile: every block's step compiled (dynamic shapes), official loop;
- jacobi, torch.compile + CUDA graphs: the same in "reduce-overhead" mode (one graph per shape).

Each row: median seconds of `--repeats` samples after a warm-up sample (compile time reported
apart), block calls, and max |difference| from the official loop's sample. A variant that fails
(e.g. a compiler error) is reported as failed with its reason; the others still run.

    python scripts/gpu_jacobi.py [--preset starflow-3b-t2i] [--device cuda] [--dtype bf16]
    python scripts/gpu_jacobi.py --preset tiny-t2i --device cpu --dtype fp32   # a dry run here
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from starflow.core import sampler
from starflow.core.config import load_config
from starflow.core.sampler import JacobiSettings, SampleOptions
from starflow.model.flow import FlowBlock, StarFlow
from starflow.model.testing import random_model

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclasses.dataclass
class Row:
    name: str
    seconds: float | None = None
    warmup_seconds: float | None = None  # the first sample: compilation included
    block_calls: int | None = None
    max_abs_vs_official: float | None = None
    error: str | None = None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def compiled_steps(model: StarFlow, mode: str | None) -> Iterator[None]:
    """Every flow block's `step` replaced by `torch.compile(step, dynamic=True, mode=mode)`."""
    blocks = [b for b in model.blocks if isinstance(b, FlowBlock)]
    for block in blocks:
        block.step = torch.compile(block.step, dynamic=True, mode=mode)  # instance attribute
    try:
        yield
    finally:
        for block in blocks:
            del block.step  # the class method again


def run_variant(
    name: str,
    sample: Callable[[], tuple[torch.Tensor, list[sampler.BlockStats]]],
    device: torch.device,
    repeats: int,
    official: torch.Tensor | None,
) -> tuple[Row, torch.Tensor | None]:
    row = Row(name)
    try:
        began = time.perf_counter()
        x, stats = sample()
        synchronize(device)
        row.warmup_seconds = round(time.perf_counter() - began, 3)
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            x, stats = sample()
            synchronize(device)
            times.append(time.perf_counter() - began)
        row.seconds = round(statistics.median(times), 3)
        row.block_calls = sum(s.evaluations for s in stats)
        if official is not None:
            row.max_abs_vs_official = float((x.float() - official.float()).abs().max())
        return row, x
    except Exception as err:  # a compiler or capture failure is a result to report, not a crash
        row.error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
        return row, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="starflow-3b-t2i")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--guidance", type=float, default=2.5)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--threshold", type=float, default=1e-3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-sequential", action="store_true", help="skip the (slow) sequential row")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    args = parser.parse_args()

    device = torch.device(args.device)
    config = load_config(args.preset)
    model: Any = random_model(config).to(device, DTYPES[args.dtype])
    generator = torch.Generator().manual_seed(0)
    side = config.latent_size
    noise = torch.randn(args.batch, config.channel_size, side, side, generator=generator).to(device)
    y = torch.randn(args.batch, config.txt_size, config.txt_dim, generator=generator).to(
        device, DTYPES[args.dtype]
    )
    jacobi = SampleOptions(args.guidance, "jacobi", JacobiSettings(args.block_size, threshold=args.threshold))

    def sample(options: SampleOptions) -> Callable[[], Any]:
        return lambda: model.sample(noise, y, torch.zeros_like(y), options, return_stats=True)

    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "preset": args.preset, "dtype": args.dtype, "batch": args.batch,
        "guidance": args.guidance, "block_size": args.block_size, "threshold": args.threshold,
        "parameters": sum(p.numel() for p in model.parameters()),
    }  # fmt: skip
    print(json.dumps(info), flush=True)
    rows = []
    with torch.no_grad():
        official_row, official = run_variant(
            "jacobi, official loop", sample(jacobi), device, args.repeats, None
        )
        rows.append(official_row)
        if not args.no_sequential:
            sequential = dataclasses.replace(jacobi, method="sequential")
            rows.append(run_variant("sequential", sample(sequential), device, 1, official)[0])
        if not args.no_compile:
            for label, mode in (("torch.compile", None), ("torch.compile + CUDA graphs", "reduce-overhead")):
                if mode == "reduce-overhead" and device.type != "cuda":
                    continue
                torch._dynamo.reset()
                with compiled_steps(model, mode):
                    rows.append(
                        run_variant(f"jacobi, {label}", sample(jacobi), device, args.repeats, official)[0]
                    )
    print(f"{'variant':40} {'s':>8} {'warm-up s':>10} {'calls':>6} {'max|diff|':>10}")
    for r in rows:
        if r.error:
            print(f"{r.name:40} failed: {r.error}")
        else:
            diff = "" if r.max_abs_vs_official is None else f"{r.max_abs_vs_official:.1e}"
            print(f"{r.name:40} {r.seconds:8.3f} {r.warmup_seconds:10.3f} {r.block_calls:6d} {diff:>10}")
    print(json.dumps([dataclasses.asdict(r) for r in rows]))


if __name__ == "__main__":
    main()
