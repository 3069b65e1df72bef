"""Loading official `.pth` state dicts and our `.safetensors` (config embedded), strictly, and
reading training checkpoints without trusting them.

The official loader uses `strict=False`, which hides mistakes. Here every missing or unexpected
key is an error, except the deprecated buffers official checkpoints still carry. Pickles are
never trusted: `.pth` files load with `torch.load(weights_only=True)`, and a distributed
checkpoint's `.metadata` (a pickle that torch reads with plain `pickle.load`) through
`SafeCheckpointReader`, which admits only the classes torch's checkpoint format writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint import FileSystemReader

from starflow.core.atomic import atomic_path
from starflow.core.bounded import parse_json
from starflow.core.config import StarFlowConfig, config_from_dict, load_config
from starflow.core.errors import StarflowError
from starflow.core.limits import release_freed_memory
from starflow.model.flow import StarFlow

# Zero/one buffers of the official code that no computation reads.
DEPRECATED_KEYS = re.compile(r"^(var|feat_rope\.freqs_(cos|sin)|blocks\.\d+\.attn_mask)$")
CONFIG_METADATA_KEY = "starflow_config"
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on a header
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


class CheckpointTensors:
    """A checkpoint's tensors, each read when asked for: `.safetensors` into memory of its own,
    `.pth` memory-mapped by `torch.load(mmap=True)`. Names and shapes come without reading any
    data, so a model larger than memory can be checked whole and then loaded a block at a time.
    (A `.pth`'s fp32 tensors stay views of the mapping: the pages a block touched stay resident,
    as reclaimable page cache, after the block is released.)"""

    def __init__(self, path: str | Path):
        self.path = path = Path(path)
        self.config: StarFlowConfig | None = None  # the config our `.safetensors` carry
        self._tensors: dict[str, torch.Tensor] | None = None  # a `.pth`'s, memory-mapped
        if not path.is_file():
            raise StarflowError(f"checkpoint {path}: no such file")
        if path.suffix == ".safetensors":
            self._open_safetensors()
        else:
            self._open_pickle()

    def _open_safetensors(self) -> None:
        try:
            with safe_open(str(self.path), framework="pt") as checked:  # the header, checked
                metadata = checked.metadata() or {}
                names = list(checked.keys())  # noqa: SIM118 (safe_open has no __iter__)
                self.shapes = {k: tuple(checked.get_slice(k).get_shape()) for k in names}
            self._layout = self._read_layout(names)
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as err:
            raise StarflowError(
                f"checkpoint {self.path}: corrupt or truncated safetensors file ({err})"
            ) from None
        if CONFIG_METADATA_KEY in metadata:
            embedded = parse_json(metadata[CONFIG_METADATA_KEY], f"checkpoint {self.path}: embedded config")
            self.config = config_from_dict(embedded, f"checkpoint {self.path} config")

    def _read_layout(self, names: list[str]) -> dict[str, tuple[torch.dtype, int, int]]:
        """Where each tensor's bytes lie (its dtype, begin, end in the file), from the header
        safe_open has checked, checked again here against this file as it is now (it may have
        been replaced since): every tensor inside the file, its size its shape's, its dtype one
        torch reads."""
        with open(self.path, "rb") as file:
            file_size = os.fstat(file.fileno()).st_size
            size = int.from_bytes(file.read(8), "little")
            if size > min(file_size - 8, MAX_HEADER_BYTES):
                raise ValueError(f"a header of {size} bytes")
            header = parse_json(file.read(size), "the header", max_string=MAX_HEADER_BYTES)
        layout = {}
        for name in names:
            entry = header[name]
            if entry["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(f"tensor {name!r} has dtype {entry['dtype']}, which starflow does not read")
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            begin, end = (8 + size + offset for offset in entry["data_offsets"])
            nbytes = math.prod(self.shapes[name]) * dtype.itemsize
            if not 8 + size <= begin <= end <= file_size or end - begin != nbytes:
                raise ValueError(f"tensor {name!r} lies outside the file or does not fill its shape")
            layout[name] = (dtype, begin, end)
        return layout

    def _open_pickle(self) -> None:
        path = self.path
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
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
        self._tensors = dict(state)
        self.shapes = {k: tuple(v.shape) for k, v in state.items()}

    def tensor(self, key: str) -> torch.Tensor:
        """`key`'s tensor. A `.safetensors` tensor is read into memory of its own (not through a
        mapping of the file, whose pages would stay resident and count as the process's memory:
        8.7 GiB by the 3B model's deep block)."""
        if self._tensors is not None:
            return self._tensors[key]
        dtype, begin, end = self._layout[key]
        if begin == end:  # no elements: nothing to read (torch.frombuffer refuses an empty buffer)
            return torch.empty(self.shapes[key], dtype=dtype)
        buffer = bytearray(end - begin)
        try:
            with open(self.path, "rb") as file:
                file.seek(begin)
                if file.readinto(buffer) != len(buffer):
                    raise ValueError("the file ends inside it")
            return torch.frombuffer(buffer, dtype=dtype).reshape(self.shapes[key])
        except (OSError, ValueError, RuntimeError) as err:
            raise StarflowError(f"checkpoint {self.path}: tensor {key!r} cannot be read ({err})") from None

    def state(self) -> dict[str, torch.Tensor]:
        """Every tensor, read now."""
        return {k: self.tensor(k) for k in self.shapes}


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], StarFlowConfig | None]:
    """Tensors of a checkpoint, plus the embedded config of our `.safetensors` files."""
    tensors = CheckpointTensors(path)
    return tensors.state(), tensors.config


