"""The STARFlow reference model, read top to bottom: layers -> flow block -> model.

Numerically identical to Apple's official release (`transformer_flow.py`, `misc/pe.py`): the
parameter names are the official ones, so an official `state_dict` loads without renaming.
Shapes: B batch, C latent channels, H x W latent, p patch, h x w = H/p x W/p token grid,
T = h*w tokens of D = p*p*C channels, L text tokens, hd head_dim.

A flow block's sampling direction is one pure function, `FlowBlock.step` (a chunk of inputs
against past keys/values -> mu, sigma and the chunk's keys/values), with every shape taken from
tensors, so the same method is what `starflow export onnx` exports and what `starflow.core.sampler`
drives here. Keys are cached after RoPE: each position is rotated once, when its chunk runs.

One file on purpose (about 530 lines, over the project's ~400): like nanoGPT's model.py it reads
top to bottom, and the step the exporter depends on stays beside the layers it runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from starflow.core import sampler
from starflow.core.checks import check_latent, check_text
from starflow.core.config import DENOISER_LAYERS, StarFlowConfig
from starflow.core.errors import StarflowError
from starflow.core.limits import check_fits
from starflow.core.sampler import BlockStats, CachedStep, SampleOptions

INV_SOFTPLUS_1 = 0.541324854612918  # softplus(a + this) == 1 at a == 0
LEARNED_DENOISER_STEP = 0.3  # x - 0.3 * D(x): the official sampler's `noise_std_const`
TEXT_ROPE_DIMS = 8  # frequency dims reserved for the text/time axis when the model has text
Rope = tuple[Tensor, Tensor] | None  # cos, sin (positions, hd); None: a learned pos_embed instead


# ---- layers --------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """Gemma-style RMSNorm: weight starts at 0 and scales by (1 + w); computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        out = x.float()
        out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1 + self.weight.float())).type_as(x)


def make_norm(norm_type: str, dim: int) -> nn.Module:
    return nn.LayerNorm(dim) if norm_type == "layer_norm" else RMSNorm(dim)


