"""Export-friendly views of one flow block: the step, prefill and forward graphs.

The reference `FlowBlock` samples through a mutable `KVCache` and takes RoPE tables computed in
Python from integer grid sizes; neither survives an export with symbolic shapes. These wrappers
reuse the block's own submodules (`attention.project`, `attention.proj`, `mlp`, `head`,
`proj_in`, `proj_txt`, the model's `RotaryEmbedding`) but take past keys/values as inputs,
return the chunk's new keys/values, and compute RoPE positions from the runtime grid (h, w) with
tensor ops only, so no size is baked into the graph.

Every graph sees tokens in the block's own (permuted) order: the flip, guidance, the Jacobi
update and its stop test belong to the runtime, in fp32.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from starflow.model import Attention, FlowBlock, RMSNorm, RotaryEmbedding, apply_rope


@dataclasses.dataclass(frozen=True)
class Precision:
    """How a graph computes: fp32, or fp16 weights/matmuls with chosen ops kept in fp32.

    The flow head (proj_out, soft-clip, softplus/exp) and RoPE are fp32 in every variant.
    """

    name: str  # "fp32" or "fp16"
    fp32_norms: bool = True  # LayerNorm/RMSNorm computed in fp32 (RMSNorm always is)
    fp32_softmax: bool = True  # attention scores and softmax in fp32

    @property
    def dtype(self) -> torch.dtype:
        return torch.float16 if self.name == "fp16" else torch.float32


FP32 = Precision("fp32")


class Fp32LayerNorm(nn.LayerNorm):
    """LayerNorm whose statistics and affine run in fp32 whatever the activation dtype."""

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.weight.float(), None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def _to_fp32_layer_norm(norm: nn.LayerNorm) -> Fp32LayerNorm:
    out = Fp32LayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=norm.elementwise_affine)
    out.load_state_dict({k: v.float() for k, v in norm.state_dict().items()})
    return out


def cast_block(block: FlowBlock, precision: Precision) -> FlowBlock:
    """A copy of `block` in the precision's dtype; sos, the head (and norms if asked) stay fp32."""
    if precision.dtype == torch.float32:
        return block
    out = copy.deepcopy(block).to(precision.dtype)
    out.sos_embed = nn.Parameter(block.sos_embed.detach().float().clone())
    out.proj_out.float()
    if out.final_norm is not None:
        out.final_norm.float()
    if precision.fp32_norms:
        for parent in out.modules():
            for name, child in parent.named_children():
                if isinstance(child, nn.LayerNorm):
                    setattr(parent, name, _to_fp32_layer_norm(child))
                elif isinstance(child, RMSNorm):
                    child.float()
    return out


# ---- RoPE from the runtime grid --------------------------------------------------------------
def rope_tables(
    rope: RotaryEmbedding,
    first: int | torch.SymInt,
    length: int | torch.SymInt,
    text_length: Tensor,
    grid: Tensor,
) -> tuple[Tensor, Tensor]:
    """cos/sin (length, hd) for sequence positions [first, first+length) of [text ; image row-major].

    Same arithmetic as `RotaryEmbedding.positions`: text i at (0, 0, i/L*s), image token j at
    ((j // w)/sqrt(h*w)*s, (j % w)/sqrt(h*w)*s, 0). `text_length` and `grid` are int64 tensors.
    """
    s = rope.pt_seq_len
    index = torch.arange(length, device=grid.device) + first
    h, w = grid[0], grid[1]
    mean_len = (h * w).float().sqrt()
    image = (index - text_length).clamp(min=0)
    px = torch.div(image, w, rounding_mode="floor").float() / mean_len * s
    py = torch.remainder(image, w).float() / mean_len * s
    if not rope.with_text:
        return rope(torch.stack([px, py], dim=-1))
    is_text = index < text_length
    pt = index.float() / text_length.clamp(min=1).float() * s
    zero = torch.zeros_like(px)
    pos = torch.stack(
        [torch.where(is_text, zero, px), torch.where(is_text, zero, py), torch.where(is_text, pt, zero)],
        dim=-1,
    )
    return rope(pos)


