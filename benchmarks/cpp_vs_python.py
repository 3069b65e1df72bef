"""libstarflow (C++) against the Python runtime: the same export, ONNX Runtime library and threads.

Samples `bench-256` (the `starflow bench` preset: batch 1, guidance 2, Jacobi block 64) with
`Pipeline.sample` in this process and `starflow-run` in a subprocess, in alternating rounds, and
prints median seconds per sample (the C++ side times its own sample call, so process start and
session creation are excluded on both sides), the ratio, and the agreement of the two latents.
Both load the onnxruntime wheel's libonnxruntime (the C++ build copies it beside libstarflow).

    make cpp && .venv/bin/python benchmarks/cpp_vs_python.py [--rounds 7] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from starflow.apps.bench import BenchOptions, prepare
from starflow.runtime import Pipeline

RUN = Path(__file__).resolve().parents[1] / "build" / "cpp" / "starflow-run"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    if not RUN.is_file():
        raise SystemExit(f"{RUN} is not built: run `make cpp`")
    options = BenchOptions()
    _, artifacts = prepare(options)
    sampling = options.sampling
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((1, 4, 16, 16), dtype=np.float32)
    y = rng.standard_normal((1, 16, 64), dtype=np.float32)
    y_null = np.zeros_like(y)
    print(f"bench-256 at {artifacts}: batch 1, guidance {sampling.guidance}, jacobi {sampling.jacobi}")
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        for name, array in (("noise", noise), ("y", y), ("y_null", y_null)):
            np.save(work / f"{name}.npy", array)
        for threads in args.threads:
            pipe = Pipeline.load(artifacts, threads=threads)
            command = [str(RUN), "--artifacts", str(artifacts), "--noise", str(work / "noise.npy")]
            command += ["--text", str(work / "y.npy"), "--text-uncond", str(work / "y_null.npy")]
            command += ["--guidance", str(sampling.guidance), "--block-size", str(sampling.jacobi.block_size)]
            command += [
                "--max-iter",
                str(sampling.jacobi.max_iter),
                "--threshold",
                str(sampling.jacobi.threshold),
            ]
            command += ["--threads", str(threads), "--repeat", "2", "--out", str(work / "cpp.npy")]
            command += ["--stats", str(work / "stats.json")]
            pipe.sample(noise, y, y_null, sampling)  # warm-up
            python, cpp = [], []
            for _ in range(args.rounds):
                began = time.perf_counter()
                ref, stats = pipe.sample(noise, y, y_null, sampling, return_stats=True)
                python.append(time.perf_counter() - began)
                out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
                warm = next(line for line in out.splitlines() if line.startswith("sample 2:"))
                cpp.append(float(warm.split()[-2]))  # the second (warm) run
            ours = np.load(work / "cpp.npy")
            calls = sum(s["evaluations"] for s in json.loads((work / "stats.json").read_text()))
            same_calls = calls == sum(s.evaluations for s in stats)
            p, c = statistics.median(python), statistics.median(cpp)
            print(
                f"threads {threads}: python {p * 1e3:.1f} ms, c++ {c * 1e3:.1f} ms per sample "
                f"(medians of {args.rounds} interleaved rounds): c++ {p / c:.2f}x python; "
                f"{calls} block calls (same: {same_calls}), max |c++ - python| {np.abs(ours - ref).max():.1e}"
            )


if __name__ == "__main__":
    main()
