"""The entries of `manifest.json` and `record.json`: one frozen dataclass per object of the schema.

These types are the contract's one definition: `manifest.schema.json` is generated from them
(`python -m starflow.contract.schema`) and loading builds them, so a field's type, range and
description are written here only. Constraints and descriptions ride on the annotations
(pydantic's `Field` in `Annotated`); the sampler's own settings types (`JacobiSettings`,
`SampleOptions`) are the manifest's Jacobi defaults and presets, with no mirror class here.

`starflow.contract.manifest.Manifest` assembles them into the document and re-exports them, so
`from starflow.contract.manifest import Graph` is the one import path of the contract.
numpy-free and torch-free.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from starflow.core.bounded import open_regular
from starflow.core.errors import StarflowError

frozen = dataclasses.dataclass(frozen=True)

# ---- the value types -------------------------------------------------------------------------------
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="lowercase hex sha256")]
Name = Annotated[
    str,
    Field(
        pattern=r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,199}$",
        description="a graph name or a file name: one plain path component inside the export "
        "directory (no separators, no leading dot)",
    ),
]
Count = Annotated[int, Field(ge=1)]
Index = Annotated[int, Field(ge=0)]
NonNegative = Annotated[float, Field(ge=0)]
Size = tuple[Count, Count]  # (height, width) in latent pixels
Precision = Literal["fp32", "fp16"]


def sha256(path: Path) -> str:
    """The hex sha256 of regular file `path` (a FIFO is refused, not waited on)."""
    digest = hashlib.sha256()
    with open_regular(path, str(path)) as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


# ---- entries ----------------------------------------------------------------------------------------
@frozen
class Range:
    """min/opt/max of one symbolic dim (TensorRT optimization profiles read these)."""

    min: Index
    opt: Index
    max: Index

    def holds(self, value: int) -> bool:
        return self.min <= value <= self.max


@frozen
class TensorSpec:
    """A graph input or output: name, dtype and shape (a symbolic dim by name)."""

    name: str
    dtype: Literal["float32", "float16", "int64"]
    shape: tuple[int | str, ...]  # str: a symbolic dim named in the dims/profile


@frozen
class FileEntry:
    """A file of the export, relative to the manifest, with its sha256."""

    file: Name
    sha256: Sha256
    bytes: Index

    @classmethod
    def of(cls, directory: Path, name: str) -> FileEntry:
        path = directory / name
        return cls(name, sha256(path), path.stat().st_size)


@frozen
class Graph:
    """step: x (batch, chunk, D) inputs at positions [start, start+chunk), past_keys/past_values
    (layers, batch, kv_heads, past, head_dim) of the past = text length + start earlier positions,
    grid int64 (h, w) tokens, start int64 -> mu, sigma fp32 (after soft-clip and softplus/exp,
    before guidance), new_keys/new_values of the chunk to store at [past, past+chunk). prefill:
    text -> keys/values of the text positions. forward: x (batch, tokens, D), grid, text -> z =
    (x - mu)/sigma and logdet = -log(sigma), all in block order. vjp: x (batch, tokens, D), grid,
    grad_z (batch, tokens, D) [, text] -> grad_x, the gradient with respect to x of
    sum(grad_z * z) - sum(logdet) of the forward graph, all in block order (one block's step of
    the NLL gradient, chained by the runtime). text_encoder: input_ids/
    attention_mask int64 (batch, token_length) -> embeddings (batch, L, dim), already multiplied by
    the attention mask. decoder: latent (batch, C, height, width), the raw sampled latent (the graph
    divides by the scale) -> image (batch, 3, H, W) in about [-1, 1]. denoise (the learned
    denoiser): clips x (batch, frames, C, height, width) [, text] -> correction."""

    name: Name
    block: Annotated[Index | None, Field(description="the flow block; null for component graphs")]
    kind: Literal["step", "prefill", "forward", "vjp", "text_encoder", "decoder", "denoise"]
    precision: Precision
    file: Name
    sha256: Sha256
    bytes: Index
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
    """One flow block, in sampling order. Per block: permute the tokens (flip reverses the
    sequence; flip-in-frame reverses the tokens of each frame of a clip, frames in order), prefill
    the text keys/values if text_conditioned, then generate tokens t = 0..T-1 with
    x_t = z_t * sigma_t + mu_t, where the step graph's input at position t is sos_embed for t = 0
    and x_{t-1} otherwise; un-permute after."""

    index: Annotated[Index, Field(description="position in forward (training) order")]
    role: Literal["deep", "shallow"]
    permutation: Annotated[
        Literal["identity", "flip", "flip-in-frame"],
        Field(description="flip-in-frame equals flip for an image (one frame)"),
    ]
    frame_local: Annotated[
        bool,
        Field(
            description="a clip's frames are sampled as separate sequences (rows = clips * frames, "
            "each one frame)"
        ),
    ]
    layers: Count
    width: Count
    heads: Count
    kv_heads: Count
    head_dim: Count
    text_conditioned: bool
    sos_embed: Annotated[
        tuple[float, ...], Field(description="fp32 start-of-sequence input, token_dim values")
    ]
    graphs: Annotated[
        dict[str, dict[Literal["step", "prefill", "forward", "vjp"], Name]],
        Field(description="precision -> kind (step, prefill, forward, vjp) -> graph name"),
    ]

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
    """Latent (B, C, H, W) in latent pixels. Patchify to (B, H/p, W/p, p*p*C) with channel order
    (p1 p2 c), tokens row-major over the (h, w) = (H/p, W/p) grid. Any H x W with
    min <= (H, W) <= max and both multiples of multiple_of is allowed."""

    channels: Count
    patch_size: Count
    token_dim: Annotated[Count, Field(description="D = patch_size^2 * channels")]
    train: Size
    min: Size
    max: Size
    multiple_of: Count

    def holds(self, height: int, width: int) -> bool:
        return self.min[0] <= height <= self.max[0] and self.min[1] <= width <= self.max[1]

    def describe_range(self) -> str:
        return f"{self.min[0]}x{self.min[1]} .. {self.max[0]}x{self.max[1]}"


@frozen
class TextComponent:
    """How to turn prompts into embeddings."""

    kind: Literal["hf-encoder", "label-table"]
    graph: Annotated[Name, Field(description="name of the text_encoder graph")]
    tokenizer: Annotated[
        Name,
        Field(
            description="a Hugging Face `tokenizers` tokenizer.json: pad right to token_length with "
            "pad_id, truncate to token_length (special tokens included); the empty prompt encodes "
            "the unconditional text"
        ),
    ]
    token_length: Count
    pad_id: Index
    classes: Annotated[tuple[str, ...] | None, Field(description="label-table: the prompts it knows")]
    source: str
    sentencepiece: Annotated[
        Name | None,
        Field(
            description="hf-encoder: T5's SentencePiece model (spiece.model) behind tokenizer.json's "
            "Unigram vocabulary, for runtimes without the `tokenizers` library: tokenizer.json's added "
            "tokens are split out of the prompt first, the text between them is encoded with this "
            "model, then tokenizer.json's template, truncation and padding apply; null when the "
            "encoder directory has none (callers pass token ids)"
        ),
    ] = None


@frozen
class Text:
    """Text conditioning: (B, L, dim) encoder embeddings, L <= max_length. The unconditional text
    for guidance is the encoded empty prompt."""

    encoder: str | None
    dim: Count
    max_length: Count
    component: Annotated[
        TextComponent | None,
        Field(description="null when the export has no text encoder (callers pass embeddings)"),
    ]


@frozen
class Decoder:
    """How sampled latents become images. identity: pixel-space model (image = latent; source,
    scale, graph and factor null). sd-vae: the decoder graph takes the raw latent and applies
    / scale itself (source, scale and factor set). Both give images in about [-1, 1]: clamp, then
    (x + 1) / 2."""

    kind: Literal["identity", "sd-vae"]
    source: str | None = None
    scale: float | None = None
    graph: Annotated[
        Name | None,
        Field(
            description="the decoder graph; null when the export was made without a VAE directory "
            "(callers decode latents themselves)"
        ),
    ] = None
    factor: Annotated[Count | None, Field(description="image pixels per latent pixel")] = None

    def __post_init__(self) -> None:  # the one rule the field types cannot state
        stated = [self.source, self.scale, self.factor]
        if self.kind == "identity" and any(v is not None for v in [*stated, self.graph]):
            raise ValueError("an identity decoder has no source, scale, graph or factor")
        if self.kind == "sd-vae" and any(v is None for v in stated):
            raise ValueError("an sd-vae decoder needs its source, scale and factor")


@frozen
class Denoise:
    """The self-denoise step after sampling. nll-gradient (no graph of its own): x <- x -
    noise_std^2 * grad, grad the gradient of each sample's total NLL 0.5*sum(z^2) - sum(logdet),
    chained over the blocks' fp32 graphs: the forward graphs in forward order (each block's input
    kept, in its own order), then from g = z the vjp graphs in sampling order, each taking the
    block's input and g permuted into its order and giving the next g (un-permuted). learned: the
    graph gives a correction for clips (B, F, C, H, W) and x <- x - step * correction; clips longer
    than video.window frames go through in windows of that many frames, each after the first
    starting window - overlap frames later and replacing the frames after its first overlap ones
    (null overlap: window - 1)."""

    kind: Literal["nll-gradient", "learned"]
    graph: Annotated[Name | None, Field(description="learned only; nll-gradient chains the blocks' graphs")]
    noise_std: NonNegative
    step: Annotated[float, Field(gt=0)] | None = None  # learned only
    overlap: Index | None = None  # learned only; None: window - 1

    def __post_init__(self) -> None:  # the one rule the field types cannot state
        if (self.graph is None) != (self.kind == "nll-gradient"):
            raise ValueError(
                "a learned denoiser names its graph; nll-gradient names none (it chains the blocks')"
            )

    @property
    def learned(self) -> bool:
        return self.kind == "learned"


@frozen
class Video:
    """Clips (B, F, C, H, W) of F latent frames, patchified frame by frame into F*h*w tokens.
    Jacobi over a clip's frames: chunks starting after the first frame's tokens are
    later_chunk_factor times the block size; with warm_start a chunk's first iteration takes the
    inputs one frame earlier. With a window, the deep block's cache holds at most window frames:
    when the window is full, its cache restarts (text kept) from the last context frames,
    re-encoded as a sequence that begins with sos_embed, and positions (step's start) count from
    there."""

    frames: Range
    window: Count | None
    context: Annotated[Count | None, Field(description="null: window - 1")]
    later_chunk_factor: Count
    warm_start: bool
    fps: Annotated[float, Field(gt=0, description="the frame rate to show samples at")]


@frozen
class Guidance:
    """Classifier-free guidance as the official code applies it (see `expression`)."""

    formula: Literal["starflow-cfg"]
    expression: str
    default_weight: NonNegative
    blocks: Annotated[
        Literal["deep", "all"],
        Field(description="deep: the uncond half is dropped before the shallow blocks"),
    ]

    @property
    def deep_only(self) -> bool:
        return self.blocks == "deep"


@frozen
class Tolerance:
    """A tensor passes when max|onnx - torch| <= atol + rtol * max|torch|."""

    atol: float
    rtol: float


@frozen
class PrecisionInfo:
    """How one precision's graphs were validated, and the ops kept in fp32."""

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
    """The TensorRT flavour and version an engine was built with."""

    name: Literal["tensorrt", "tensorrt_rtx"]
    version: str


@frozen
class EngineProfile:
    """One TensorRT optimization profile: min/opt/max of the symbolic dims it names."""

    name: str
    dims: dict[str, Range]


@frozen
class Engine:
    """A TensorRT engine of one graph. It is valid for its graph only while cache_key matches the
    graph's sha256s and the build settings; runtimes check sha256 before deserialising."""

    graph: Annotated[Name, Field(description="name of the graph in `graphs` it was built from")]
    file: Name
    sha256: Sha256
    bytes: Index
    builder: EngineBuilder
    precision: Precision
    strongly_typed: Annotated[
        bool, Field(description="tensor types taken from the ONNX graph, none chosen by TensorRT")
    ]
    profiles: Annotated[
        tuple[EngineProfile, ...],
        Field(
            min_length=1,
            description="optimization profiles in engine order: min/opt/max of the graph's symbolic dims",
        ),
    ]
    compute_capabilities: Annotated[
        tuple[Annotated[str, Field(pattern=r"^SM[0-9]+$")], ...], Field(min_length=1)
    ]
    device: Annotated[
        str | None,
        Field(description="the GPU a full-TensorRT engine was built on; null for TensorRT-RTX"),
    ]
    optimization_level: Annotated[int, Field(ge=0, le=5)]
    workspace_bytes: Count | None
    cache_key: Sha256


@frozen
class Producer:
    """What wrote the export."""

    name: Literal["starflow"]
    version: str
    torch: str
    opset: Annotated[int, Field(description="ONNX default-domain opset of every graph")]


@frozen
class Source:
    """The checkpoint the export was made from."""

    checkpoint: Annotated[str, Field(description="file name of the exported checkpoint")]
    sha256: Sha256
