"""Exports made on demand and kept under the cache directory (`STARFLOW_CACHE`, ~/.cache/starflow).

`starflow generate` without `--artifacts` and `starflow demo` drive the embedded digits model
through the runtime; its export is made on first use and reused while the checkpoint and the
manifest schema are unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

from starflow.config import DEMO_CHECKPOINT
from starflow.errors import StarflowError
from starflow.export.manifest import SCHEMA_VERSION, Manifest, sha256


def cache_dir() -> Path:
    return Path(os.environ.get("STARFLOW_CACHE") or Path.home() / ".cache" / "starflow")


def demo_artifacts(progress=None) -> Path:
    """The embedded model's fp32 sampling export: step/prefill graphs, label-table text encoder,
    denoise graph (no density graphs: sampling does not use them)."""
    digest = sha256(DEMO_CHECKPOINT)
    directory = cache_dir() / "demo" / f"digits-{digest[:12]}-schema{SCHEMA_VERSION}"
    try:
        if Manifest.load(directory).source.sha256 == digest:
            return directory
    except StarflowError:
        pass  # absent, partial or tampered: export it again
    try:
        from starflow.export.onnx_export import ExportOptions, export_onnx
    except ImportError as err:
        raise StarflowError(
            f"the demo model's artifacts are not in {directory} yet, and exporting them needs torch "
            f"and onnx ({err.name} is missing): pip install 'starflow[torch,onnx]', "
            "or pass an export's directory"
        ) from None
    options = ExportOptions(precisions=("fp32",), density=False, force=True)
    export_onnx(DEMO_CHECKPOINT, directory, options, progress=progress)
    return directory
