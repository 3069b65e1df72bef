"""Scale check of the reference model at the official 3B shapes, deep block cut to 2 layers.

Width 3072, 48 heads of 64, 128 text tokens of width 2048, 32x32x4 latent (1,024 tokens per
block). Reports parameter count, forward time and peak memory (RSS). A benchmark, not a test:
numbers depend on the machine and its load.

    python benchmarks/model_scale.py [--batch 1] [--repeats 2] [--threads N] [--json out.json]
    python benchmarks/model_scale.py --device cuda --dtype bf16 --sample   # GPU, plus Jacobi sampling
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import torch

from starflow.core.config import load_config
from starflow.core.sampler import SampleOptions
from starflow.model.flow import StarFlow
from starflow.model.testing import perturb_


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB (host memory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="starflow-3b-deep2")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", dest="json_path", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--sample", action="store_true", help="also time Jacobi sampling with CFG 2.5")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = load_config(args.preset)
    began = time.perf_counter()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    with torch.device(args.device):
        model = StarFlow(config).to(dtype).eval()
    build_s = time.perf_counter() - began
    params = sum(p.numel() for p in model.parameters())
    rss_after_build = peak_rss_gib()

    side = config.latent_size
    x = torch.randn(args.batch, config.channel_size, side, side, device=args.device)
    y = torch.randn(args.batch, config.txt_size, config.txt_dim, device=args.device)

    def synchronize() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    times = []
    with torch.no_grad():
        for _ in range(args.repeats):
            began = time.perf_counter()
            out = model(x.to(dtype), y)
            synchronize()
            times.append(time.perf_counter() - began)
    assert torch.isfinite(out.z).all()
    sampling = None
    if args.sample:  # non-trivial weights: the official init makes every block the identity
        perturb_(model, seed=0)
        began = time.perf_counter()
        _, stats = model.sample(x, y, torch.zeros_like(y), SampleOptions(guidance=2.5), return_stats=True)
        synchronize()
        sampling = {
            "jacobi_seconds": round(time.perf_counter() - began, 2),
            "block_calls": sum(s.evaluations for s in stats),
            "mean_iterations_per_chunk": [round(s.mean_iterations, 2) for s in stats],
        }

    result = {
        "preset": args.preset,
        "layers_per_block": config.block_layers,
        "width": config.channels,
        "heads": config.heads(config.channels)[0],
        "text_tokens": config.txt_size,
        "latent": [config.channel_size, side, side],
        "batch": args.batch,
        "parameters": params,
        "build_seconds": round(build_s, 2),
        "forward_seconds": [round(t, 2) for t in times],
        "peak_rss_gib_after_build": round(rss_after_build, 2),
        "peak_rss_gib": round(peak_rss_gib(), 2),
        "threads": args.threads,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "dtype": args.dtype,
        "jacobi_sampling_cfg_2.5_block16": sampling,
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
    }
    print(json.dumps(result, indent=2))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
