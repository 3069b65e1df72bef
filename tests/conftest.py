"""Shared pytest setup: fixture path and the `gpu` marker auto-skip."""

import os
from pathlib import Path

import pytest

# Shared fixtures live beside the repo (<parent>/shared/fixtures) unless STARFLOW_FIXTURES says where.
FIXTURES = Path(
    os.environ.get("STARFLOW_FIXTURES", Path(__file__).resolve().parents[1].parent / "shared" / "fixtures")
)
T2I = FIXTURES / "official-t2i-tiny"


@pytest.fixture(scope="session")
def fixture_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The official tiny T2I fixture exported once per test session, as a user would: through the
    CLI, fp32 and fp16, validation on. Tests that modify it must work on a copy."""
    if not T2I.is_dir():
        pytest.skip(f"shared fixtures not found at {T2I}")
    from typer.testing import CliRunner

    from starflow.cli.main import app

    out = tmp_path_factory.mktemp("fixture-export") / "artifacts"
    args = [
        "export",
        "onnx",
        "--config",
        str(T2I / "config.yaml"),
        "--checkpoint",
        str(T2I / "checkpoint.pth"),
    ]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items or _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is false)")
    for item in gpu_items:
        item.add_marker(skip)
