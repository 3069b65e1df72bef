"""Exports made on demand and kept under the cache directory (`STARFLOW_CACHE`, ~/.cache/starflow).

`starflow generate` without `--artifacts` and `starflow demo` drive the embedded digits model
through the runtime; its export is made on first use and reused while the checkpoint and the
manifest schema are unchanged. A file lock makes concurrent first uses export once; under it,
a broken entry (a file where the directory belongs, a partial or tampered export) is replaced
and the temporary directories of killed exports are removed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from filelock import FileLock

from starflow.contract.manifest import SCHEMA_VERSION, Manifest, sha256
from starflow.core.config import DEMO_CHECKPOINT, DEMO_VIDEO_CHECKPOINT
from starflow.core.errors import StarflowError
from starflow.core.sampling_presets import DIGITS_PRESETS, load_presets

LOCK_TIMEOUT_S = 3600  # another process's first-use export takes minutes, not hours


def cache_dir() -> Path:
    return Path(os.environ.get("STARFLOW_CACHE") or Path.home() / ".cache" / "starflow")


def demo_artifacts(progress=None, video: bool = False) -> Path:
    """An embedded model's fp32 sampling export: step/prefill graphs, label-table text encoder,
    denoise graph (no density graphs: sampling does not use them), and the digits model's
    calibrated sampling presets; `video`: the moving-digits model's."""
    return demo_export(progress, video)[0]


def demo_export(progress=None, video: bool = False) -> tuple[Path, bool]:
    """`demo_artifacts`, and whether this call exported it (False: it was in the cache), so a
    caller reports an export only when one happened."""
    checkpoint, name = (DEMO_VIDEO_CHECKPOINT, "digits-video") if video else (DEMO_CHECKPOINT, "digits")
    if not checkpoint.is_file():
        raise StarflowError(f"the embedded model {checkpoint} is missing from this installation")
    digest = sha256(checkpoint)
    presets = sha256(DIGITS_PRESETS)[:8] if DIGITS_PRESETS.is_file() and not video else "none"
    directory = cache_dir() / "demo" / f"{name}-{digest[:12]}-presets{presets}-schema{SCHEMA_VERSION}"
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StarflowError(
            f"cache {directory.parent}: cannot create it ({err.strerror}); set STARFLOW_CACHE"
        ) from None
    with FileLock(directory.parent / f"{directory.name}.lock", timeout=LOCK_TIMEOUT_S):
        try:
            if Manifest.load(directory).source.sha256 == digest:
                return directory, False
        except StarflowError:
            pass  # absent, partial or tampered: export it again
        _clear(directory)
        try:
            from starflow.export.onnx_export import ExportOptions, export_onnx
        except ImportError as err:
            raise StarflowError(
                f"the demo model's artifacts are not in {directory} yet, and exporting them needs torch "
                f"and onnx ({err.name} is missing): pip install 'starflow[torch,onnx]', "
                "or pass an export's directory"
            ) from None
        calibrated = load_presets(DIGITS_PRESETS) if DIGITS_PRESETS.is_file() and not video else {}
        options = ExportOptions(precisions=("fp32",), density=False, force=True, sampling_presets=calibrated)
        export_onnx(checkpoint, directory, options, progress=progress)
    return directory, True


def _clear(directory: Path) -> None:
    """Remove a broken entry and the leftovers of killed exports of it (the caller holds its lock)."""
    for stale in directory.parent.glob(f".{directory.name}.*-*"):  # .partial-* and .old-* of export_onnx
        shutil.rmtree(stale, ignore_errors=True)
    if directory.is_symlink() or directory.is_file():
        directory.unlink()
    elif directory.exists():
        shutil.rmtree(directory)
