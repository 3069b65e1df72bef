"""How far each engine's Jacobi step is from the machine's matrix-multiply floor (bench-256).

A Jacobi iteration of one block is one step call over a chunk. This script times, side by side in
one process, one step call of the deep block (2 rows per image = [cond ; uncond], 4 layers) and of
a shallow block (1 row per image, 1 layer) at chunk 64 with a half-full cache, for `--batch` images:

- ONNX Runtime running the exported step graph (what the runtime calls),
- PyTorch running `FlowBlock.step` on the same feeds (what the reference sampler calls),
- the floor: the same call's linear layers alone (qkv, attention out, MLP, proj_in/out) as plain
  torch matmuls of the same shapes, i.e. what no engine can beat on this CPU without doing fewer
  FLOPs.

It then multiplies by the block calls of one Jacobi sample (from the runtime's statistics) to
show the best time any engine could reach at that iteration count.

    python benchmarks/step_floor.py [--threads 2] [--repeats 50] [--batch 8]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from starflow.apps.bench import BenchOptions, prepare
from starflow.core.sampler import JacobiSettings, SampleOptions
from starflow.model.flow import FlowBlock
from starflow.runtime import Pipeline


def median_ms(repeats: int, fn: Callable[..., object], *args: object) -> float:
    for _ in range(3):
        fn(*args)
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1e3


def matmuls(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    return [a @ b for a, b in pairs]


def linear_shapes(block: FlowBlock) -> list[tuple[int, int]]:
    """(in, out) of every linear layer one step call runs, in order."""
    shapes = [(block.proj_in.in_features, block.proj_in.out_features)]
    for layer in block.attn_blocks:
        shapes.append((layer.attention.qkv.in_features, layer.attention.qkv.out_features))
        shapes.append((layer.attention.proj.in_features, layer.attention.proj.out_features))
        linears = [m for m in layer.mlp.modules() if isinstance(m, torch.nn.Linear)]
        shapes += [(m.in_features, m.out_features) for m in linears]
    shapes.append((block.proj_out.in_features, block.proj_out.out_features))
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1, help="images per call")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, artifacts = prepare(BenchOptions())
    pipe = Pipeline.load(artifacts, threads=args.threads)
    config, c = model.config, args.chunk
    tokens = config.latent_size**2
    rng = np.random.default_rng(0)
    h = w = config.latent_size // config.patch_size
    grid = np.array([h, w], dtype=np.int64)

    # block calls of one Jacobi sample with the bench's settings, per block
    side = config.latent_size
    noise = rng.standard_normal((args.batch, config.channel_size, side, side), dtype=np.float32)
    y = rng.standard_normal((args.batch, config.txt_size, config.txt_dim), dtype=np.float32)
    sampling = SampleOptions(guidance=2.0, jacobi=JacobiSettings(block_size=c, threshold=1e-3))
    _, stats = pipe.sample(noise, y, np.zeros_like(y), sampling, return_stats=True)
    calls = {s.block: s.evaluations for s in stats}

    print(
        f"one step call, {args.batch} images, chunk {c}, cache half full, {args.threads} threads (ms, median)"
    )
    print(f"{'block':14} {'rows':>4} {'GFLOP':>6} {'ORT':>7} {'PyTorch':>8} {'floor':>7} {'calls':>6}")
    totals = {"ORT": 0.0, "PyTorch": 0.0, "floor": 0.0}
    for plan in pipe.blocks:
        block, entry = model.blocks[plan.index], plan.entry
        batch = 2 * args.batch if plan.deep else args.batch
        text = config.txt_size if plan.text_conditioned else 0
        past = text + tokens // 2
        shape = (entry.layers, batch, entry.kv_heads, past, entry.head_dim)
        feeds = {
            "x": rng.standard_normal((batch, c, config.token_dim), dtype=np.float32),
            "past_keys": rng.standard_normal(shape, dtype=np.float32),
            "past_values": rng.standard_normal(shape, dtype=np.float32),
            "grid": grid,
            "start": np.array(tokens // 2, dtype=np.int64),
        }
        ort_ms = median_ms(args.repeats, plan.step.run, feeds)

        args_torch = [torch.from_numpy(feeds[k]) for k in ("x", "past_keys", "past_values", "grid", "start")]
        with torch.no_grad():
            torch_ms = median_ms(args.repeats, block.step, *args_torch)
            pairs = [(torch.randn(batch * c, i), torch.randn(i, o)) for i, o in linear_shapes(block)]
            floor_ms = median_ms(args.repeats, matmuls, pairs)
        flops = 2 * batch * c * sum(i * o for i, o in linear_shapes(block))
        n = calls[plan.index]
        for name, ms in (("ORT", ort_ms), ("PyTorch", torch_ms), ("floor", floor_ms)):
            totals[name] += n * ms
        role = f"{plan.index} ({'deep' if plan.deep else 'shallow'})"
        times = f"{ort_ms:7.2f} {torch_ms:8.2f} {floor_ms:7.2f}"
        print(f"{role:14} {batch * c:4d} {flops / 1e9:6.3f} {times} {n:6d}")
    print(
        "one Jacobi sample at these call counts, step calls only: "
        + ", ".join(f"{k} {v:.0f} ms" for k, v in totals.items())
    )
    print(
        f"2x faster than PyTorch would need {totals['PyTorch'] / 2:.0f} ms: "
        f"{totals['PyTorch'] / 2 / totals['floor']:.2f}x the matmul floor"
    )


if __name__ == "__main__":
    main()
