"""What gets exported: each flow block's own methods as graphs, their signatures and profiles.

A block is exported once per method of `FlowBlock`: `step` (a chunk against the cache,
sequential and Jacobi sampling alike), `prefill` (the text keys/values), `density` (the
teacher-forced pass, kind "forward") and `vjp` (its vector-Jacobian product, one block's step of
the self-denoise's NLL gradient; fp32 only). Nothing is rebuilt here: the graph is the method the
PyTorch sampler itself runs, in fp32 or an fp16 copy. Every graph sees tokens in the block's own
(permuted) order; the flip, guidance, the Jacobi update and its stop test belong to the runtime.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from starflow.contract.manifest import (
    Block,
    Decoder,
    Denoise,
    FileEntry,
    Graph,
    Range,
    TensorSpec,
    TextComponent,
    Tolerance,
)
from starflow.core.errors import StarflowError
from starflow.core.sampler import JacobiSettings
from starflow.model.flow import FlowBlock, RMSNorm, StarFlow

if TYPE_CHECKING:
    import numpy as np
    import onnx

    from starflow.core.config import StarFlowConfig
    from starflow.runtime.backends import Runner

    Feeds = dict[str, np.ndarray]  # arrays by tensor name

ONNX_DTYPES = {1: "float32", 10: "float16", 7: "int64"}
ENGINE_KINDS = ("step", "prefill", "forward")  # the block graphs a TensorRT engine is built for
BLOCK_METHODS = {  # kind -> method
    "step": "step", "prefill": "prefill", "forward": "density", "vjp": "vjp",
    "forward+vjp": "density_and_vjp",  # a tracing kind: both graphs from one trace (`joint_spec`)
}  # fmt: skip


# ---- precision -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Precision:
    """How a graph computes: fp32, or fp16 weights/matmuls with chosen ops kept in fp32.

    The flow head (proj_out, soft-clip, softplus/exp), RoPE, RMSNorm and the attention scores
    and softmax are fp32 in every variant (the model computes them so).
    """

    name: str  # "fp32" or "fp16"
    fp32_norms: bool = True  # LayerNorm statistics and affine in fp32

    @property
    def dtype(self) -> torch.dtype:
        return torch.float16 if self.name == "fp16" else torch.float32

    def fp32_ops(self) -> tuple[str, ...]:
        """Which computations stay fp32 (all of them in fp32 graphs), as the manifest lists them."""
        ops = ["rope", "flow_head", "rms_norm", "softmax"]
        if self.name == "fp32" or self.fp32_norms:
            ops.append("layer_norm")
        if self.name == "fp32":
            ops.append("matmul")
        return tuple(ops)


class Fp32LayerNorm(nn.LayerNorm):
    """LayerNorm whose statistics and affine run in fp32 whatever the activation dtype."""

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.weight.float(), None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def cast_block(block: FlowBlock, precision: Precision) -> FlowBlock:
    """`block`'s structure in the precision's dtype, sos, the head (and norms if asked) in fp32,
    with its weights on the meta device: a graph is traced without weight values, and its writer
    casts the block's own weights as it writes them, so no cast copy is ever held."""
    if precision.dtype == torch.float32:
        return block
    memo = {id(t): _meta(t) for t in (*block.parameters(), *block.buffers())}
    out = copy.deepcopy(block, memo).to(precision.dtype)
    out.sos_embed = nn.Parameter(_meta(block.sos_embed).float(), requires_grad=False)
    out.proj_out.float()
    if out.final_norm is not None:
        out.final_norm.float()
    for parent in out.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.LayerNorm) and precision.fp32_norms:
                with torch.device("meta"):
                    setattr(
                        parent,
                        name,
                        Fp32LayerNorm(child.normalized_shape, child.eps, child.elementwise_affine),
                    )
            elif isinstance(child, RMSNorm):
                child.float()
    return out


def _meta(tensor: Tensor) -> Tensor:
    """`tensor`'s shape and dtype on the meta device (a parameter stays a parameter)."""
    out = tensor.detach().to("meta")
    return nn.Parameter(out, requires_grad=False) if isinstance(tensor, nn.Parameter) else out


class BlockMethod(nn.Module):
    """One method of a FlowBlock (see BLOCK_METHODS) as a module, for the tracer."""

    def __init__(self, block: FlowBlock, kind: str, precision: Precision):
        super().__init__()
        self.block = cast_block(block, precision).eval()
        self.method = BLOCK_METHODS[kind]

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        return getattr(self.block, self.method)(*args)


