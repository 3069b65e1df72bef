"""Shared pytest setup: fixture path and the `gpu` marker auto-skip."""

from pathlib import Path

import pytest

# Shared fixtures live beside the repo: <parent>/shared/fixtures.
FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


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
