"""Write a seeded random checkpoint of a preset as `.safetensors`, tensor by tensor.

The scale runs need checkpoints of the 3B and 7B shapes, and building the model first (as
`random_model` + `save_model` do) holds all of it in memory, 27.6 GB for the 7B in fp32. Here the
model is built on the meta device for its keys and shapes only, and each tensor's values are
generated and written in chunks of at most CHUNK_BYTES, so memory stays a few hundred MiB at any
size. The file embeds the config as `save_model` does: `load_model(None, path)` reads it.

Values: N(0, 0.02) noise for every tensor (a dropped bias or norm shows up in validation), around
each parameter's neutral value (1 for LayerNorm weights; 0 otherwise, Gemma-style RMSNorm
weights included, which scale by 1 + w). Each tensor has its own generator, seeded from --seed
and its name, so any tensor can be regenerated alone (`--verify` does).

    python benchmarks/random_checkpoint.py --preset NAME --out FILE [--dtype D] [--seed N] [--verify]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from starflow.core.atomic import atomic_file
from starflow.core.config import StarFlowConfig, load_config
from starflow.core.errors import StarflowError
from starflow.model.checkpoint import CONFIG_METADATA_KEY
from starflow.model.flow import StarFlow

CHUNK_BYTES = 256 << 20  # the fp32 values generated at once
STD = 0.02
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


@dataclass(frozen=True)
class TensorSpec:
    """One state_dict entry: its shape and the value its noise is centred on."""

    name: str
    shape: tuple[int, ...]
    centre: float

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


def tensor_specs(config: StarFlowConfig) -> list[TensorSpec]:
    """Every state_dict key of the model in state_dict order, from a meta-device build (no memory)."""
    with torch.device("meta"):
        model = StarFlow(config)
    specs = []
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            raise StarflowError(f"{name}: {tensor.dtype} tensors are not generated")
        owner, _, leaf = name.rpartition(".")
        layer_norm = isinstance(model.get_submodule(owner), torch.nn.LayerNorm) and leaf == "weight"
        specs.append(TensorSpec(name, tuple(tensor.shape), 1.0 if layer_norm else 0.0))
    return specs


def chunks(spec: TensorSpec, seed: int, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """The tensor's values, flat, in chunks of at most CHUNK_BYTES of fp32 (the same every call)."""
    digest = hashlib.sha256(f"{seed}/{spec.name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    step = CHUNK_BYTES // 4
    for begin in range(0, spec.numel, step):
        values = torch.randn(min(step, spec.numel - begin), generator=generator).mul_(STD)
        yield values.add_(spec.centre).to(dtype)


def header(config: StarFlowConfig, specs: list[TensorSpec], dtype: torch.dtype, seed: int) -> bytes:
    """The safetensors header: its length (8 bytes, little-endian), then JSON padded to 8 bytes."""
    config_json = json.dumps({k: v for k, v in config.to_dict().items() if k != "extra"})
    entries: dict[str, object] = {
        "__metadata__": {CONFIG_METADATA_KEY: config_json, "random_seed": str(seed)}
    }
    offset, itemsize = 0, dtype.itemsize
    for spec in specs:
        end = offset + spec.numel * itemsize
        entries[spec.name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": spec.shape,
            "data_offsets": [offset, end],
        }
        offset = end
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def write_random_checkpoint(preset: str, out: Path, dtype: torch.dtype = torch.float32, seed: int = 0) -> int:
    """Write the checkpoint atomically (`starflow.core.atomic`: a partial beside `out`, fsync,
    rename); its bytes."""
    if sys.byteorder != "little":
        raise StarflowError("safetensors data is little-endian; this writer copies native bytes")
    config = load_config(preset)
    specs = tensor_specs(config)
    with atomic_file(out) as stream:
        stream.write(header(config, specs, dtype, seed))
        for spec in specs:
            for values in chunks(spec, seed, dtype):
                stream.write(values.view(torch.uint8).numpy())
        written = stream.tell()
    return written


def verify(path: Path, preset: str, seed: int) -> None:
    """Read the file back through safetensors and compare every tensor with its regenerated values
    (one tensor in memory at a time); raises on the first difference."""
    config = load_config(preset)
    with safe_open(str(path), framework="pt") as f:
        embedded = json.loads(f.metadata()[CONFIG_METADATA_KEY])
        if embedded != json.loads(json.dumps({k: v for k, v in config.to_dict().items() if k != "extra"})):
            raise StarflowError(f"{path}: embedded config differs from preset {preset!r}")
        specs = tensor_specs(config)
        if set(f.keys()) != {s.name for s in specs}:
            raise StarflowError(f"{path}: keys differ from the model's state_dict")
        for spec in specs:
            stored = f.get_tensor(spec.name)
            expected = torch.cat(list(chunks(spec, seed, stored.dtype))).view(spec.shape)
            if not torch.equal(stored, expected):
                raise StarflowError(f"{path}: tensor {spec.name} differs from its regenerated values")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True, help="preset name (or YAML config) of the model")
    parser.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="the file's dtype")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verify", action="store_true", help="read the file back and compare every tensor")
    args = parser.parse_args()
    began = time.perf_counter()
    written = write_random_checkpoint(args.preset, args.out, DTYPES[args.dtype], args.seed)
    seconds = time.perf_counter() - began
    print(f"wrote {written} bytes ({written / 2**30:.2f} GiB) in {seconds:.1f} s: {args.out}")
    if args.verify:
        began = time.perf_counter()
        verify(args.out, args.preset, args.seed)
        print(f"verified every tensor in {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    main()
