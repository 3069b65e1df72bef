"""The entries of `manifest.json`: one frozen dataclass per object of `manifest.schema.json`.

`starflow.contract.manifest.Manifest` assembles them into the document and re-exports them, so
`from starflow.contract.manifest import Graph` is the one import path of the contract.
numpy-free and torch-free.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

from starflow.core.errors import StarflowError
from starflow.core.sampler import JacobiSettings, SampleOptions

frozen = dataclasses.dataclass(frozen=True)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


# ---- entries ----------------------------------------------------------------------------------------
@frozen
class Range:
    """min/opt/max of one symbolic dim (TensorRT optimization profiles read these)."""

    min: int
    opt: int
    max: int

    def holds(self, value: int) -> bool:
        return self.min <= value <= self.max


@frozen
class TensorSpec:
    name: str
    dtype: str  # float32 | float16 | int64
    shape: tuple[int | str, ...]  # str: a symbolic dim named in the dims/profile


@frozen
class FileEntry:
    """A file of the export, relative to the manifest, with its sha256."""

    file: str
    sha256: str
    bytes: int

    @classmethod
    def of(cls, directory: Path, name: str) -> FileEntry:
        path = directory / name
        return cls(name, sha256(path), path.stat().st_size)


@frozen
class Graph:
    name: str
    block: int | None  # None: a component graph (text_encoder, decoder, denoise)
    kind: str  # step | prefill | forward | text_encoder | decoder | denoise
    precision: str
    file: str
    sha256: str
    bytes: int
    external_data: tuple[FileEntry, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profile: dict[str, Range]

    def input(self, name: str) -> TensorSpec:
        found = [t for t in self.inputs if t.name == name]
        if not found:
            raise StarflowError(
                f"graph {self.name}: no input {name!r}; it takes {[t.name for t in self.inputs]}"
            )
        return found[0]


@frozen
class Block:
    """One flow block, in sampling order; `graphs` maps precision -> kind -> graph name."""

    index: int  # position in forward (training) order
    role: str  # deep | shallow
    permutation: str  # identity | flip | flip-in-frame
    frame_local: bool  # a clip's frames are sampled as separate sequences
    layers: int
    width: int
    heads: int
    kv_heads: int
    head_dim: int
    text_conditioned: bool
    sos_embed: tuple[float, ...]
    graphs: dict[str, dict[str, str]]

    @property
    def deep(self) -> bool:
        return self.role == "deep"

    @property
    def flip(self) -> bool:
        return self.permutation != "identity"

    @property
    def flip_in_frame(self) -> bool:
        return self.permutation == "flip-in-frame"


@frozen
class Latent:
    """Latent (B, C, H, W) sizes in latent pixels the export takes (see the schema)."""

    channels: int
    patch_size: int
    token_dim: int
    train: tuple[int, int]
    min: tuple[int, int]
    max: tuple[int, int]
    multiple_of: int

    def holds(self, height: int, width: int) -> bool:
        return self.min[0] <= height <= self.max[0] and self.min[1] <= width <= self.max[1]

    def describe_range(self) -> str:
        return f"{self.min[0]}x{self.min[1]} .. {self.max[0]}x{self.max[1]}"


@frozen
class TextComponent:
    kind: str  # hf-encoder | label-table
    graph: str
    tokenizer: str
    token_length: int
    pad_id: int
    classes: tuple[str, ...] | None
    source: str


@frozen
class Text:
    encoder: str | None
    dim: int
    max_length: int
    component: TextComponent | None  # None: callers pass embeddings


@frozen
class Decoder:
    """identity (pixel models) or sd-vae; `graph` None when exported without a VAE directory."""

    kind: str
    source: str | None = None
    scale: float | None = None
    graph: str | None = None
    factor: int | None = None  # image pixels per latent pixel

    def to_json(self) -> dict[str, Any]:
        return {"kind": "identity"} if self.kind == "identity" else dataclasses.asdict(self)


@frozen
class Denoise:
    """After sampling: x - noise_std^2 * grad (nll-gradient) or x - step * correction (learned,
    clips in windows with `overlap` frames kept; see the schema)."""

    kind: str  # nll-gradient | learned
    graph: str
    noise_std: float
    step: float | None = None  # learned only
    overlap: int | None = None  # learned only; None: window - 1

    @property
    def learned(self) -> bool:
        return self.kind == "learned"


@frozen
class Video:
    """How clips are sampled (see the schema): frame range, the deep block's window, the Jacobi rules."""

    frames: Range
    window: int | None
    context: int | None
    later_chunk_factor: int
    warm_start: bool
    fps: float