class RotaryEmbedding(nn.Module):
    """2D RoPE over the token grid, 3D (x, y, text/time) when the model has text.

    Positions are normalised by the grid's mean side (`/ sqrt(h*w) * pt_seq_len`), which is
    what lets one set of weights serve other resolutions and aspect ratios. They are computed
    from a grid tensor with tensor ops only, so an exported graph takes any grid. The
    frequencies are fp32 non-persistent buffers (official checkpoints carry only deprecated
    all-zero tables) and stay fp32 when the model is cast to bf16/fp16.
    """

    def __init__(self, head_dim: int, pt_seq_len: int, with_text: bool):
        super().__init__()
        self.pt_seq_len = pt_seq_len
        self.with_text = with_text
        half = head_dim // 2
        spatial = half - TEXT_ROPE_DIMS if with_text else half
        # computed on the CPU even when the model is built on the meta device (checkpoint loading)
        freqs = 1.0 / (10000 ** (torch.arange(0, spatial, 2, device="cpu")[: spatial // 2].float() / spatial))
        self.register_buffer("spatial_freqs", freqs, persistent=False)
        text_freqs = 1.0 / (10000 ** (torch.arange(TEXT_ROPE_DIMS, device="cpu").float() / TEXT_ROPE_DIMS))
        self.register_buffer("text_freqs", text_freqs, persistent=False)

    def _apply(self, fn, recurse=True):  # noqa: ANN001 (nn.Module's signature)
        """Follow device moves, never dtype casts: the angles need fp32 frequencies (casting
        back after the cast would keep bf16's rounding)."""
        kept = {name: getattr(self, name) for name in ("spatial_freqs", "text_freqs")}
        super()._apply(fn, recurse)
        for name, frequencies in kept.items():
            setattr(self, name, frequencies.to(getattr(self, name).device))
        return self

    def tables(self, first, length, text_length, grid: Tensor) -> tuple[Tensor, Tensor]:
        """cos/sin (length, hd) of sequence positions [first, first+length) of [text ; image raster].

        Text token i sits at (0, 0, i/L*s), image token j of frame f at ((j // w)/sqrt(h*w)*s,
        (j % w)/sqrt(h*w)*s, f), with frames of h*w tokens in order (an image is frame 0);
        `grid` is the int64 (h, w) token grid of one frame, `text_length` L.
        """
        s = self.pt_seq_len
        index = torch.arange(length, device=grid.device) + first
        text_length = torch.as_tensor(text_length, device=grid.device)
        h, w = grid[0], grid[1]
        mean_len = (h * w).float().sqrt()
        image = (index - text_length).clamp(min=0)
        frame, within = torch.div(image, h * w, rounding_mode="floor"), torch.remainder(image, h * w)
        px = torch.div(within, w, rounding_mode="floor").float() / mean_len * s
        py = torch.remainder(within, w).float() / mean_len * s
        if not self.with_text:
            return self(torch.stack([px, py], dim=-1))
        is_text = index < text_length
        pt = index.float() / text_length.clamp(min=1).float() * s
        zero = torch.zeros_like(px)
        pos = [
            torch.where(is_text, zero, px),
            torch.where(is_text, zero, py),
            torch.where(is_text, pt, frame.float()),
        ]
        return self(torch.stack(pos, dim=-1))

    def text_tables(self, length) -> tuple[Tensor, Tensor]:
        """cos/sin (L, hd) of the text positions alone, (0, 0, i/L*s)."""
        pt = torch.arange(length, device=self.text_freqs.device).float() / length * self.pt_seq_len
        zero = torch.zeros_like(pt)
        return self(torch.stack([zero, zero, pt], dim=-1))

    def forward(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin tables (N, head_dim) for positions (N, 2 or 3)."""
        pos = pos.to(self.spatial_freqs.device, torch.float32)
        angles = [pos[:, 0, None] * self.spatial_freqs, pos[:, 1, None] * self.spatial_freqs]
        if self.with_text:
            angles.append(pos[:, 2, None] * self.text_freqs)
        angles = torch.cat(angles, dim=-1).repeat_interleave(2, dim=-1)
        return angles.cos(), angles.sin()


def apply_rope(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """GPT-J style rotation over adjacent channel pairs: (a, b) -> (a cos - b sin, b cos + a sin)."""
    a, b = t.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((-b, a), dim=-1).flatten(-2)
    return t * cos + rotated * sin


class Attention(nn.Module):
    """Pre-norm causal self-attention with a fused qkv, optional GQA, qk-norm and post-norm."""

    def __init__(self, config: StarFlowConfig, channels: int):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.heads(channels)
        self.head_dim = hd = config.head_dim
        self.norm = make_norm(config.norm_type, channels)
        self.qkv = nn.Linear(channels, (self.num_heads + 2 * self.num_kv_heads) * hd, bias=config.use_bias)
        self.proj = nn.Linear(self.num_heads * hd, channels, bias=config.use_bias)
        self.query_norm = RMSNorm(hd) if config.use_qk_norm else None
        self.key_norm = RMSNorm(hd) if config.use_qk_norm else None
        self.post_norm = RMSNorm(channels) if config.use_post_norm else None

    def forward(
        self, x: Tensor, rope: Rope, past: tuple[Tensor, Tensor] | None = None, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, l, ch) after `past` cached positions -> out, and the chunk's rotated k and its v.
        `mask` (l, l) bool replaces the causal mask (the non-causal denoiser)."""
        B, n, _ = x.shape
        hd, H, Hkv = self.head_dim, self.num_heads, self.num_kv_heads
        q, k, v = self.qkv(self.norm(x)).split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
        q = q.view(B, n, H, hd).transpose(1, 2)  # (B, H, l, hd)
        k = k.view(B, n, Hkv, hd).transpose(1, 2)  # (B, Hkv, l, hd)
        v = v.view(B, n, Hkv, hd).transpose(1, 2)
        if self.query_norm is not None:
            q, k = self.query_norm(q), self.key_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope).to(v.dtype), apply_rope(k, *rope).to(v.dtype)
        keys, values = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        out = self.attend(q, keys, values, mask)
        out = self.proj(out.transpose(1, 2).reshape(B, n, H * hd))
        return (self.post_norm(out) if self.post_norm is not None else out), k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """Causal attention (the queries are the last lq of the lk key positions), or `mask`'s."""
        if self.num_kv_heads != self.num_heads:
            k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
            v = v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
        scale = self.head_dim**-0.5
        lq, lk = q.size(2), k.size(2)
        if self.training and lq == lk:  # the fused kernel (flash attention on GPU) for training
            causal = mask is None
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
        # Explicit math otherwise (inference, export, a training run's sample grids): the mask is
        # built from aranges, so it stays symbolic in both lengths when exported, and the scores
        # and softmax are fp32 even in fp16 and bf16 copies.
        scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # (B, H, lq, lk)
        if mask is None:
            rows = torch.arange(lq, device=q.device)[:, None] + (lk - lq)
            mask = torch.arange(lk, device=q.device)[None, :] <= rows
        return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1).to(v.dtype) @ v


class MLP(nn.Module):
    """Pre-norm MLP: GELU (`main.0`, `main.2`) or SwiGLU with a tanh-GELU gate."""

    def __init__(self, config: StarFlowConfig, channels: int, expansion: int = 4):
        super().__init__()
        hidden = channels * expansion
        bias = config.use_bias
        self.norm = make_norm(config.norm_type, channels)
        self.post_norm = RMSNorm(channels) if config.use_post_norm else None
        self.use_swiglu = config.use_swiglu
        if self.use_swiglu:
            self.gate_proj = nn.Linear(channels, hidden, bias=bias)
            self.up_proj = nn.Linear(channels, hidden, bias=bias)
            self.down_proj = nn.Linear(hidden, channels, bias=bias)
        else:
            self.main = nn.Sequential(
                nn.Linear(channels, hidden, bias=bias),
                nn.GELU(),
                nn.Linear(hidden, channels, bias=bias),
            )

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        if self.use_swiglu:
            x = self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))
        else:
            x = self.main(x)
        return self.post_norm(x) if self.post_norm is not None else x


