"""ONNX export of the STARFlow reference model: per-block graphs, manifest.json, validation.

Light to import: the exporter (torch, onnx) loads on first use of `export_onnx`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from starflow.export.onnx import export_onnx
    from starflow.export.validate import validate_directory

__all__ = ["export_onnx", "validate_directory"]

_LAZY = {"export_onnx": "starflow.export.onnx", "validate_directory": "starflow.export.validate"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'starflow.export' has no attribute {name!r}")
