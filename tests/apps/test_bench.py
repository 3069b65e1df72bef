"""starflow.apps.bench: a preset's export is made once, through the export cache (export/cache.py)."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

from starflow.apps import bench
from starflow.contract.manifest import SCHEMA_VERSION, sha256
from starflow.core.errors import StarflowError
from starflow.export import cache


class MarkerManifest:
    """Stands in for the manifest: the checkpoint digest a fake export wrote."""

    @staticmethod
    def load(directory: Path) -> SimpleNamespace:
        try:
            digest = (directory / "source.sha256").read_text()
        except OSError:
            raise StarflowError(f"{directory}: no export") from None
        return SimpleNamespace(source=SimpleNamespace(sha256=digest))


def test_a_preset_is_exported_once_into_the_cache_and_a_broken_entry_heals(tmp_path, monkeypatch):
    exports = []

    def fake_export(checkpoint: Path, out: Path, options, progress=None) -> None:
        exports.append(options)
        out.mkdir()
        (out / "source.sha256").write_text(sha256(checkpoint))

    monkeypatch.setenv("STARFLOW_CACHE", str(tmp_path))
    monkeypatch.setattr("starflow.export.onnx.export_onnx", fake_export)
    monkeypatch.setattr(cache, "Manifest", MarkerManifest)
    options = bench.BenchOptions(preset="tiny-t2i")
    _, artifacts = bench.prepare(options)
    assert bench.prepare(options)[1] == artifacts and len(exports) == 1
    assert artifacts.parent == tmp_path / "bench" and artifacts.name.endswith(f"-schema{SCHEMA_VERSION}")
    assert (artifacts.parent / f"{artifacts.name}.lock").exists()  # made under the cache's lock
    export = exports[0]
    assert (export.precisions, export.validate, export.denoise, export.force) == (
        ("fp32",),
        False,
        False,
        True,
    )
    shutil.rmtree(artifacts)
    artifacts.write_text("not a directory")
    assert bench.prepare(options)[1] == artifacts and artifacts.is_dir() and len(exports) == 2