class AttentionBlock(nn.Module):
    def __init__(self, config: StarFlowConfig, channels: int):
        super().__init__()
        self.attention = Attention(config, channels)
        self.mlp = MLP(config, channels)

    def forward(
        self,
        x: Tensor,
        rope: Rope,
        past: tuple[Tensor, Tensor] | None = None,
        cache: bool = True,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """x after the `past` positions -> x, and the chunk's rotated keys and values if `cache`
        (the teacher-forced pass keeps none: under FSDP every returned tensor gets a hook)."""
        out, k, v = self.attention(x, rope, past, mask)
        x = x + out
        x = x + self.mlp(x)
        return (x, k, v) if cache else (x, None, None)


# ---- flow block ----------------------------------------------------------------------------
class FlowBlock(nn.Module):
    """One autoregressive affine flow (`MetaBlock`): z = (x - mu(x_<t)) / sigma(x_<t).

    The sequence is permuted (identity or flip) before the causal transformer; RoPE positions
    are not permuted. Text tokens, when the block is conditioned, are prepended to the sequence.
    As a `starflow.core.sampler.SamplerBlock` it is inverted by the shared sampling loop through `open`.
    """

    def __init__(
        self,
        config: StarFlowConfig,
        num_layers: int,
        channels: int,
        flip: bool,
        text_conditioned: bool,
        index: int,
    ):
        super().__init__()
        D = config.token_dim
        self.index, self.deep = index, index == config.num_blocks - 1
        self.flip = flip
        self.flip_in_frame = config.temporal_causal > 0  # a flip keeps the frames in order
        self.frame_local = config.shallow_block_local and not self.deep  # one frame per sequence
        self.use_sos = config.sos
        self.use_softplus = config.use_softplus
        self.soft_clip = config.soft_clip
        self.text_conditioned = text_conditioned
        _, self.num_kv_heads = config.heads(channels)
        self.head_dim = config.head_dim
        self.proj_in = nn.Linear(D, channels)
        self.proj_out = nn.Linear(channels, 2 * D)
        nn.init.zeros_(self.proj_out.weight)  # every block starts as the identity (official init)
        if config.sos:
            self.sos_embed = nn.Parameter(torch.randn(1, 1, D))
        self.rope = None
        if config.rope:
            self.rope = RotaryEmbedding(config.head_dim, config.rope_seq_len, config.txt_size > 0)
        else:
            grid = config.latent_size // config.patch_size
            self.pos_embed = nn.Parameter(torch.randn(grid * grid, channels) * 1e-2)
        if text_conditioned:
            self.proj_txt = nn.Linear(config.txt_dim, channels)
        self.attn_blocks = nn.ModuleList(AttentionBlock(config, channels) for _ in range(num_layers))
        self.final_norm = RMSNorm(channels) if config.use_final_norm else None

    def permute(self, x: Tensor, frames: int = 1) -> Tensor:
        """Token order seen by the transformer, x (B, frames * h * w, D); its own inverse."""
        return sampler.permute(x, self.flip, self.flip_in_frame, frames)

    def learned_positions(self, start, length) -> Tensor:
        """The learned pos_embed (rope: 0) of block positions [start, start + length), (length, ch)."""
        pos_embed = self.pos_embed.flip(0) if self.flip else self.pos_embed
        return pos_embed[start : start + length]

    def transformer(
        self,
        h: Tensor,
        rope: Rope,
        past_keys: Tensor | None = None,
        past_values: Tensor | None = None,
        cache: bool = True,
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Every layer on h (B, l, ch) after the cached positions -> h, per-layer rotated k and v
        (empty lists without `cache`)."""
        keys, values = [], []
        for i, layer in enumerate(self.attn_blocks):
            past = None if past_keys is None else (past_keys[i].to(h.dtype), past_values[i].to(h.dtype))
            h, k, v = layer(h, rope, past, cache)
            if cache:
                keys.append(k)
                values.append(v)
        return h, keys, values

    def head(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Hidden states (B, l, ch) -> mu, sigma (B, l, D) in fp32, after soft-clip."""
        h = h.to(self.proj_out.weight.dtype)  # an fp16 copy keeps its head in fp32 (export)
        if self.final_norm is not None:
            h = self.final_norm(h)
        out = self.proj_out(h)
        if self.soft_clip > 0:
            out = self.soft_clip * torch.tanh(out / self.soft_clip)
        a, mu = out.float().chunk(2, dim=-1)
        sigma = F.softplus(a + INV_SOFTPLUS_1) if self.use_softplus else a.exp()
        return mu, sigma

    # -- training direction --
    def density(self, x: Tensor, grid: Tensor, text: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Teacher-forced pass in block order: x (B, T, D) -> z (fp32), logdet = -log sigma (B, T, D)."""
        B, T = x.size(0), x.size(1)
        inp = torch.cat([self.sos_embed.to(x.dtype).expand(B, -1, -1), x[:, :-1]], 1) if self.use_sos else x
        h = self.proj_in(inp.to(self.proj_in.weight.dtype))  # (B, T, ch)
        if self.rope is None:
            h = h + self.learned_positions(0, T)
        text_length = torch.zeros((), dtype=torch.int64, device=grid.device)
        if text is not None:
            h = torch.cat([self.proj_txt(text.to(h.dtype)), h], dim=1)  # (B, L + T, ch)
            text_length = text_length + text.size(1)
        rope = self.rope.tables(0, h.size(1), text_length, grid) if self.rope is not None else None
        h, _, _ = self.transformer(h, rope, cache=False)
        mu, sigma = self.head(h[:, h.size(1) - T :])
        if not self.use_sos:  # TarFlow style: token t is predicted from x_<t; token 0 passes
            mu = torch.cat([torch.zeros_like(mu[:, :1]), mu[:, :-1]], 1)
            sigma = torch.cat([torch.ones_like(sigma[:, :1]), sigma[:, :-1]], 1)
        return (x.float() - mu) / sigma, -sigma.log()

    def vjp(self, x: Tensor, grid: Tensor, grad_z: Tensor, text: Tensor | None = None) -> Tensor:
        """The density pass's vector-Jacobian product, one block's step of the NLL gradient: x and
        grad_z (B, T, D) in block order -> d/dx of sum(grad_z * z) - sum(logdet) (fp32)."""
        return self.density_and_vjp(x, grid, grad_z, text)[2]

    def density_and_vjp(
        self, x: Tensor, grid: Tensor, grad_z: Tensor, text: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """`density` and `vjp` in one pass: z, logdet and the gradient (the exporter traces the
        forward and vjp graphs together from it)."""
        with torch.enable_grad():
            x = x.detach().float().requires_grad_(True)
            z, logdet = self.density(x, grid, text)
            (grad,) = torch.autograd.grad((z * grad_z).sum() - logdet.sum(), [x])
        return z.detach(), logdet.detach(), grad

    def forward(self, x: Tensor, text: Tensor | None, grid: Tensor, frames: int = 1) -> tuple[Tensor, Tensor]:
        """x (B, T, D) raster order, frame after frame -> z (B, T, D) raster order, logdet
        (B, T, D) block order."""
        z, logdet = self.density(self.permute(x, frames), grid, text)
        return self.permute(z, frames).to(x.dtype), logdet

    # -- sampling direction: the step graph, and the sampler's view of it --
    def prefill(self, text: Tensor) -> tuple[Tensor, Tensor]:
        """Text (B, L, txt_dim) -> its rotated keys and values (layers, B, Hkv, L, hd)."""
        h = self.proj_txt(text.to(self.proj_txt.weight.dtype))
        rope = self.rope.text_tables(text.size(1)) if self.rope is not None else None
        _, keys, values = self.transformer(h, rope)
        return torch.stack(keys), torch.stack(values)

    def step(
        self, x: Tensor, past_keys: Tensor, past_values: Tensor, grid: Tensor, start
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """A chunk against the cache -> mu, sigma (B, c, D) fp32 and its keys/values.

        x (B, c, D): the block-order inputs of positions [start, start + c) (sos for the first
        token, then the previous tokens); past_keys/past_values (layers, B, Hkv, P, hd): the
        P = text length + start earlier positions, keys rotated as this returns them; grid int64
        (h, w) tokens. Returns mu, sigma and the chunk's keys/values (layers, B, Hkv, c, hd).
        """
        past = past_keys.size(3)
        h = self.proj_in(x.to(self.proj_in.weight.dtype))  # (B, c, ch)
        if self.rope is None:
            rope = None
            h = h + self.learned_positions(start, h.size(1))
        else:
            rope = self.rope.tables(past, h.size(1), past - start, grid)
        h, keys, values = self.transformer(h, rope, past_keys, past_values)
        mu, sigma = self.head(h)
        return mu, sigma, torch.stack(keys), torch.stack(values)

    @property
    def sos(self) -> Tensor | None:
        return self.sos_embed.detach().float() if self.use_sos else None

    def open(self, rows: int, grid: tuple[int, int], text: Tensor | None, tokens: int) -> CachedStep:
        """`step` over a fresh cache of `tokens` positions for `rows` sequences, the text
        prefilled (sampler.SamplerBlock)."""
        device, dtype = self.proj_in.weight.device, self.proj_in.weight.dtype
        grid_tensor = torch.tensor(grid, dtype=torch.int64, device=device)
        text_length = 0 if text is None else text.size(1)
        shape = (
            len(self.attn_blocks),
            rows,
            self.num_kv_heads,
            text_length + tokens,
            self.head_dim,
        )
        keys = torch.zeros(shape, dtype=dtype, device=device)
        values = torch.zeros_like(keys)

        def run(x: Tensor, past_keys: Tensor, past_values: Tensor, start: int):
            return self.step(x, past_keys, past_values, grid_tensor, start)

        step = CachedStep(run, keys, values, text_length)
        if text is not None:
            step.prefill(*self.prefill(text))
        return step


class IdentityBlock(nn.Module):
    """A block with `layers_per_block` 0: passes tokens through (official `IdentityBlock`)."""

    text_conditioned = flip = flip_in_frame = frame_local = False

    def density(self, x: Tensor, grid: Tensor, text: Tensor | None) -> tuple[Tensor, Tensor]:
        """z = x, logdet 0 (the sampler's density loop; sampling leaves the block out)."""
        return x, torch.zeros_like(x, dtype=torch.float32)

    def vjp(self, x: Tensor, grid: Tensor, grad_z: Tensor, text: Tensor | None) -> Tensor:
        return grad_z


class Denoiser(nn.Module):
    """STARFlow-V's learnable self-denoiser (official `NonCausalBlock`): bidirectional layers
    that map a sample's tokens to a correction, used as x - LEARNED_DENOISER_STEP * D(x) in place
    of the gradient step. With `temporal_causal` A > 0 a token of frame f attends to frames
    [f + A - 1 - window, f + A - 1] (`denoiser_window`, else unbounded) and to all text."""

    def __init__(self, config: StarFlowConfig):
        super().__init__()
        D, channels = config.token_dim, config.channels
        self.block_causal, self.window = config.temporal_causal, config.denoiser_window
        self.proj_in = nn.Linear(D, channels)
        self.proj_out = nn.Linear(channels, D)
        nn.init.zeros_(self.proj_out.weight)
        self.rope = (
            RotaryEmbedding(config.head_dim, config.rope_seq_len, config.txt_size > 0)
            if config.rope
            else None
        )
        self.text_conditioned = config.conditional_denoiser
        if self.text_conditioned:
            self.proj_txt = nn.Linear(config.txt_dim, channels)
        self.attn_blocks = nn.ModuleList(AttentionBlock(config, channels) for _ in range(DENOISER_LAYERS))
        self.final_norm = RMSNorm(channels) if config.use_final_norm else None

    def mask(self, text_length: int, tokens: int, frame_tokens: Tensor, device: torch.device) -> Tensor:
        """(L + N, L + N) bool: which keys each query sees (all of them without frame blocks)."""
        index = torch.arange(text_length + tokens, device=device)
        q, k = index[:, None], index[None, :]
        if not self.block_causal:
            return torch.ones(q.size(0), k.size(1), dtype=torch.bool, device=device)
        A, window = self.block_causal, self.window or 10000  # the official "no window"
        key_frame = torch.div(k - text_length, frame_tokens, rounding_mode="floor")
        query_frame = torch.div(q - text_length, frame_tokens, rounding_mode="floor")
        last = torch.div((q - text_length).clamp(min=0), frame_tokens, rounding_mode="floor") + A - 1
        return (k < text_length) | ((key_frame >= query_frame + A - 1 - window) & (key_frame <= last))

    def forward(self, x: Tensor, text: Tensor | None, grid: Tensor) -> Tensor:
        """Tokens x (B, N, D), frame-major over (h, w) frames -> the correction (B, N, D)."""
        N = x.size(1)
        h = self.proj_in(x.to(self.proj_in.weight.dtype))
        L = 0
        if self.text_conditioned:
            h = torch.cat([self.proj_txt(text.to(h.dtype)), h], dim=1)
            L = text.size(1)
        # a tensor, not the int: torch.export would specialise the text length to the example's
        text_length = torch.zeros((), dtype=torch.int64, device=grid.device) + L
        rope = self.rope.tables(0, L + N, text_length, grid) if self.rope is not None else None
        mask = self.mask(L, N, grid[0] * grid[1], x.device)
        for layer in self.attn_blocks:
            h, _, _ = layer(h, rope, cache=False, mask=mask)
        h = h[:, L:]
        if self.final_norm is not None:
            h = self.final_norm(h)
        return self.proj_out(h)


# ---- model ---------------------------------------------------------------------------------
@dataclass
class FlowOutput:
    z: Tensor  # (B, C, H, W) or (B, F, C, H, W), same shape as the input
    # per block in forward order, (B, T, D) in that block's token order; a frame-local block's
    # (B, F, h*w, D) for a clip
    logdets: list[Tensor]
    outputs: list[Tensor]  # patchified input then each block's output, (B, h, w, D) or (B, F, h, w, D)


@dataclass
class NLL:
    loss: Tensor  # the official training loss: mean over batch of 0.5*mean(z^2) - sum mean(logdet)
    bits_per_dim: Tensor  # (loss + 0.5*log(2*pi)) / log(2): Gaussian NLL per latent dim, in bits


class StarFlow(nn.Module):
    """STARFlow: `num_blocks` flow blocks; blocks[-1] is the deep, text-conditioned one."""

    def __init__(self, config: StarFlowConfig):
        super().__init__()
        if config.txt_size > 0 and config.txt_dim <= 0:
            raise StarflowError(
                "config has txt_size > 0 but no txt_dim (the text encoder's width): set txt_dim, "
                "or load with a checkpoint so it is read from the proj_txt weight"
            )
        if torch.empty(0).device.type != "meta":  # built unallocated, it takes a checkpoint's memory
            check_fits(
                4 * config.estimated_parameters(),
                f"a model of {config.estimated_parameters():,} parameters (fp32)",
            )
        self.config = config
        n = config.num_blocks
        blocks: list[nn.Module] = []
        for i, (layers, flip) in enumerate(zip(config.block_layers, config.block_flips(), strict=True)):
            deep = i == n - 1
            text = config.txt_dim > 0 and (deep or not config.cond_top_only)
            channels = config.deep_channels if deep else config.channels
            blocks.append(FlowBlock(config, layers, channels, flip, text, i) if layers else IdentityBlock())
        self.blocks = nn.ModuleList(blocks)
        # the official attribute name, so official checkpoints load as they are
        self.learnable_self_denoiser = Denoiser(config) if config.learnable_self_denoiser else None

    @property
    def text_dim(self) -> int:
        """The text embedding width the model takes, 0 when no block is text-conditioned."""
        return self.config.txt_dim if any(b.text_conditioned for b in self.blocks) else 0

    def sampling_blocks(self) -> list[FlowBlock]:
        """The flow blocks in sampling order (deep block first); identity blocks left out."""
        return [b for b in reversed(self.blocks) if isinstance(b, FlowBlock)]

    def check_latent(self, x: Tensor, name: str) -> tuple[int, int]:
        """`checks.check_latent`, plus what only the PyTorch model needs; returns the grid."""
        cfg = self.config
        h, w = check_latent(x, cfg.channel_size, cfg.patch_size, name, (4, 5) if cfg.video else (4,))
        if not x.is_floating_point():
            raise StarflowError(f"{name}: expected a floating-point tensor, got {x.dtype}")
        if not cfg.rope and (h, w) != (side := cfg.latent_size // cfg.patch_size,) * 2:
            raise StarflowError(
                f"{name}: a model with learned pos_embed (rope: 0) only takes its training grid "
                f"{side}x{side} tokens ({side * cfg.patch_size}x{side * cfg.patch_size} latent), got {h}x{w}"
            )
        return h, w

    # -- density --
    def forward(self, x: Tensor, y: Tensor | None = None) -> FlowOutput:
        """Training direction: latent x (B, C, H, W) or clip (B, F, C, H, W) -> z, per-block logdets."""
        h, w = self.check_latent(x, "x")
        check_text(y, x.size(0), self.text_dim, None, "y")
        z, logdets, outputs = sampler.density(self.blocks, x, y, patch_size=self.config.patch_size)
        shape = (x.size(1), h, w) if x.dim() == 5 else (h, w)
        return FlowOutput(z, logdets, [seq.unflatten(1, shape) for seq in outputs])

    @staticmethod
    def loss(out: FlowOutput) -> Tensor:
        """The official loss: mean over batch of 0.5*mean(z^2) - sum over blocks of mean(logdet)."""
        return sampler.nll_per_sample(out.z, out.logdets).mean()

    def nll(self, x: Tensor, y: Tensor | None = None) -> NLL:
        loss = self.loss(self(x, y))
        return NLL(loss, sampler.to_bits_per_dim(loss))

    def denoise(self, x: Tensor, y: Tensor | None, noise_std: float, window: int | None = None) -> Tensor:
        """The official denoising step after sampling: the learned denoiser when the model has
        one (clips longer than `window` frames in overlapping windows, as the official sampler),
        else one Tweedie step x - noise_std^2 * grad_x NLL(x) per sample (the self-denoise)."""
        if self.learnable_self_denoiser is not None:
            with torch.no_grad():
                if x.dim() == 5:
                    return sampler.denoise_windows(x.clone(), self.learned_denoise_step(y), window)
                return self.learned_denoise_step(y)(x)
        with torch.enable_grad():
            x = x.detach().clone().requires_grad_(True)
            loss = self.loss(self(x, y))
            (grad,) = torch.autograd.grad(loss, [x])
        # loss is a per-dim mean over the batch: numel * grad is the gradient of each sample's total NLL
        return (x - noise_std**2 * x.numel() * grad).detach()

    def learned_denoise_step(self, y: Tensor | None) -> Callable[[Tensor], Tensor]:
        """x -> x - LEARNED_DENOISER_STEP * D(x, y), for latents or clips."""
        denoiser, p = self.learnable_self_denoiser, self.config.patch_size

        def step(x: Tensor) -> Tensor:
            h, w = self.check_latent(x, "x")
            frames = x.size(1) if x.dim() == 5 else None
            grid = torch.tensor([h, w], device=x.device)
            text = y if denoiser.text_conditioned else None
            out = denoiser(sampler.patchify(x, p), text, grid)
            return x - LEARNED_DENOISER_STEP * sampler.unpatchify(out, p, h, w, frames).to(x.dtype)

        return step

    # -- sampling --
    @torch.no_grad()
    def sample(
        self,
        noise: Tensor,
        y: Tensor | None = None,
        y_uncond: Tensor | None = None,
        options: SampleOptions | None = None,
        *,
        return_stats: bool = False,
        progress: sampler.Progress[int] | None = None,
    ) -> Tensor | tuple[Tensor, list[BlockStats]]:
        """Invert the flow: noise (B, C, H, W) or (B, F, C, H, W) -> latent, through
        `starflow.core.sampler.sample`.

        With `options.guidance > 0` the deep block runs on `[y ; y_uncond]` and the official CFG
        formula; with `cond_top_only` the uncond half is dropped before the shallow blocks.
        Stats (per block, in sampling order) are returned when `return_stats`.
        """
        cfg = self.config
        options = options or SampleOptions()
        if options.window is None and cfg.local_attn_window:
            options = dataclasses.replace(options, window=cfg.local_attn_window)
        sampler.check_sample_inputs(
            noise, y, y_uncond, options, channels=cfg.channel_size, patch_size=cfg.patch_size,
            text_dim=self.text_dim, video=cfg.video,
        )  # fmt: skip
        self.check_latent(noise, "noise")
        x, stats = sampler.sample(
            self.sampling_blocks(), noise.float(), y, y_uncond, options, patch_size=cfg.patch_size,
            guide_deep_only=cfg.cond_top_only, progress=progress, agree=_every_rank_agrees(),
        )  # fmt: skip
        out = x.to(noise.dtype)
        return (out, stats) if return_stats else out


def _every_rank_agrees():
    """In a distributed run every rank must stop a Jacobi chunk together (the official all-reduce)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"

    def agree(done: bool) -> bool:
        flag = torch.tensor(done, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag)

    return agree
