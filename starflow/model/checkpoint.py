"""Loading official `.pth` state dicts and our `.safetensors` (config embedded), strictly, and
reading training checkpoints without trusting them.

The official loader uses `strict=False`, which hides mistakes. Here every missing or unexpected
key is an error, except the deprecated buffers official checkpoints still carry. Pickles are
never trusted: `.pth` files load with `torch.load(weights_only=True)`, and a distributed
checkpoint's `.metadata` (a pickle that torch reads with plain `pickle.load`) through
`SafeCheckpointReader`, which admits only the classes torch's checkpoint format writes.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemReader

from starflow.core.atomic import atomic_path
from starflow.core.config import StarFlowConfig, config_from_dict, load_config
from starflow.core.errors import StarflowError
from starflow.model.flow import StarFlow

# Zero/one buffers of the official code that no computation reads.
DEPRECATED_KEYS = re.compile(r"^(var|feat_rope\.freqs_(cos|sin)|blocks\.\d+\.attn_mask)$")
CONFIG_METADATA_KEY = "starflow_config"


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], StarFlowConfig | None]:
    """Tensors of a checkpoint, plus the embedded config of our `.safetensors` files."""
    path = Path(path)
    if not path.is_file():
        raise StarflowError(f"checkpoint {path}: no such file")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except (SafetensorError, OSError, ValueError) as err:
            raise StarflowError(f"checkpoint {path}: corrupt or truncated safetensors file ({err})") from None
        config = None
        if CONFIG_METADATA_KEY in metadata:
            try:
                config = config_from_dict(
                    json.loads(metadata[CONFIG_METADATA_KEY]), f"checkpoint {path} config"
                )
            except json.JSONDecodeError as err:
                raise StarflowError(f"checkpoint {path}: embedded config is not valid JSON ({err})") from None
        return tensors, config
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise StarflowError(
            f"checkpoint {path}: corrupt or truncated ({type(err).__name__}: {err})"
        ) from None
    except Exception as err:  # the unpickler rejects non-tensor objects with its own error type
        raise StarflowError(
            f"checkpoint {path}: not a plain state_dict ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = list(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise StarflowError(
            f"checkpoint {path}: expected a flat module state_dict of tensors (as the official "
            f"release saves), got {keys}; unwrap it first (for example state['model'])"
        )
    return dict(state), None


def infer_txt_dim(config: StarFlowConfig, state: dict[str, torch.Tensor]) -> StarFlowConfig:
    """Official YAMLs omit txt_dim (the text encoder's width): read it from proj_txt."""
    if config.txt_dim > 0:
        return config
    deep = config.num_blocks - 1
    weight = state.get(f"blocks.{deep}.proj_txt.weight")
    if weight is None:
        return config
    return dataclasses.replace(config, txt_dim=weight.shape[1])


def load_into(model: StarFlow, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load that lists every missing/unexpected key and names shape mismatches; the
    checkpoint's tensors are assigned (not copied) to the model's parameters."""
    state = {k: v for k, v in state.items() if not DEPRECATED_KEYS.match(k)}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise StarflowError(
            f"checkpoint {source} does not match the config: "
            f"{len(missing)} missing key(s) {missing[:20]}, {len(unexpected)} unexpected key(s) "
            f"{unexpected[:20]}"
        )
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise StarflowError(
                f"checkpoint {source}: key '{key}' has shape {tuple(tensor.shape)}, the config "
                f"expects {tuple(expected[key].shape)}"
            )
    # the model may be unallocated (meta): its weights become the checkpoint's tensors, in its dtypes
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True, assign=True)


def load_model(
    config_path: str | Path | StarFlowConfig | None,
    checkpoint_path: str | Path,
    device: str | torch.device = "cpu",
) -> StarFlow:
    """A model in eval mode from an official `.pth` + YAML, or our `.safetensors` alone."""
    state, embedded = read_state_dict(checkpoint_path)
    if isinstance(config_path, StarFlowConfig):
        config = config_path
    elif config_path is not None:
        config = load_config(config_path)
    elif embedded is not None:
        config = embedded
    else:
        raise StarflowError(
            f"checkpoint {checkpoint_path}: carries no config; pass the YAML config it was trained with"
        )
    config = infer_txt_dim(config, state)
    # built unallocated and given the checkpoint's tensors: a random init beside the loaded weights
    # doubled a load's peak memory (10.5 GiB for the 5.5 GiB of the 3B-shaped model)
    with torch.device("meta"):
        model = StarFlow(config)
    load_into(model, state, str(checkpoint_path))
    return model.to(device).eval()


def save_model(model: StarFlow, path: str | Path) -> None:
    """Write weights + embedded config as `.safetensors`, atomically (temp name, then rename)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise StarflowError(f"checkpoint {path}: our checkpoints are written as .safetensors")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    config = {k: v for k, v in model.config.to_dict().items() if k != "extra"}
    metadata = {CONFIG_METADATA_KEY: json.dumps(config)}
    with atomic_path(path) as tmp:
        save_file(state, tmp, metadata=metadata)


# ---- distributed (training) checkpoints -----------------------------------------------------------
_CHECKPOINT_CLASSES = {
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
}
_CHECKPOINT_MODULE = "torch.distributed.checkpoint.metadata"  # its dataclasses and enums


class _MetadataUnpickler(pickle.Unpickler):
    """Only what torch's checkpoint metadata holds; anything else (an os.system call) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = (module, name) in _CHECKPOINT_CLASSES or module == _CHECKPOINT_MODULE
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            allowed = True
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")
        return super().find_class(module, name)


def read_checkpoint_metadata(checkpoint: Path) -> Any:
    """A distributed checkpoint's `.metadata`, through the restricted unpickler.

    Call it before `dcp.load` for a clear error: inside a load, torch wraps a reader's errors.
    """
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(checkpoint) / ".metadata"
    try:
        with open(path, "rb") as stream:
            metadata = _MetadataUnpickler(stream).load()
    except OSError as err:
        raise StarflowError(f"checkpoint {checkpoint}: cannot read its .metadata ({err.strerror})") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, ImportError) as err:
        raise StarflowError(f"checkpoint {checkpoint}: refused its .metadata ({err})") from None
    if not isinstance(metadata, Metadata):
        raise StarflowError(f"checkpoint {checkpoint}: its .metadata holds a {type(metadata).__name__}")
    return metadata


class SafeCheckpointReader(FileSystemReader):
    """torch's FileSystemReader with `.metadata` read by the restricted unpickler (torch's own
    reader uses plain `pickle.load`, which runs whatever a crafted file asks)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.metadata import StorageMeta

        if kwargs.get("rank") is not None:  # rank-local metadata: our checkpoints have none
            raise FileNotFoundError(f"{self.path}: no rank-local metadata")
        metadata = read_checkpoint_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