# ---- signatures ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GraphSpec:
    """What one graph must look like; checked against the exported file."""

    block: int | None  # None: a component graph (text_encoder, decoder, denoise)
    kind: str  # step | prefill | forward | vjp | text_encoder | decoder | denoise (forward+vjp: traced only)
    precision: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def name(self) -> str:
        prefix = f"block{self.block}." if self.block is not None else ""
        return f"{prefix}{self.kind}.{self.precision}"

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"

    @property
    def data_file(self) -> str:
        """Where its weights go past protobuf's limit: a block's graphs of one precision share one
        file (their weights are the block's), a component's is its own."""
        return (
            f"block{self.block}.{self.precision}.weights" if self.block is not None else f"{self.file}.data"
        )

    @property
    def dims(self) -> list[str]:
        """The symbolic dims with a profile; derived ones ("8*height") follow from those."""
        names = [
            d for t in self.inputs + self.outputs for d in t.shape if isinstance(d, str) and d.isidentifier()
        ]
        return list(dict.fromkeys(names))

    def check_signature(self, model: onnx.ModelProto) -> None:
        """Fail if a symbolic dim was specialised to a constant (or names/dtypes drifted)."""
        for kind, declared, actual in (
            ("input", self.inputs, model.graph.input),
            ("output", self.outputs, model.graph.output),
        ):
            found = [_tensor_spec(v) for v in actual]
            if found != list(declared):
                raise StarflowError(
                    f"graph {self.name}: exported {kind}s {found} differ from the declared {list(declared)} "
                    "(a dynamic dim was specialised?)"
                )

    def entry(
        self, directory: Path, dims: dict[str, Range], hashed: dict[str, FileEntry] | None = None
    ) -> Graph:
        """The manifest entry of the exported file in `directory`: files with sha256, profile.
        `hashed`: entries of files already hashed (a block's graphs share its weights file)."""
        hashed = {} if hashed is None else hashed
        external = ()
        if (directory / self.data_file).exists():
            if self.data_file not in hashed:
                hashed[self.data_file] = FileEntry.of(directory, self.data_file)
            external = (hashed[self.data_file],)
        main = FileEntry.of(directory, self.file)
        return Graph(
            self.name, self.block, self.kind, self.precision, main.file, main.sha256, main.bytes, external,
            self.inputs, self.outputs, {d: dims[d] for d in self.dims},
        )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ComponentGraph:
    """A pipeline component's graph, declared by its own file (text_encoder.py, decoder.py,
    denoise.py): everything `starflow.export.components.export_component` needs to export it
    and to check it against PyTorch."""

    spec: GraphSpec  # the signature; the graph is written to `spec.file`
    module: nn.Module  # what gets traced
    example: tuple[Tensor, ...]  # trace inputs: every symbolic dim >= 2 and distinct
    cases: dict[str, Feeds]  # validation inputs by case name, none of them the example's shapes
    reference: Callable[[Feeds], Feeds]  # PyTorch's outputs of one case, by output name
    tolerance: Tolerance
    entry: TextComponent | Decoder | Denoise  # what the component adds to the manifest
    # files written beside the graph, by name, each with its writer (the tokenizer)
    files: dict[str, Callable[[Path], None]] = dataclasses.field(default_factory=dict)
    # what the runtime puts around the graph, validated with it: (runner, export directory) ->
    # a function of case inputs; None: the runner itself
    runtime: Callable[[Runner, Path], Callable[[Feeds], Feeds]] | None = None
    # exported through torch.export, which traces what the block tracer cannot: another library's
    # module (transformers, diffusers: in-place ops, data-dependent branches, composite ops whose C++
    # kernels read sizes as ints) or the learned denoiser (its dims specialise). The others trace as
    # the blocks do, several times faster.
    torch_export: bool = True


def _tensor_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor = value.type.tensor_type
    shape = tuple(d.dim_param if d.dim_param else d.dim_value for d in tensor.shape.dim)
    return TensorSpec(value.name, ONNX_DTYPES.get(tensor.elem_type, str(tensor.elem_type)), shape)


def block_specs(
    config: StarFlowConfig, block: FlowBlock, precision: str, density: bool = True, vjp: bool = False
) -> list[GraphSpec]:
    """The step, (prefill,) (forward) and (vjp) graphs of one block; the manifest schema documents
    them. `vjp` asks for the forward graph too (the runtime's gradient chain runs both)."""
    D, layers = config.token_dim, len(block.attn_blocks)
    kv, hd = block.num_kv_heads, block.head_dim
    cache_dtype = "float16" if precision == "fp16" else "float32"

    def cache(name: str, length: str) -> TensorSpec:
        return TensorSpec(name, cache_dtype, (layers, "batch", kv, length, hd))

    tokens = TensorSpec("x", "float32", ("batch", "chunk", D))
    grid, start = TensorSpec("grid", "int64", (2,)), TensorSpec("start", "int64", ())
    text = TensorSpec("text", "float32", ("batch", "text", config.txt_dim))
    step_inputs = (tokens, cache("past_keys", "past"), cache("past_values", "past"), grid, start)
    step_outputs = (
        TensorSpec("mu", "float32", ("batch", "chunk", D)),
        TensorSpec("sigma", "float32", ("batch", "chunk", D)),
        cache("new_keys", "chunk"),
        cache("new_values", "chunk"),
    )
    specs = [GraphSpec(block.index, "step", precision, step_inputs, step_outputs)]
    if block.text_conditioned:
        prefill_outputs = (cache("keys", "text"), cache("values", "text"))
        specs.append(GraphSpec(block.index, "prefill", precision, (text,), prefill_outputs))
    conditioning = (text,) if block.text_conditioned else ()
    sequence = TensorSpec("x", "float32", ("batch", "tokens", D))
    if density or vjp:
        outputs = (
            TensorSpec("z", "float32", ("batch", "tokens", D)),
            TensorSpec("logdet", "float32", ("batch", "tokens", D)),
        )
        specs.append(GraphSpec(block.index, "forward", precision, (sequence, grid, *conditioning), outputs))
    if vjp:
        upstream = TensorSpec("grad_z", "float32", ("batch", "tokens", D))
        inputs = (sequence, grid, upstream, *conditioning)
        outputs = (TensorSpec("grad_x", "float32", ("batch", "tokens", D)),)
        specs.append(GraphSpec(block.index, "vjp", precision, inputs, outputs))
    return specs


