"""How close starflow comes to the official release's golden tensors (the shared tiny fixture).

Prints the max absolute error of the PyTorch reference (forward z, logdets, sequential and
Jacobi samples with and without guidance) and of the same samples through an fp32 and fp16
export driven by the torch-free runtime. The tests assert limits (1e-5 / 1e-4 / 2e-3); this
prints the numbers.

    python benchmarks/parity.py [--fixtures ../shared/fixtures]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

import starflow
from starflow.core.sampler import JacobiSettings, SampleOptions
from starflow.export.onnx import ExportOptions, export_onnx
from starflow.runtime import Pipeline

JACOBI = JacobiSettings(block_size=16, max_iter=64, threshold=1e-6)  # the fixture's settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--fixtures", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "fixtures"
    )
    fixture = parser.parse_args().fixtures / "official-t2i-tiny"
    golden = load_file(fixture / "golden.safetensors")
    model = starflow.load_model(fixture / "config.yaml", fixture / "checkpoint.pth")

    import torch

    tensors = {k: torch.from_numpy(v) for k, v in golden.items()}
    out = model(tensors["x"], tensors["y"])
    print(f"pytorch forward z: {np.abs(out.z.detach().numpy() - golden['forward.z']).max():.2e}")
    for i, logdet in enumerate(out.logdets):
        print(
            f"pytorch logdet {i}: {np.abs(logdet.detach().numpy() - golden[f'forward.logdet.{i}']).max():.2e}"
        )
    with tempfile.TemporaryDirectory() as work:
        export_onnx(
            fixture / "checkpoint.pth",
            Path(work) / "a",
            ExportOptions(denoise=False),
            config=fixture / "config.yaml",
        )
        engines = {"pytorch": model} | {
            p: Pipeline.load(Path(work) / "a", precision=p) for p in ("fp32", "fp16")
        }
        for name, engine in engines.items():
            for method in ("sequential", "jacobi"):
                for guided in (False, True):
                    options = SampleOptions(1.5 if guided else 0.0, method, JACOBI)
                    inputs = tensors if name == "pytorch" else golden
                    sample = engine.sample(
                        inputs["noise"], inputs["y"], inputs["y_null"] if guided else None, options
                    )
                    sample = sample.numpy() if name == "pytorch" else sample
                    key = f"reverse.{method}" + (".cfg" if guided else "")
                    print(f"{name} {key}: {np.abs(sample - golden[key]).max():.2e}")


if __name__ == "__main__":
    main()
