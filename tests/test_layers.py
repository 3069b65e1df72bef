"""The import layers of pyproject.toml hold, and the check fails when one is broken."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.parametrize(
    "module, lazy_import, broken",
    [  # a lazy import of the torch model from the torch-free runtime; a cycle inside export/
        (
            "runtime/pipeline.py",
            "from starflow.model.flow import StarFlow",
            "starflow.runtime is not allowed to import starflow.model",
        ),
        (
            "export/graphs.py",
            "from starflow.export import validate",
            "No cycles are allowed in starflow.export",
        ),
    ],
)
def test_a_broken_layer_is_caught(tmp_path: Path, module: str, lazy_import: str, broken: str) -> None:
    copy_sources(tmp_path)
    with open(tmp_path / module, "a") as f:
        f.write(f"\n\ndef _added() -> None:\n    {lazy_import}  # noqa: F401\n")
    result = check(tmp_path)
    assert result.returncode != 0
    assert broken in result.stdout
