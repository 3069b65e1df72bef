"""starflow: the STARFlow reference model in PyTorch, and the root of the export/runtime toolchain.

`starflow.runtime` must import without torch, so this module imports torch lazily: the model
names below resolve on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starflow.config import DEMO_CHECKPOINT, PRESETS, StarFlowConfig, load_config
from starflow.errors import StarflowError

if TYPE_CHECKING:
    from starflow.checkpoint import load_model, save_model
    from starflow.model import StarFlow

__all__ = [
    "DEMO_CHECKPOINT",
    "PRESETS",
    "StarFlow",
    "StarFlowConfig",
    "StarflowError",
    "load_config",
    "load_model",
    "save_model",
]

_LAZY = {
    "StarFlow": "starflow.model",
    "load_model": "starflow.checkpoint",
    "save_model": "starflow.checkpoint",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'starflow' has no attribute {name!r}")
