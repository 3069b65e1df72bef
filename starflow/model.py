"""The STARFlow reference model, read top to bottom: layers -> flow block -> model -> samplers.

Numerically identical to Apple's official release (`transformer_flow.py`, `misc/pe.py`): the
parameter names are the official ones, so an official `state_dict` loads without renaming.
Shapes: B batch, C latent channels, H x W latent, p patch, h x w = H/p x W/p token grid,
T = h*w tokens of D = p*p*C channels, L text tokens, hd head_dim.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from starflow.config import StarFlowConfig
from starflow.errors import StarflowError
from starflow.stats import BlockStats

INV_SOFTPLUS_1 = 0.541324854612918  # softplus(a + this) == 1 at a == 0
TEXT_ROPE_DIMS = 8  # frequency dims reserved for the text/time axis when the model has text


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
    what lets one set of weights serve other resolutions and aspect ratios. The frequencies are
    non-persistent buffers: official checkpoints carry only deprecated all-zero tables.
    """

    def __init__(self, head_dim: int, pt_seq_len: int, with_text: bool):
        super().__init__()
        self.pt_seq_len = pt_seq_len
        self.with_text = with_text
        half = head_dim // 2
        spatial = half - TEXT_ROPE_DIMS if with_text else half
        freqs = 1.0 / (10000 ** (torch.arange(0, spatial, 2)[: spatial // 2].float() / spatial))
        self.register_buffer("spatial_freqs", freqs, persistent=False)
        text_freqs = 1.0 / (10000 ** (torch.arange(0, TEXT_ROPE_DIMS).float() / TEXT_ROPE_DIMS))
        self.register_buffer("text_freqs", text_freqs, persistent=False)

    def positions(self, h: int, w: int, txt_len: int = 0) -> Tensor:
        """(txt_len + h*w, 2 or 3) positions: text first at (0, 0, i/L*s), then (px, py, 0)."""
        mean_len = math.sqrt(h * w)
        px = torch.arange(h) / mean_len * self.pt_seq_len
        py = torch.arange(w) / mean_len * self.pt_seq_len
        px, py = (p.reshape(-1) for p in torch.meshgrid(px, py, indexing="ij"))
        if not self.with_text:
            return torch.stack([px, py], dim=-1)
        pt = torch.arange(txt_len) / max(txt_len, 1) * self.pt_seq_len
        zeros = torch.zeros_like(pt)
        pos = [
            torch.cat([zeros, px]),
            torch.cat([zeros, py]),
            torch.cat([pt, torch.zeros_like(px)]),
        ]
        return torch.stack(pos, dim=-1)

    def forward(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin tables (N, head_dim) for positions (N, 2 or 3)."""
        pos = pos.to(self.spatial_freqs.device, torch.float32)
        spatial, text = self.spatial_freqs.float(), self.text_freqs.float()  # fp32 even in a bf16 model
        angles = [pos[:, 0, None] * spatial, pos[:, 1, None] * spatial]
        if self.with_text:
            angles.append(pos[:, 2, None] * text)
        angles = torch.cat(angles, dim=-1).repeat_interleave(2, dim=-1)
        return angles.cos(), angles.sin()


def apply_rope(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """GPT-J style rotation over adjacent channel pairs: (a, b) -> (a cos - b sin, b cos + a sin)."""
    a, b = t.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((-b, a), dim=-1).flatten(-2)
    return t * cos + rotated * sin


class KVCache:
    """Keys/values of one flow block, preallocated at full length and written by position.

    Keys are stored before RoPE (RoPE is applied to the whole key range on use). A Jacobi
    iteration rewinds by writing the same positions again; nothing is ever reallocated.
    """

    def __init__(
        self,
        layers: int,
        batch: int,
        kv_heads: int,
        length: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        shape = (layers, batch, kv_heads, length, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)

    def write(self, layer: int, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the chunk at [start, start+l) and return every key/value up to its end."""
        end = start + k.size(2)
        self.keys[layer, :, :, start:end] = k
        self.values[layer, :, :, start:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


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

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, H, l, hd) and the chunk's k, v (B, Hkv, l, hd), normed but before RoPE."""
        B, n, _ = x.shape
        hd, H, Hkv = self.head_dim, self.num_heads, self.num_kv_heads
        q, k, v = self.qkv(self.norm(x)).split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
        q = q.view(B, n, H, hd).transpose(1, 2)
        k = k.view(B, n, Hkv, hd).transpose(1, 2)
        v = v.view(B, n, Hkv, hd).transpose(1, 2)
        if self.query_norm is not None:
            q, k = self.query_norm(q), self.key_norm(k)
        return q, k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        """Queries are the last l of the lk key positions; rope tables cover [0, lk)."""
        lq, lk = q.size(2), k.size(2)
        if rope is not None:
            cos, sin = rope
            q = apply_rope(q, cos[lk - lq : lk], sin[lk - lq : lk]).to(v.dtype)
            k = apply_rope(k, cos[:lk], sin[:lk]).to(v.dtype)
        if self.num_kv_heads != self.num_heads:
            k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
            v = v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
        scale = self.head_dim**-0.5
        if lq == lk:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        else:
            mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        B, _, n, _ = out.shape
        out = self.proj(out.transpose(1, 2).reshape(B, n, self.num_heads * self.head_dim))
        return self.post_norm(out) if self.post_norm is not None else out

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        cache: KVCache | None = None,
        layer: int = 0,
        start: int = 0,
    ) -> Tensor:
        q, k, v = self.project(x)
        if cache is not None:
            k, v = cache.write(layer, start, k, v)
        return self.attend(q, k, v, rope)


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
        rope: tuple[Tensor, Tensor] | None,
        cache: KVCache | None = None,
        layer: int = 0,
        start: int = 0,
    ) -> Tensor:
        x = x + self.attention(x, rope, cache, layer, start)
        return x + self.mlp(x)


# ---- flow block ----------------------------------------------------------------------------
def guide(mu: Tensor, sigma: Tensor, weight: float) -> tuple[Tensor, Tensor]:
    """The official CFG on a `[cond ; uncond]` batch; both halves receive the guided values."""
    mu_c, mu_u = mu.chunk(2)
    sigma_c, sigma_u = sigma.chunk(2)
    s = (sigma_c / sigma_u).clip(max=1.0).square()
    sigma_g = sigma_c / (1 + weight - weight * s).sqrt()
    mu_g = ((1 + weight) * mu_c - (weight * s) * mu_u) / (1 + weight - weight * s)
    return torch.cat([mu_g, mu_g]), torch.cat([sigma_g, sigma_g])


class FlowBlock(nn.Module):
    """One autoregressive affine flow (`MetaBlock`): z = (x - mu(x_<t)) / sigma(x_<t).

    The sequence is permuted (identity or flip) before the causal transformer; RoPE positions
    are not permuted. Text tokens, when the block is conditioned, are prepended to the sequence.
    """

    def __init__(
        self, config: StarFlowConfig, num_layers: int, channels: int, flip: bool, text_conditioned: bool
    ):
        super().__init__()
        D = config.token_dim
        self.flip = flip
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
        if not config.rope:
            grid = config.latent_size // config.patch_size
            self.pos_embed = nn.Parameter(torch.randn(grid * grid, channels) * 1e-2)
        if text_conditioned:
            self.proj_txt = nn.Linear(config.txt_dim, channels)
        self.attn_blocks = nn.ModuleList(AttentionBlock(config, channels) for _ in range(num_layers))
        self.final_norm = RMSNorm(channels) if config.use_final_norm else None

    def permute(self, x: Tensor) -> Tensor:
        """Token order seen by the transformer; its own inverse."""
        return x.flip(1) if self.flip else x

    def permuted_pos_embed(self, start: int, length: int) -> Tensor:
        pos_embed = self.pos_embed.flip(0) if self.flip else self.pos_embed
        return pos_embed[start : start + length]

    def head(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Hidden states (B, l, ch) -> mu, sigma (B, l, D) in fp32, after soft-clip."""
        if self.final_norm is not None:
            h = self.final_norm(h)
        out = self.proj_out(h)
        if self.soft_clip > 0:
            out = self.soft_clip * torch.tanh(out / self.soft_clip)
        a, mu = out.float().chunk(2, dim=-1)
        sigma = F.softplus(a + INV_SOFTPLUS_1) if self.use_softplus else a.exp()
        return mu, sigma

    def new_cache(self, batch: int, length: int, like: Tensor) -> KVCache:
        layers = len(self.attn_blocks)
        dtype, device = self.proj_in.weight.dtype, like.device
        return KVCache(layers, batch, self.num_kv_heads, length, self.head_dim, dtype, device)

    # -- training direction --
    def forward(
        self, x: Tensor, y: Tensor | None, rope: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, Tensor]:
        """x (B, T, D) raster order -> z (B, T, D) raster order, logdet (B, T, D) permuted order."""
        xp = self.permute(x)
        inp = torch.cat([self.sos_embed.expand(x.size(0), -1, -1), xp[:, :-1]], 1) if self.use_sos else xp
        h = self.proj_in(inp.to(self.proj_in.weight.dtype))
        if rope is None:
            h = h + self.permuted_pos_embed(0, h.size(1))
        txt_len = 0
        if self.text_conditioned:
            txt = self.proj_txt(y.to(h.dtype))
            txt_len = txt.size(1)
            h = torch.cat([txt, h], dim=1)
        for layer in self.attn_blocks:
            h = layer(h, rope)
        mu, sigma = self.head(h[:, txt_len:])
        if not self.use_sos:  # TarFlow style: token t is predicted from x_<t; token 0 passes
            mu = torch.cat([torch.zeros_like(mu[:, :1]), mu[:, :-1]], 1)
            sigma = torch.cat([torch.ones_like(sigma[:, :1]), sigma[:, :-1]], 1)
        z = (xp.float() - mu) / sigma
        return self.permute(z).to(x.dtype), -sigma.log()

    # -- sampling direction: small step functions, the loops are in the samplers below --
    def prefill(self, y: Tensor, cache: KVCache, rope: tuple[Tensor, Tensor] | None) -> None:
        """Push the text tokens through every layer once; only their keys/values are kept."""
        h = self.proj_txt(y.to(self.proj_txt.weight.dtype))
        for i, layer in enumerate(self.attn_blocks):
            h = layer(h, rope, cache, i, 0)

    def step(
        self, inp: Tensor, start: int, cache: KVCache, rope: tuple[Tensor, Tensor] | None, txt_len: int
    ) -> tuple[Tensor, Tensor]:
        """A chunk of transformer inputs at sequence positions [start, start+l) -> mu, sigma."""
        h = self.proj_in(inp.to(self.proj_in.weight.dtype))
        if rope is None:
            h = h + self.permuted_pos_embed(start - txt_len, h.size(1))
        for i, layer in enumerate(self.attn_blocks):
            h = layer(h, rope, cache, i, start)
        return self.head(h)

    def _prepare(self, z: Tensor, y: Tensor | None, rope_for) -> tuple[Tensor, KVCache, tuple | None, int]:
        zp = self.permute(z.float())
        txt_len = y.size(1) if self.text_conditioned else 0
        rope = rope_for(txt_len)
        cache = self.new_cache(z.size(0), txt_len + z.size(1), z)
        if self.text_conditioned:
            self.prefill(y, cache, rope)
        return zp, cache, rope, txt_len

    def sample_sequential(
        self, z: Tensor, y: Tensor | None, guidance: float, rope_for, stats: BlockStats
    ) -> Tensor:
        """Invert the block token by token with a KV cache (the official `reverse`)."""
        zp, cache, rope, txt_len = self._prepare(z, y, rope_for)
        x = zp.clone()
        B, T, _ = zp.shape
        first = 0 if self.use_sos else 1  # without SOS token 0 passes unchanged
        for t in range(first, T):
            inp = self.sos_embed.expand(B, -1, -1) if t == 0 else x[:, t - 1 : t]
            mu, sigma = self.step(inp, txt_len + t - first, cache, rope, txt_len)
            if guidance > 0:
                mu, sigma = guide(mu, sigma, guidance)
            x[:, t] = zp[:, t] * sigma[:, 0] + mu[:, 0]
            stats.iterations.append(1)
            stats.evaluations += 1
            stats.tokens += B
        return self.permute(x)

    def sample_jacobi(
        self,
        z: Tensor,
        y: Tensor | None,
        guidance: float,
        rope_for,
        stats: BlockStats,
        block_size: int,
        max_iter: int,
        threshold: float,
    ) -> Tensor:
        """Block-wise Jacobi (the official `jacobi`): iterate each chunk to a fixed point.

        The noise is the first guess. Each iteration rewrites the chunk's cache entries, so the
        cache ends one iterate behind the returned values, exactly as in the official code.
        """
        if not self.use_sos:
            raise StarflowError("Jacobi sampling needs a model with `sos: 1`; use method='sequential'")
        zp, cache, rope, txt_len = self._prepare(z, y, rope_for)
        B, T, _ = zp.shape
        x_full = torch.cat([self.sos_embed.float().expand(B, -1, -1), zp.clone()], dim=1)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        start = 0
        while start < T:
            c = min(block_size, T - start)
            target = zp[:, start : start + c]
            for i in range(max_iter):
                mu, sigma = self.step(x_full[:, start : start + c], txt_len + start, cache, rope, txt_len)
                if guidance > 0:
                    mu, sigma = guide(mu, sigma, guidance)
                new = mu + sigma * target
                old = x_full[:, start + 1 : start + 1 + c]
                diff = ((new - old) ** 2).mean() / (new**2).mean()
                x_full[:, start + 1 : start + 1 + c] = new
                stats.evaluations += 1
                stats.tokens += B * c
                done = torch.tensor(bool(diff < threshold) or i == max_iter - 1)
                if distributed:  # every rank must stop together (the official all-reduce)
                    done = done.to(x_full.device)
                    torch.distributed.all_reduce(done, op=torch.distributed.ReduceOp.MIN)
                if bool(done):
                    break
            stats.iterations.append(i + 1)
            start += c
        return self.permute(x_full[:, 1:])


class IdentityBlock(nn.Module):
    """A block with `layers_per_block` 0: passes tokens through (official `IdentityBlock`)."""

    text_conditioned = False

    def forward(self, x: Tensor, y: Tensor | None, rope) -> tuple[Tensor, Tensor]:
        return x, torch.zeros_like(x, dtype=torch.float32)

    def sample_sequential(self, z: Tensor, *args, **kwargs) -> Tensor:
        return z

    sample_jacobi = sample_sequential


# ---- model ---------------------------------------------------------------------------------
@dataclass
class FlowOutput:
    z: Tensor  # (B, C, H, W), same shape as the input
    logdets: list[Tensor]  # per block in forward order, (B, T, D) in that block's token order
    outputs: list[Tensor]  # patchified input then each block's output, (B, h, w, D)


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
        self.config = config
        n = config.num_blocks
        blocks: list[nn.Module] = []
        for i, (layers, flip) in enumerate(zip(config.block_layers, config.block_flips(), strict=True)):
            deep = i == n - 1
            text = config.txt_dim > 0 and (deep or not config.cond_top_only)
            channels = config.deep_channels if deep else config.channels
            blocks.append(FlowBlock(config, layers, channels, flip, text) if layers else IdentityBlock())
        self.blocks = nn.ModuleList(blocks)
        with_text = config.txt_size > 0
        self.rope = RotaryEmbedding(config.head_dim, config.rope_seq_len, with_text) if config.rope else None

    # -- shapes --
    def patchify(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, h, w, p*p*C) with channel order (p1 p2 c)."""
        p = self.config.patch_size
        B, C, H, W = x.shape
        x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(B, H // p, W // p, p * p * C)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, h, w, p*p*C) -> (B, C, H, W)."""
        p = self.config.patch_size
        B, h, w, _ = x.shape
        x = x.reshape(B, h, w, p, p, -1).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, -1, h * p, w * p)

    def rope_tables(self, block: nn.Module, h: int, w: int, txt_len: int):
        """cos/sin for [text ; image] positions of this block, or None with learned pos_embed."""
        if self.rope is None:
            return None
        pos = self.rope.positions(h, w, txt_len if block.text_conditioned else 0)
        return self.rope(pos.to(self.rope.spatial_freqs.device))

    def check_latent(self, x: Tensor, name: str = "x") -> tuple[int, int]:
        """Validate a latent batch; returns the token grid (h, w)."""
        cfg = self.config
        if not isinstance(x, Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise StarflowError(f"{name}: expected a (B, C, H, W) latent tensor, got {shape}")
        B, C, H, W = x.shape
        if C != cfg.channel_size:
            raise StarflowError(
                f"{name}: expected {cfg.channel_size} latent channels, got shape {tuple(x.shape)}"
            )
        if H % cfg.patch_size or W % cfg.patch_size or H == 0 or W == 0:
            raise StarflowError(
                f"{name}: latent size {H}x{W} is not a positive multiple of patch_size {cfg.patch_size}"
            )
        h, w = H // cfg.patch_size, W // cfg.patch_size
        if self.rope is None:
            grid = cfg.latent_size // cfg.patch_size
            if (h, w) != (grid, grid):
                raise StarflowError(
                    f"{name}: a model with learned pos_embed (rope: 0) only takes its training grid "
                    f"{grid}x{grid} tokens ({grid * cfg.patch_size}x{grid * cfg.patch_size} latent), "
                    f"got {h}x{w}"
                )
        if not x.is_floating_point():
            raise StarflowError(f"{name}: expected a floating-point tensor, got {x.dtype}")
        return h, w

    def check_text(self, y: Tensor | None, batch: int, name: str = "y") -> None:
        text_model = any(b.text_conditioned for b in self.blocks)
        if not text_model:
            if y is not None:
                raise StarflowError(f"{name}: this model is not text-conditioned (txt_dim 0); pass None")
            return
        if y is None:
            raise StarflowError(
                f"{name}: this model is text-conditioned; pass (B, L, {self.config.txt_dim}) embeddings"
            )
        if y.dim() != 3 or y.size(0) != batch or y.size(2) != self.config.txt_dim or y.size(1) == 0:
            raise StarflowError(
                f"{name}: expected text embeddings of shape ({batch}, L, {self.config.txt_dim}) with "
                f"L >= 1 (the config's txt_size is {self.config.txt_size}), got {tuple(y.shape)}"
            )

    # -- density --
    def forward(self, x: Tensor, y: Tensor | None = None) -> FlowOutput:
        """Training direction: latent x (B, C, H, W) -> z, per-block logdets."""
        h, w = self.check_latent(x)
        self.check_text(y, x.size(0))
        tokens = self.patchify(x)
        outputs, logdets = [tokens], []
        seq = tokens.flatten(1, 2)
        for block in self.blocks:
            txt_len = y.size(1) if block.text_conditioned else 0
            seq, logdet = block(seq, y, self.rope_tables(block, h, w, txt_len))
            outputs.append(seq.unflatten(1, (h, w)))
            logdets.append(logdet)
        return FlowOutput(self.unpatchify(outputs[-1]), logdets, outputs)

    @staticmethod
    def loss(out: FlowOutput) -> Tensor:
        """The official loss: mean over batch of 0.5*mean(z^2) - sum over blocks of mean(logdet)."""
        z = out.z
        loss_z = 0.5 * z.pow(2).mean(dim=tuple(range(1, z.dim())))
        loss_logdet = -sum(ld.mean(dim=tuple(range(1, ld.dim()))) for ld in out.logdets)
        return (loss_z + loss_logdet).mean()

    def nll(self, x: Tensor, y: Tensor | None = None) -> NLL:
        loss = self.loss(self(x, y))
        return NLL(loss, (loss + 0.5 * math.log(2 * math.pi)) / math.log(2))

    def denoise(self, x: Tensor, y: Tensor | None, noise_std: float) -> Tensor:
        """One Tweedie step x - noise_std^2 * grad_x NLL(x), per sample (the official self-denoise)."""
        with torch.enable_grad():
            x = x.detach().clone().requires_grad_(True)
            loss = self.loss(self(x, y))
            (grad,) = torch.autograd.grad(loss, [x])
        # loss is a per-dim mean over the batch: numel * grad is the gradient of each sample's total NLL
        return (x - noise_std**2 * x.numel() * grad).detach()

    # -- sampling --
    @torch.no_grad()
    def sample(
        self,
        noise: Tensor,
        y: Tensor | None = None,
        y_uncond: Tensor | None = None,
        guidance: float = 0.0,
        method: str = "jacobi",
        jacobi_block_size: int = 16,
        jacobi_max_iter: int = 32,
        jacobi_threshold: float = 1e-3,
        return_stats: bool = False,
    ) -> Tensor | tuple[Tensor, list[BlockStats]]:
        """Invert the flow: noise (B, C, H, W) -> latent; deep block first, then shallow blocks.

        With guidance > 0 the deep block runs on the batch `[y ; y_uncond]` and the CFG formula;
        with `cond_top_only` the uncond half is dropped before the shallow blocks.
        Stats (per block, in sampling order) are returned when `return_stats`.
        """
        if method not in ("jacobi", "sequential"):
            raise StarflowError(f"method: expected 'jacobi' or 'sequential', got {method!r}")
        if method == "jacobi" and (jacobi_block_size < 1 or jacobi_max_iter < 1):
            raise StarflowError(
                "jacobi_block_size and jacobi_max_iter must be >= 1, "
                f"got {jacobi_block_size} and {jacobi_max_iter}"
            )
        h, w = self.check_latent(noise, "noise")
        B = noise.size(0)
        self.check_text(y, B)
        if guidance < 0:
            raise StarflowError(f"guidance: must be >= 0, got {guidance}")
        if guidance > 0:
            if y is None:
                raise StarflowError("guidance > 0 needs a text-conditioned model and y")
            if y_uncond is None:
                raise StarflowError("guidance > 0 needs y_uncond (the encoded empty prompt), same shape as y")
            if y_uncond.shape != y.shape:
                raise StarflowError(
                    f"y_uncond: expected shape {tuple(y.shape)} (as y), got {tuple(y_uncond.shape)}"
                )
            y_batch = torch.cat([y, y_uncond])
        else:
            y_batch = y
        x = self.patchify(noise.float()).flatten(1, 2)
        stats: list[BlockStats] = []
        for index in reversed(range(len(self.blocks))):
            block = self.blocks[index]
            if isinstance(block, IdentityBlock):
                continue
            deep = index == len(self.blocks) - 1
            if not deep and self.config.cond_top_only and guidance > 0:
                guidance, y_batch = 0.0, y
            z = torch.cat([x, x]) if guidance > 0 else x
            text = y_batch if block.text_conditioned else None
            record = BlockStats(index, method)
            began = time.perf_counter()

            def rope_for(txt_len: int, block=block):
                return self.rope_tables(block, h, w, txt_len)

            if method == "sequential":
                x = block.sample_sequential(z, text, guidance, rope_for, record)
            else:
                x = block.sample_jacobi(
                    z,
                    text,
                    guidance,
                    rope_for,
                    record,
                    jacobi_block_size,
                    jacobi_max_iter,
                    jacobi_threshold,
                )
            x = x[:B]
            record.seconds = time.perf_counter() - began
            stats.append(record)
        out = self.unpatchify(x.unflatten(1, (h, w))).to(noise.dtype)
        return (out, stats) if return_stats else out