def infer_txt_dim(config: StarFlowConfig, shapes: dict[str, tuple[int, ...]]) -> StarFlowConfig:
    """Official YAMLs omit txt_dim (the text encoder's width): read it from proj_txt."""
    if config.txt_dim > 0:
        return config
    shape = shapes.get(f"blocks.{config.num_blocks - 1}.proj_txt.weight")
    return config if shape is None else dataclasses.replace(config, txt_dim=shape[1])


class StreamedModel:
    """A model built from a checkpoint with its flow blocks' weights left unread (on the meta
    device) until `loaded(index)` asks for them: an export holds one block's weights at a time.

    Every key and shape is checked against the config first, strictly (every missing or
    unexpected key is an error, except the deprecated buffers official checkpoints still carry),
    before any tensor is read.
    """

    def __init__(self, config_path: str | Path | StarFlowConfig | None, checkpoint_path: str | Path):
        self.tensors = tensors = CheckpointTensors(checkpoint_path)
        if isinstance(config_path, StarFlowConfig):
            config = config_path
        elif config_path is not None:
            config = load_config(config_path)
        elif tensors.config is not None:
            config = tensors.config
        else:
            raise StarflowError(
                f"checkpoint {checkpoint_path}: carries no config; pass the YAML config it was trained with"
            )
        # built unallocated and given the checkpoint's tensors: a random init beside the loaded
        # weights doubled a load's peak memory (10.5 GiB for the 5.5 GiB of the 3B-shaped model)
        with torch.device("meta"):
            self.model = StarFlow(infer_txt_dim(config, tensors.shapes))
        self.expected = {k: (tuple(v.shape), v.dtype) for k, v in self.model.state_dict().items()}
        self.keys = [k for k in tensors.shapes if not DEPRECATED_KEYS.match(k)]
        self._check_keys(str(checkpoint_path))
        self._load([k for k in self.keys if not k.startswith("blocks.")])
        self.model.eval()

    def _check_keys(self, source: str) -> None:
        missing = sorted(set(self.expected) - set(self.keys))
        unexpected = sorted(set(self.keys) - set(self.expected))
        if missing or unexpected:
            raise StarflowError(
                f"checkpoint {source} does not match the config: "
                f"{len(missing)} missing key(s) {missing[:20]}, {len(unexpected)} unexpected key(s) "
                f"{unexpected[:20]}"
            )
        for key in self.keys:
            if self.tensors.shapes[key] != self.expected[key][0]:
                raise StarflowError(
                    f"checkpoint {source}: key '{key}' has shape {self.tensors.shapes[key]}, the config "
                    f"expects {self.expected[key][0]}"
                )

    def _load(self, keys: list[str]) -> None:
        """Read `keys` and assign them (not copies) to the model's parameters, in its dtypes."""
        state = {k: self.tensors.tensor(k).to(self.expected[k][1]) for k in keys}
        self.model.load_state_dict(state, strict=False, assign=True)

    def load_all(self) -> StarFlow:
        """The whole model, every block read."""
        self._load([k for k in self.keys if k.startswith("blocks.")])
        return self.model

    def block_tensors(self, index: int) -> Mapping[str, torch.Tensor]:
        """Block `index`'s weights by name within the block, each read (in the model's dtype) only
        when looked up: a graph writer holds one tensor of the block at a time. Buffers the
        checkpoint does not carry (RoPE frequencies) are the model's own."""
        prefix = f"blocks.{index}."
        block = self.model.blocks[index]
        local = {name: None for name, _ in block.named_parameters()} | dict(block.named_buffers())
        return _ReadOnLookup(
            {
                name: (prefix + name if prefix + name in self.tensors.shapes else value)
                for name, value in local.items()
            },
            lambda key: self.tensors.tensor(key).to(self.expected[key][1]),
        )

    @contextlib.contextmanager
    def loaded(self, index: int) -> Iterator[nn.Module]:
        """Block `index` (of `model.blocks`) with its weights read; released (put back on the meta
        device) after."""
        prefix = f"blocks.{index}."
        block = self.model.blocks[index]
        self._load([k for k in self.keys if k.startswith(prefix)])
        try:
            yield block
        finally:
            state = {k: torch.empty(shape, dtype=dtype, device="meta")
                     for k, (shape, dtype) in self.expected.items() if k.startswith(prefix)}  # fmt: skip
            self.model.load_state_dict(state, strict=False, assign=True)
            release_freed_memory(sum(t.numel() * t.element_size() for t in state.values()))


class _ReadOnLookup(Mapping[str, torch.Tensor]):
    """Names mapped to a checkpoint key (read by `read` on each lookup) or to a tensor."""

    def __init__(self, sources: dict[str, str | torch.Tensor], read: Callable[[str], torch.Tensor]):
        self._sources, self._read = sources, read

    def __getitem__(self, name: str) -> torch.Tensor:
        source = self._sources[name]
        return self._read(source) if isinstance(source, str) else source

    def __contains__(self, name: object) -> bool:  # without reading the tensor
        return name in self._sources

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)


def load_model(
    config_path: str | Path | StarFlowConfig | None,
    checkpoint_path: str | Path,
    device: str | torch.device = "cpu",
) -> StarFlow:
    """A model in eval mode from an official `.pth` + YAML, or our `.safetensors` alone."""
    return StreamedModel(config_path, checkpoint_path).load_all().to(device).eval()


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
