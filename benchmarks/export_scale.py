"""Scale check of `starflow export onnx` on the 3B model's shapes (deep block cut to 2 layers).

Makes a random perturbed model of a preset (default `starflow-3b-deep2`: width 3072, 48 heads,
128 text tokens, 32x32 latent), saves it, exports fp32 + fp16 with validation in a child
process (so its peak RSS is the export's alone), and reports time, file sizes, peak RSS and the
validation errors. Then it measures what fp16 LayerNorm would cost in accuracy on the deep
block (the shipped fp16 keeps it fp32; attention scores and softmax are fp32 in every graph).
Not a test: it needs ~30 GB of disk.

    python benchmarks/export_scale.py [--preset NAME | --config C --checkpoint P] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from starflow.contract.manifest import Manifest
from starflow.core.config import load_config
from starflow.export.defaults import DEFAULT_OPSET
from starflow.export.graphs import Precision, block_specs
from starflow.export.trace import export_block_graph
from starflow.export.validate import reference, shape_cases
from starflow.model.checkpoint import load_model, save_model
from starflow.model.testing import random_model
from starflow.runtime.backends import OrtRunner


def worst_errors(manifest: Manifest) -> dict[str, dict[str, float]]:
    """Per precision and tensor: the largest error relative to max|reference|, and its limit."""
    out: dict[str, dict[str, float]] = {}
    for v in manifest.validation:
        precision = v.graph.rsplit(".", 1)[1]
        key = f"{v.graph.split('.')[1]}.{v.tensor}"
        rel = v.max_abs_error / max(v.max_abs_reference, 1e-12)
        out.setdefault(precision, {})
        out[precision][key] = max(out[precision].get(key, 0.0), rel)
    return out


def fp16_policy_errors(checkpoint: Path, config: str | None, work: Path) -> dict[str, dict[str, float]]:
    """Deep-block step/forward errors vs PyTorch with LayerNorm in fp32 and in fp16 (attention
    scores and softmax are fp32 in every graph: the model computes them so)."""
    model = load_model(config, checkpoint)
    block = model.sampling_blocks()[0]
    manifest = Manifest.load(work / "export", verify_files=False)
    case = shape_cases(manifest)[0]
    ref = reference(block, model.config.txt_dim, case, seed=0)
    results = {}
    for label, precision in {
        "norms fp32": Precision("fp16", fp32_norms=True),
        "norms fp16": Precision("fp16", fp32_norms=False),
    }.items():
        errors = {}
        for spec in block_specs(model.config, block, "fp16"):
            if spec.kind == "prefill":
                continue
            path = work / f"policy-{spec.file}"
            export_block_graph(spec, block, precision, path, DEFAULT_OPSET)
            data = ref[spec.kind]
            feeds = {t.name: data[f"in:{t.name}"].astype(t.dtype) for t in spec.inputs}
            outputs = OrtRunner(spec.name, path, few_runs=True).run(feeds)
            for t in spec.outputs:
                actual, expected = outputs[t.name], data[t.name]
                error = float(np.abs(actual.astype(np.float64) - expected).max())
                errors[f"{spec.kind}.{t.name}"] = error / float(np.abs(expected).max())
            path.unlink()
            path.with_name(path.name + ".data").unlink(missing_ok=True)
        results[label] = errors
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="starflow-3b-deep2")
    parser.add_argument("--config", help="YAML config of --checkpoint (instead of a random preset model)")
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temporary one, removed)")
    parser.add_argument(
        "--denoise", action="store_true", help="also the denoise graph (recorded runs: the 26 flow graphs)"
    )
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="starflow-export-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"preset": args.preset if args.checkpoint is None else str(args.checkpoint)}
    try:
        checkpoint, config = args.checkpoint, args.config
        if checkpoint is None:
            began = time.perf_counter()
            model = random_model(load_config(args.preset))
            report["parameters"] = sum(p.numel() for p in model.parameters())
            checkpoint = work / "model.safetensors"
            save_model(model, checkpoint)
            del model
            report["make_checkpoint_s"] = round(time.perf_counter() - began, 1)
        command = [sys.executable, "-m", "starflow.cli", "export", "onnx", "--checkpoint", str(checkpoint)]
        command += ["--out", str(work / "export"), "--force"] + (["--config", config] if config else [])
        command += [] if args.denoise else ["--no-denoise"]
        began = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        report["export_s"] = round(time.perf_counter() - began, 1)
        report["export_peak_rss_gib"] = round(
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2
        )
        report["export_exit"] = done.returncode
        report["export_output"] = (done.stdout + done.stderr).strip().splitlines()[-12:]
        if done.returncode == 0:
            manifest = Manifest.load(work / "export", verify_files=False)
            sizes: dict[str, float] = {}
            for g in manifest.graphs:
                size = g.bytes + sum(e.bytes for e in g.external_data)
                sizes[g.precision] = sizes.get(g.precision, 0) + size / 2**30
            report["size_gib"] = {k: round(v, 2) for k, v in sizes.items()}
            report["external_data_graphs"] = sum(1 for g in manifest.graphs if g.external_data)
            report["tolerance"] = {k: vars(v.tolerance) for k, v in manifest.precisions.items()}
            report["worst_relative_error"] = worst_errors(manifest)
            began = time.perf_counter()
            report["fp16_policy_relative_error"] = fp16_policy_errors(checkpoint, config, work)
            report["fp16_policy_s"] = round(time.perf_counter() - began, 1)
        print(json.dumps(report, indent=2))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
