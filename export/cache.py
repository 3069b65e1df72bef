"""Exports made on demand and kept under the cache directory (`STARFLOW_CACHE`, ~/.cache/starflow).

`starflow generate` without `--artifacts` and `starflow demo` drive the embedded digits model
through the runtime, and `starflow bench` a preset's random model; each export is made on first
use (`cached_export`) and reused while its key (checkpoint, options, manifest schema) is
unchanged. A file lock makes concurrent first uses export once; under it, a broken entry (a file
where the directory belongs, a partial or tampered export) is replaced and the partial
directories of killed exports are removed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from filelock import FileLock

from starflow.contract.manifest import SCHEMA_VERSION, Manifest, sha256
from starflow.core.atomic import remove_stale
from starflow.core.config import DEMO_CHECKPOINT, DEMO_VIDEO_CHECKPOINT
from starflow.core.errors import StarflowError
from starflow.core.sampling_presets import DIGITS_PRESETS, load_presets

LOCK_TIMEOUT_S = 3600  # another process's first-use export takes minutes, not hours


def cache_dir() -> Path:
    return Path(os.environ.get("STARFLOW_CACHE") or Path.home() / ".cache" / "starflow")


def demo_artifacts(progress=None, video: bool = False) -> Path:
    """An embedded model's fp32 sampling export: step/prefill graphs, label-table text encoder,
    denoise graph, density graphs (the likelihood a server reports), and the digits model's
    calibrated sampling presets; `video`: the moving-digits model's."""
    return demo_export(progress, video)[0]


def demo_export(progress=None, video: bool = False) -> tuple[Path, bool]:
    """`demo_artifacts`, and whether this call exported it (False: it was in the cache), so a
    caller reports an export only when one happened."""
    checkpoint, name = (DEMO_VIDEO_CHECKPOINT, "digits-video") if video else (DEMO_CHECKPOINT, "digits")
    if not checkpoint.is_file():
        raise StarflowError(f"the embedded model {checkpoint} is missing from this installation")
    calibrated = DIGITS_PRESETS.is_file() and not video
    presets = sha256(DIGITS_PRESETS)[:8] if calibrated else "none"
    key = f"{name}-{sha256(checkpoint)[:12]}-presets{presets}-schema{SCHEMA_VERSION}"
    options = {
        "precisions": ("fp32",),
        "density": True,
        "sampling_presets": load_presets(DIGITS_PRESETS) if calibrated else {},
    }
    return cached_export(cache_folder("demo") / key, checkpoint, options, progress)


def cache_folder(name: str) -> Path:
    """The cache's folder `name`, created if need be."""
    folder = cache_dir() / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StarflowError(
            f"cache {folder}: cannot create it ({err.strerror}); set STARFLOW_CACHE"
        ) from None
    return folder


def cached_export(
    directory: Path, checkpoint: Path, options: dict[str, Any], progress=None
) -> tuple[Path, bool]:
    """`checkpoint` exported with `ExportOptions(**options)` into `directory`, an entry of a
    `cache_folder` whose name is the caller's key (everything but the checkpoint that decides the
    export), unless it already holds a complete export of this checkpoint. Returns the entry and
    whether this call exported it; torch and onnx load only when it does."""
    digest = sha256(checkpoint)
    with FileLock(directory.parent / f"{directory.name}.lock", timeout=LOCK_TIMEOUT_S):
        try:
            if Manifest.load(directory).source.sha256 == digest:
                return directory, False
        except StarflowError:
            pass  # absent, partial or tampered: export it again
        _clear(directory)
        try:
            from starflow.export.onnx import ExportOptions, export_onnx
        except ImportError as err:
            raise StarflowError(
                f"the export {directory} is not in the cache yet, and exporting it needs torch and onnx "
                f"({err.name} is missing): pip install 'starflow[torch,onnx]', or pass an export's directory"
            ) from None
        export_onnx(checkpoint, directory, ExportOptions(**options, force=True), progress=progress)
    return directory, True


def _clear(directory: Path) -> None:
    """Remove a broken entry and the partials of killed exports of it (the caller holds its lock;
    a live export into the entry by other means keeps its partial)."""
    remove_stale(directory.parent, directory.name)
    if directory.is_symlink() or directory.is_file():
        directory.unlink()
    elif directory.exists():
        shutil.rmtree(directory)