# ---- attention against past keys/values ------------------------------------------------------
def attend(attn: Attention, q: Tensor, k: Tensor, v: Tensor, fp32_softmax: bool) -> Tensor:
    """`Attention.attend` on rotated q, k, without its Python branch on lq == lk (a shape guard
    under export).

    Queries are the last lq of the lk key positions; the causal mask is built from aranges so
    it stays symbolic in both lengths. Scores/softmax optionally in fp32.
    """
    lq, lk = q.size(2), k.size(2)
    if attn.num_kv_heads != attn.num_heads:
        k = k.repeat_interleave(attn.num_heads // attn.num_kv_heads, dim=1)
        v = v.repeat_interleave(attn.num_heads // attn.num_kv_heads, dim=1)
    if fp32_softmax:
        q, k = q.float(), k.float()
    scores = (q @ k.transpose(-1, -2)) * attn.head_dim**-0.5  # (B, H, lq, lk)
    rows = torch.arange(lq, device=q.device)[:, None] + (lk - lq)
    mask = torch.arange(lk, device=q.device)[None, :] <= rows
    scores = scores.masked_fill(~mask, float("-inf"))
    out = scores.softmax(dim=-1).to(v.dtype) @ v  # (B, H, lq, hd)
    B, _, n, _ = out.shape
    out = attn.proj(out.transpose(1, 2).reshape(B, n, attn.num_heads * attn.head_dim))
    return attn.post_norm(out) if attn.post_norm is not None else out


def run_layers(
    block: FlowBlock,
    h: Tensor,
    past_keys: Tensor | None,
    past_values: Tensor | None,
    cos: Tensor,
    sin: Tensor,
    fp32_softmax: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """All layers on h (B, l, ch) at the positions of cos/sin (l, hd), after the cached ones.

    Keys are cached after RoPE: each position is rotated once, when its chunk runs, instead of
    the whole cache on every call (the reference's cache holds keys before RoPE and rotates all
    of them each step; same arithmetic per key: bench-256's fp32 pipeline output did not change
    by a single bit). Returns h and the chunk's rotated keys and its values, (layers, B, Hkv, l, hd).
    """
    new_keys, new_values = [], []
    for i, layer in enumerate(block.attn_blocks):
        q, k, v = layer.attention.project(h)  # k, v: (B, Hkv, l, hd), before RoPE
        q = apply_rope(q, cos, sin).to(v.dtype)
        k = apply_rope(k, cos, sin).to(v.dtype)
        new_keys.append(k)
        new_values.append(v)
        if past_keys is not None:
            k = torch.cat([past_keys[i].to(k.dtype), k], dim=2)
            v = torch.cat([past_values[i].to(v.dtype), v], dim=2)
        h = h + attend(layer.attention, q, k, v, fp32_softmax)
        h = h + layer.mlp(h)
    return h, torch.stack(new_keys), torch.stack(new_values)


# ---- the three graphs --------------------------------------------------------------------------
class StepGraph(nn.Module):
    """A chunk of transformer inputs against the cache -> mu, sigma (fp32), the chunk's keys/values.

    Inputs: x (B, c, D) fp32, the block-order inputs of positions [start, start+c) (sos for the
    first token, then the previous tokens); past_keys/past_values (layers, B, Hkv, P, hd), the
    cache of the P = text_length + start earlier positions (keys rotated by RoPE, as new_keys and
    the prefill's keys are); grid int64 (2,) = (h, w) tokens;
    start int64 () the image-token index of the chunk's first position.
    """

    def __init__(self, block: FlowBlock, rope: RotaryEmbedding, precision: Precision = FP32):
        super().__init__()
        self.block = cast_block(block, precision)
        self.rope = rope
        self.precision = precision

    def forward(
        self, x: Tensor, past_keys: Tensor, past_values: Tensor, grid: Tensor, start: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        block = self.block
        past = past_keys.size(3)
        cos, sin = rope_tables(self.rope, past, x.size(1), past - start, grid)
        h = block.proj_in(x.to(block.proj_in.weight.dtype))
        h, keys, values = run_layers(block, h, past_keys, past_values, cos, sin, self.precision.fp32_softmax)
        mu, sigma = block.head(h.float())
        return mu, sigma, keys, values


class PrefillGraph(nn.Module):
    """Text embeddings (B, L, txt_dim) fp32 -> their rotated keys, values (layers, B, Hkv, L, hd)."""

    def __init__(self, block: FlowBlock, rope: RotaryEmbedding, precision: Precision = FP32):
        super().__init__()
        self.block = cast_block(block, precision)
        self.rope = rope
        self.precision = precision

    def forward(self, text: Tensor) -> tuple[Tensor, Tensor]:
        block, s = self.block, self.rope.pt_seq_len
        L = text.size(1)
        pt = torch.arange(L, device=text.device).float() / L * s  # text i at (0, 0, i/L*s)
        zero = torch.zeros_like(pt)
        cos, sin = self.rope(torch.stack([zero, zero, pt], dim=-1))
        h = block.proj_txt(text.to(block.proj_txt.weight.dtype))
        _, keys, values = run_layers(block, h, None, None, cos, sin, self.precision.fp32_softmax)
        return keys, values


class ForwardGraph(nn.Module):
    """The whole sequence in block order -> z (fp32, block order), logdet = -log(sigma) (fp32).

    Inputs: x (B, T, D) fp32, grid int64 (2,) = (h, w), and text (B, L, txt_dim) fp32 on
    text-conditioned blocks. Teacher-forced: the same transformer pass the training loss uses.
    """

    def __init__(self, block: FlowBlock, rope: RotaryEmbedding, precision: Precision = FP32):
        super().__init__()
        self.block = cast_block(block, precision)
        self.rope = rope
        self.precision = precision

    def forward(self, x: Tensor, grid: Tensor, text: Tensor | None = None) -> tuple[Tensor, Tensor]:
        block = self.block
        dtype = block.proj_in.weight.dtype
        inp = torch.cat([block.sos_embed.to(x.dtype).expand(x.size(0), -1, -1), x[:, :-1]], dim=1)
        h = block.proj_in(inp.to(dtype))  # (B, T, ch)
        text_length = torch.zeros((), dtype=torch.int64)
        if text is not None:
            h = torch.cat([block.proj_txt(text.to(dtype)), h], dim=1)
            text_length = text_length + text.size(1)
        cos, sin = rope_tables(self.rope, 0, h.size(1), text_length, grid)
        h, _, _ = run_layers(block, h, None, None, cos, sin, self.precision.fp32_softmax)
        mu, sigma = block.head(h[:, h.size(1) - x.size(1) :].float())
        return (x - mu) / sigma, -sigma.log()