@frozen
class Guidance:
    formula: str
    expression: str
    default_weight: float
    blocks: str  # deep: the uncond half is dropped before the shallow blocks; all

    @property
    def deep_only(self) -> bool:
        return self.blocks == "deep"


@frozen
class Jacobi:
    """The default block-wise Jacobi settings."""

    block_size: int
    max_iter: int
    threshold: float

    def settings(self) -> JacobiSettings:
        return JacobiSettings(self.block_size, self.max_iter, self.threshold)


@frozen
class JacobiPreset:
    """One block kind's Jacobi settings in a sampling preset (starflow.core.sampler.JacobiSettings)."""

    block_size: int
    max_iter: int
    threshold: float
    init: str

    def settings(self) -> JacobiSettings:
        return JacobiSettings(self.block_size, self.max_iter, self.threshold, self.init)


@frozen
class SamplingPreset:
    """Named sampling settings calibrated for this model (opt-in; `jacobi` stays the default)."""

    guidance: float
    method: str
    jacobi: JacobiPreset
    shallow_jacobi: JacobiPreset | None

    def options(self) -> SampleOptions:
        shallow = self.shallow_jacobi.settings() if self.shallow_jacobi else None
        return SampleOptions(self.guidance, self.method, self.jacobi.settings(), shallow)

    @classmethod
    def of(cls, options: SampleOptions) -> SamplingPreset:
        def preset(s: JacobiSettings | None) -> JacobiPreset | None:
            return None if s is None else JacobiPreset(s.block_size, s.max_iter, float(s.threshold), s.init)

        return cls(
            float(options.guidance), options.method, preset(options.jacobi), preset(options.shallow_jacobi)
        )


@frozen
class Tolerance:
    """A tensor passes when max|onnx - torch| <= atol + rtol * max|torch|."""

    atol: float
    rtol: float


@frozen
class PrecisionInfo:
    tolerance: Tolerance
    fp32_ops: tuple[str, ...]


@frozen
class Comparison:
    """One exported tensor against PyTorch (the validation record)."""

    graph: str
    case: str
    tensor: str
    shape: tuple[int, ...]
    max_abs_error: float
    max_abs_reference: float
    limit: float
    passed: bool

    @classmethod
    def of(cls, graph: str, case: str, tensor: str, shape: tuple[int, ...], error: float, reference: float,
           limit: float) -> Comparison:  # fmt: skip
        return cls(
            graph, case, tensor, tuple(shape), error, reference, limit, bool(error <= limit)
        )  # NaN fails

    @property
    def severity(self) -> float:
        """Error as a fraction of the limit (inf when the limit is 0 and the error is not)."""
        if self.limit > 0:
            return self.max_abs_error / self.limit
        return float("inf") if self.max_abs_error > 0 else 0.0

    def describe(self) -> str:
        return (
            f"graph {self.graph}, tensor {self.tensor}, shape {list(self.shape)} ({self.case}): "
            f"max abs error {self.max_abs_error:.3g} > limit {self.limit:.3g} "
            f"(max |reference| {self.max_abs_reference:.3g})"
        )


@frozen
class EngineBuilder:
    name: str  # tensorrt | tensorrt_rtx
    version: str


@frozen
class EngineProfile:
    """One TensorRT optimization profile: min/opt/max of the symbolic dims it names."""

    name: str
    dims: dict[str, Range]


@frozen
class Engine:
    graph: str
    file: str
    sha256: str
    bytes: int
    builder: EngineBuilder
    precision: str
    strongly_typed: bool
    profiles: tuple[EngineProfile, ...]
    compute_capabilities: tuple[str, ...]
    device: str | None
    optimization_level: int
    workspace_bytes: int | None
    cache_key: str


@frozen
class Producer:
    name: str
    version: str
    torch: str
    opset: int


@frozen
class Source:
    checkpoint: str
    sha256: str