def joint_spec(forward: GraphSpec, vjp: GraphSpec) -> GraphSpec:
    """The forward and vjp graphs of one block as one traced graph: the vjp's inputs, both outputs.
    A vjp trace runs the forward pass anyway, so this one trace gives both graphs."""
    outputs = forward.outputs + vjp.outputs
    return GraphSpec(forward.block, "forward+vjp", forward.precision, vjp.inputs, outputs)


# ---- shape profiles ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LatentRange:
    """Latent sizes (H, W in latent pixels) the graphs' profiles cover, inclusive."""

    min: tuple[int, int]
    max: tuple[int, int]

    @classmethod
    def default(cls, config: StarFlowConfig) -> LatentRange:
        """Half to twice the training latent side, per side: covers the official aspect buckets."""
        p, side = config.patch_size, config.latent_size
        low = max(p, -(-side // 2) // p * p)
        return cls((low, low), (2 * side, 2 * side))

    def check(self, config: StarFlowConfig) -> None:
        p = config.patch_size
        for name, (h, w) in (("min_latent", self.min), ("max_latent", self.max)):
            if h % p or w % p or h < 1 or w < 1:
                raise StarflowError(f"{name}: {h}x{w} is not a positive multiple of patch_size {p}")
        if self.min[0] > self.max[0] or self.min[1] > self.max[1]:
            raise StarflowError(
                f"min_latent {self.min[0]}x{self.min[1]} exceeds max_latent {self.max[0]}x{self.max[1]}"
            )
        side = config.latent_size
        if not (self.min[0] <= side <= self.max[0] and self.min[1] <= side <= self.max[1]):
            raise StarflowError(
                f"the latent range {self.min[0]}x{self.min[1]}..{self.max[0]}x{self.max[1]} must "
                f"include the model's training latent {side}x{side}"
            )


def profile_dims(
    config: StarFlowConfig, latent: LatentRange, max_batch: int, frames: Range | None = None
) -> dict[str, Range]:
    """min/opt/max of every symbolic dim of an export; `frames`: a video export's clip lengths."""
    p, L = config.patch_size, config.txt_size
    t_min = (latent.min[0] // p) * (latent.min[1] // p)
    t_opt = (config.latent_size // p) ** 2
    t_max = (latent.max[0] // p) * (latent.max[1] // p)
    rows = 2 * max_batch  # guidance runs [cond ; uncond]: twice the images
    seen = t_max  # tokens a cache holds at most: a frame, or the deep block's window of a clip
    if frames is not None:
        rows = max(rows, max_batch * frames.max)  # frame-local blocks: one row per frame
        seen = t_max * min(frames.max, config.local_attn_window or frames.max)
    dims = {
        "batch": Range(1, 2, rows),
        "tokens": Range(t_min, t_opt, t_max * (frames.max if frames else 1)),
        "chunk": Range(1, min(JacobiSettings().block_size, t_opt), seen),
        "past": Range(0, L + t_opt // 2, L + seen - 1),
        # whole latents (decoder and denoise graphs), in latent pixels
        "height": Range(latent.min[0], config.latent_size, latent.max[0]),
        "width": Range(latent.min[1], config.latent_size, latent.max[1]),
    }
    if L > 0:
        dims["text"] = Range(1, L, L)
    if frames is not None:
        dims["frames"] = frames
    return dims


def block_entry(
    model: StarFlow,
    block: FlowBlock,
    graphs: list[Graph],
    precisions: list[str],
    sos_embed: Tensor | None = None,
) -> Block:
    """The manifest's entry of `block`; `sos_embed` when the block's own weights are not loaded."""
    heads, kv_heads = model.config.heads(block.proj_in.out_features)
    names = {
        p: {g.kind: g.name for g in graphs if g.block == block.index and g.precision == p} for p in precisions
    }
    return Block(
        index=block.index,
        role="deep" if block.deep else "shallow",
        permutation=("flip-in-frame" if block.flip_in_frame else "flip") if block.flip else "identity",
        frame_local=block.frame_local,
        layers=len(block.attn_blocks),
        width=block.proj_in.out_features,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=block.head_dim,
        text_conditioned=block.text_conditioned,
        sos_embed=tuple(
            (block.sos_embed if sos_embed is None else sos_embed).detach().float().reshape(-1).tolist()
        ),
        graphs=names,
    )
