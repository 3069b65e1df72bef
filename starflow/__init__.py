"""starflow: the STARFlow reference model in PyTorch, and the root of the export/runtime toolchain.

`starflow.runtime` must import without torch, so this module imports torch lazily: the model
names below resolve on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starflow.core.config import DEMO_CHECKPOINT, PRESETS, StarFlowConfig, load_config
from starflow.core.errors import StarflowError

if TYPE_CHECKING:
    from starflow.model.checkpoint import load_model, save_model
    from starflow.model.flow import StarFlow

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
    "StarFlow": "starflow.model.flow",
    "load_model": "starflow.model.checkpoint",
    "save_model": "starflow.model.checkpoint",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'starflow' has no attribute {name!r}")
