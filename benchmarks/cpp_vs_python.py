"""libstarflow (C++) against the Python runtime: the same export, ONNX Runtime library and threads.

Two cases:
- `image`: `bench-256` (the `starflow bench` preset: batch 1, guidance 2, Jacobi block 64);
- `video`: the embedded moving-digits model, one 8-frame 10x10 clip of "3" with the export's
  official settings (guidance 2, frame-local shallow blocks, the video Jacobi rules).
Each samples with `Pipeline.sample` in this process and `starflow-run` in a subprocess, in
alternating rounds, and prints median seconds per sample (the C++ side times its own sample call,
so process start and session creation are excluded on both sides), the ratio, the block calls and
the agreement of the two latents. Both load the onnxruntime wheel's libonnxruntime (the C++ build
copies it beside libstarflow).

    make cpp
    .venv/bin/python benchmarks/cpp_vs_python.py [--cases image video] [--rounds 7] [--threads 1 2]
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
from starflow.core.sampler import SampleOptions
from starflow.export.cache import demo_artifacts
from starflow.runtime import Generator, Pipeline

RUN = Path(__file__).resolve().parents[1] / "build" / "cpp" / "starflow-run"
CLIP_FRAMES = 8


def image_case() -> tuple[Path, SampleOptions, dict[str, np.ndarray]]:
    options = BenchOptions()
    _, artifacts = prepare(options)
    rng = np.random.default_rng(0)
    y = rng.standard_normal((1, 16, 64), dtype=np.float32)
    arrays = {"noise": rng.standard_normal((1, 4, 16, 16), dtype=np.float32), "text": y}
    return artifacts, options.sampling, arrays | {"text-uncond": np.zeros_like(y)}


def video_case() -> tuple[Path, SampleOptions, dict[str, np.ndarray]]:
    artifacts = demo_artifacts(video=True)
    generator = Generator.load(artifacts, threads=1)
    side = generator.manifest.latent.train
    noise = np.random.default_rng(0).standard_normal((1, CLIP_FRAMES, 1, *side), dtype=np.float32)
    arrays = {"noise": noise, "text": generator.encode(["3"]), "text-uncond": generator.encode([""])}
    return artifacts, generator.default_sampling(), arrays


CASES = {"image": image_case, "video": video_case}


def compare(
    name: str, artifacts: Path, sampling: SampleOptions, arrays: dict, threads: int, rounds: int
) -> None:
    """`rounds` alternating Python and C++ samples at `threads` intra-op threads; prints one line."""
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        command = [str(RUN), "--artifacts", str(artifacts), "--threads", str(threads), "--repeat", "2"]
        for key, array in arrays.items():
            np.save(work / f"{key}.npy", array)
            command += [f"--{key}", str(work / f"{key}.npy")]
        jacobi = sampling.jacobi
        command += ["--guidance", str(sampling.guidance), "--block-size", str(jacobi.block_size)]
        command += ["--max-iter", str(jacobi.max_iter), "--threshold", str(jacobi.threshold)]
        command += ["--out", str(work / "cpp.npy"), "--stats", str(work / "stats.json")]
        pipe = Pipeline.load(artifacts, threads=threads)
        inputs = (arrays["noise"], arrays["text"], arrays["text-uncond"], sampling)
        pipe.sample(*inputs)  # warm-up
        python, cpp = [], []
        for _ in range(rounds):
            began = time.perf_counter()
            ref, stats = pipe.sample(*inputs, return_stats=True)
            python.append(time.perf_counter() - began)
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            warm = next(line for line in out.splitlines() if line.startswith("sample 2:"))
            cpp.append(float(warm.split()[-2]))  # the second (warm) run
        ours = np.load(work / "cpp.npy")
        calls = sum(s["evaluations"] for s in json.loads((work / "stats.json").read_text()))
        same_calls = calls == sum(s.evaluations for s in stats)
        p, c = statistics.median(python), statistics.median(cpp)
        print(
            f"{name}, threads {threads}: python {p * 1e3:.1f} ms, c++ {c * 1e3:.1f} ms per sample "
            f"(medians of {rounds} interleaved rounds): c++ {p / c:.2f}x python; "
            f"{calls} block calls (same: {same_calls}), max |c++ - python| {np.abs(ours - ref).max():.1e}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    if not RUN.is_file():
        raise SystemExit(f"{RUN} is not built: run `make cpp`")
    for name in args.cases:
        artifacts, sampling, arrays = CASES[name]()
        shape, jacobi = arrays["noise"].shape, sampling.jacobi
        print(f"{name}: {artifacts}, input {shape}, guidance {sampling.guidance}, {jacobi}")
        for threads in args.threads:
            compare(name, artifacts, sampling, arrays, threads, args.rounds)


if __name__ == "__main__":
    main()
