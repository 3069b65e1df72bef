"""The import layers of pyproject.toml hold, and the check fails when one is broken."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHECK = REPO / "scripts" / "check_layers.py"


def check(repo: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CHECK), str(repo)], capture_output=True, text=True, timeout=300
    )


def test_layers_hold() -> None:
    result = check(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def copy_sources(into: Path) -> None:
    shutil.copyfile(REPO / "pyproject.toml", into / "pyproject.toml")
    for folder in ("starflow", "export", "runtime", "cli"):
        shutil.copytree(REPO / folder, into / folder, ignore=shutil.ignore_patterns("assets", "__pycache__"))


def test_an_import_up_the_layers_is_caught(tmp_path: Path) -> None:
    """A lazy import of the torch model from the torch-free runtime breaks the layers contract."""
    copy_sources(tmp_path)
    with open(tmp_path / "runtime" / "pipeline.py", "a") as f:
        f.write("\n\ndef _upward() -> None:\n    from starflow.model.flow import StarFlow  # noqa: F401\n")
    result = check(tmp_path)
    assert result.returncode != 0
    assert "starflow.runtime is not allowed to import starflow.model" in result.stdout


def test_a_cycle_between_export_modules_is_caught(tmp_path: Path) -> None:
    copy_sources(tmp_path)
    with open(tmp_path / "export" / "graphs.py", "a") as f:
        f.write("\n\ndef _cycle() -> None:\n    from starflow.export import validate  # noqa: F401\n")
    result = check(tmp_path)
    assert result.returncode != 0
    assert "No cycles are allowed in starflow.export" in result.stdout
