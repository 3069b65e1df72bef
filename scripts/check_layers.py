"""Check the import layers of pyproject.toml's [tool.importlinter] with import-linter.

The root folders map into one namespace (starflow/ -> starflow, export/ -> starflow.export,
runtime/ -> starflow.runtime, cli/ -> starflow.cli), which import-linter cannot follow: it walks
the folder of the root package only. So the Python files are staged as one package tree in a
temporary folder and the contracts are checked there. Exit status: import-linter's.
usage: python scripts/check_layers.py [REPO]   (default: this checkout)
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

FOLDERS = {
    "starflow": "starflow",
    "export": "starflow/export",
    "runtime": "starflow/runtime",
    "cli": "starflow/cli",
}


def stage(repo: Path, into: Path) -> None:
    """Copy every .py file of the four folders to where its module name puts it."""
    for folder, package in FOLDERS.items():
        for source in (repo / folder).rglob("*.py"):
            target = into / package / source.relative_to(repo / folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)


def main(repo: Path) -> int:
    from importlinter.cli import lint_imports

    with tempfile.TemporaryDirectory(prefix="starflow-layers-") as tree:
        stage(repo, Path(tree))
        os.chdir(tree)  # import-linter puts the working directory first on sys.path
        sys.modules.pop("starflow", None)
        return lint_imports(config_filename=str(repo / "pyproject.toml"), no_cache=True)


if __name__ == "__main__":
    sys.exit(
        main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent).resolve())
    )
