"""The sampling algorithm, written once for PyTorch tensors and numpy arrays alike.

A flow is inverted block by block, deep block first: permute the noise into the block's token
order, prefill the text keys/values, then produce the tokens autoregressively,
`x_t = z_t * sigma_t + mu_t`, one at a time (sequential) or a chunk at a time iterated to a
fixed point (block-wise Jacobi, the official stop test and cache rewind), with the official
guidance formula on a `[cond ; uncond]` batch. The loop is written against the array API
standard (through array-api-compat), so the PyTorch reference (`StarFlow.sample`, CUDA tensors
included, never copied to numpy) and the torch-free runtime (`Pipeline.sample`) run this same
code; they differ only in how a block computes one chunk (a `SamplerBlock`'s step function).
The density direction (`density`: latents -> z and logdets, teacher-forced) is written here
once too, for the same two engines.

This module never imports torch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from array_api_compat import array_namespace, device

from starflow.core.checks import check_count, check_latent, check_text, shape_of
from starflow.core.errors import StarflowError

Array = Any  # a torch.Tensor or a numpy array: whatever the caller samples with
METHODS = ("jacobi", "sequential")
# First guess of a Jacobi chunk. "noise": the chunk's input z (the reference). "chunk-mean": z
# through the previous chunk's mean affine map, x = mean(mu) + mean(sigma) * z, per row and channel.
JACOBI_INITS = ("noise", "chunk-mean")
# When a Jacobi chunk stops. "batch" (the official rule): one test over every row of the batch, so
# a row's result depends on what shares its batch. "row": each row stops on its own test and then
# holds still while the others iterate, so a row's result is the same alone or in any batch (what
# a server batching unrelated requests needs).
STOP_RULES = ("batch", "row")
What = TypeVar("What")
# progress(what, done, in all): the sampler reports (block index, tokens done, tokens in the block),
# an export (what is being done, steps done, steps in all): `Progress[int]`, `Progress[str]`
Progress = Callable[[What, int, int], None]
# run(x, past_keys, past_values, start) -> mu, sigma, new_keys, new_values: one block's step graph
StepFunction = Callable[[Array, Array, Array, int], tuple[Array, Array, Array, Array]]


# ---- settings and statistics -------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class JacobiSettings:
    """How block-wise Jacobi solves one block; the defaults are the official image script's."""

    block_size: int = 16  # tokens per chunk
    max_iter: int = 32  # iterations per chunk at most
    threshold: float = 1e-3  # stop when mean((new - old)^2) / mean(new^2) < threshold
    init: str = "noise"  # the first guess: see JACOBI_INITS

    def check(self, name: str) -> None:
        for key in ("block_size", "max_iter"):
            check_count(getattr(self, key), f"{name}.{key}")
        if not isinstance(self.threshold, int | float) or not self.threshold >= 0:  # NaN fails
            raise StarflowError(f"{name}.threshold: must be a number >= 0, got {self.threshold!r}")
        if self.init not in JACOBI_INITS:
            raise StarflowError(f"{name}.init: must be one of {list(JACOBI_INITS)}, got {self.init!r}")


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    """How to invert the flow: guidance weight, solver, the Jacobi settings per block kind, and
    for clips the official video rules: the deep block's attention window and rolling context."""

    guidance: float = 0.0  # classifier-free guidance weight; 0 samples without y_uncond
    method: str = "jacobi"  # or "sequential": one token per step, the exact inverse
    jacobi: JacobiSettings = JacobiSettings()
    shallow_jacobi: JacobiSettings | None = None  # the shallow blocks' own settings; None: `jacobi`
    # Clips: a Jacobi chunk after the first frame starts from the tokens one frame earlier
    warm_start: bool = True
    # Clips longer than `window` frames roll: the deep block attends to at most `window` frames;
    # when they are full the last `context` frames are re-encoded into a fresh cache
    window: int | None = None  # None: the model's `local_attn_window` (None there: no limit)
    context: int | None = None  # None: window - 1
    stop: str = "batch"  # the Jacobi stop test: see STOP_RULES

    def check(self) -> None:
        if self.method not in METHODS:
            raise StarflowError(f"method: expected one of {list(METHODS)}, got {self.method!r}")
        if self.stop not in STOP_RULES:
            raise StarflowError(f"stop: expected one of {list(STOP_RULES)}, got {self.stop!r}")
        if (
            not isinstance(self.guidance, int | float)
            or not math.isfinite(self.guidance)
            or self.guidance < 0
        ):
            raise StarflowError(f"guidance: must be a finite number >= 0, got {self.guidance!r}")
        self.jacobi.check("jacobi")
        if self.shallow_jacobi is not None:
            self.shallow_jacobi.check("shallow_jacobi")
        for key in ("window", "context"):
            if getattr(self, key) is not None:
                check_count(getattr(self, key), key, note="frames")
        if self.context is not None and (self.window is None or self.context >= self.window):
            raise StarflowError(
                f"context: must be fewer frames than the window ({self.window}), got {self.context}"
            )

    @property
    def context_frames(self) -> int | None:
        """Frames re-encoded when the window rolls (None without a window)."""
        if self.window is None:
            return None
        return self.context if self.context is not None else self.window - 1

    def jacobi_for(self, deep: bool) -> JacobiSettings:
        return self.jacobi if deep or self.shallow_jacobi is None else self.shallow_jacobi


def with_overrides(defaults: SampleOptions, **given: Any) -> SampleOptions:
    """`defaults` with every setting that is not None replaced: guidance, method, stop, the clip
    settings warm_start, window, context, and the Jacobi settings block_size, max_iter,
    threshold, init (applied to `jacobi`).

    Options a user left unset keep the model's defaults (the manifest's, or the checkpoint's cfg).
    """
    top_level = ("guidance", "method", "warm_start", "window", "context", "stop")
    unknown = set(given) - set(top_level) - {f.name for f in dataclasses.fields(JacobiSettings)}
    if unknown:
        raise StarflowError(f"unknown sampling setting(s) {sorted(unknown)}")
    given = {k: v for k, v in given.items() if v is not None}
    top = {k: given.pop(k) for k in top_level if k in given}
    return dataclasses.replace(defaults, **top, jacobi=dataclasses.replace(defaults.jacobi, **given))


@dataclasses.dataclass
class BlockStats:
    """What sampling one flow block cost: chunks, Jacobi iterations per chunk, network calls."""

    block: int  # index in forward order (the deep block is the last)
    method: str
    iterations: list[int] = dataclasses.field(default_factory=list)  # per chunk; all 1 for sequential
    # per chunk, the iterations each image's rows ran (the "row" stop rule lets them differ)
    image_iterations: list[list[int]] = dataclasses.field(default_factory=list)
    evaluations: int = 0  # transformer calls over image tokens (the text prefill not counted)
    tokens: int = 0  # image tokens those calls processed, summed over rows ([cond ; uncond])
    seconds: float = 0.0

    @property
    def chunks(self) -> int:
        return len(self.iterations)

    @property
    def mean_iterations(self) -> float:
        return sum(self.iterations) / max(len(self.iterations), 1)

    def iterations_of(self, image: int) -> int:
        """The iterations image `image` (its index in the sampled batch) ran, over every chunk."""
        return sum(chunk[image] for chunk in self.image_iterations)


# ---- what a flow block must offer ------------------------------------------------------------------
class CachedStep:
    """One block's step function over a preallocated key/value cache, for one batch of rows.

    The cache `(layers, rows, kv_heads, text + tokens, head_dim)` holds the text's keys/values at
    [0, text) and each chunk's at text + [start, start + c) - origin: running a chunk writes its
    entries, and running the same positions again overwrites them, which is the Jacobi rewind.
    `origin` is the first position the cache holds: 0, or where a rolling window restarted it
    (positions, RoPE's included, count from there). Nothing is allocated here: the block hands
    in its buffers (and may reuse them for the next batch).
    """

    def __init__(self, run: StepFunction, keys: Array, values: Array, text_length: int = 0):
        self.run, self.keys, self.values, self.text_length = run, keys, values, text_length
        self.origin = 0

    def prefill(self, keys: Array, values: Array) -> None:
        """Store the text's keys/values (a block's prefill output) at [0, text)."""
        self.keys[:, :, :, : self.text_length] = keys
        self.values[:, :, :, : self.text_length] = values

    def __call__(self, x: Array, start: int) -> tuple[Array, Array]:
        """Inputs x (rows, c, D) at block positions [start, start + c) -> mu, sigma (rows, c, D)."""
        start -= self.origin
        past = self.text_length + start
        if past + x.shape[1] > self.keys.shape[3]:
            raise StarflowError(
                f"cache overflow: {past + x.shape[1]} positions in a cache of {self.keys.shape[3]}"
            )
        mu, sigma, keys, values = self.run(x, self.keys[:, :, :, :past], self.values[:, :, :, :past], start)
        self.keys[:, :, :, past : past + x.shape[1]] = keys
        self.values[:, :, :, past : past + x.shape[1]] = values
        return mu, sigma


class SamplerBlock(Protocol):
    """A flow block as the sampler sees it: a PyTorch `FlowBlock` or an exported block's graphs.

    `density` is all the density direction asks of a block (a PyTorch identity block offers
    only it and the token-order flags); sampling asks for the rest.
    """

    index: int  # position in forward (training) order
    deep: bool  # the last block in forward order, sampled first
    flip: bool  # its token order is the reverse of raster order
    flip_in_frame: bool  # a clip's flip reverses each frame and keeps the frame order
    frame_local: bool  # a clip's frames are sampled as separate sequences (shallow_block_local)
    text_conditioned: bool

    @property
    def sos(self) -> Array | None:
        """The (1, 1, D) float32 start-of-sequence input; None: token 0 passes unchanged."""

    def open(self, rows: int, grid: tuple[int, int], text: Array | None, tokens: int) -> CachedStep:
        """A step over a fresh cache of `tokens` positions for `rows` sequences of h x w token
        frames, the text prefilled."""

    def density(self, x: Array, grid: Array, text: Array | None) -> tuple[Array, Array]:
        """The teacher-forced pass: x (rows, T, D) in block order, grid the int64 (h, w) of one
        frame -> z (fp32, block order) and logdet = -log sigma (rows, T, D)."""

    def vjp(self, x: Array, grid: Array, grad_z: Array, text: Array | None) -> Array:
        """The density pass's vector-Jacobian product: x and grad_z (rows, T, D) in block order ->
        d/dx of sum(grad_z * z) - sum(logdet), fp32 (`nll_gradient`'s step)."""


# ---- shapes and inputs -------------------------------------------------------------------------------
def patchify(x: Array, p: int) -> Array:
    """(B, C, H, W) -> (B, T, p*p*C): channel order (p1 p2 c), tokens row-major over (H/p, W/p);
    a clip (B, F, C, H, W) -> (B, F*T, p*p*C), frame after frame."""
    xp = array_namespace(x)
    if len(x.shape) == 5:
        B, F = x.shape[0], x.shape[1]
        tokens = patchify(xp.reshape(x, (B * F, *x.shape[2:])), p)
        return xp.reshape(tokens, (B, F * tokens.shape[1], tokens.shape[2]))
    B, C = x.shape[0], x.shape[1]
    h, w = x.shape[2] // p, x.shape[3] // p
    x = xp.reshape(x[:, :, : h * p, : w * p], (B, C, h, p, w, p))  # the slice keeps H, W symbolic
    return xp.reshape(xp.permute_dims(x, (0, 2, 4, 3, 5, 1)), (B, h * w, p * p * C))


def unpatchify(x: Array, p: int, h: int, w: int, frames: int | None = None) -> Array:
    """(B, T, p*p*C) -> (B, C, h*p, w*p), the inverse of `patchify`; with `frames`, a clip
    (B, frames*h*w, p*p*C) -> (B, frames, C, h*p, w*p)."""
    xp = array_namespace(x)
    B = x.shape[0]
    if frames is not None:
        images = unpatchify(xp.reshape(x, (B * frames, h * w, x.shape[2])), p, h, w)
        return xp.reshape(images, (B, frames, *images.shape[1:]))
    x = xp.permute_dims(xp.reshape(x, (B, h, w, p, p, -1)), (0, 5, 1, 3, 2, 4))
    return xp.reshape(x, (B, -1, h * p, w * p))


def permute(x: Array, flip: bool, in_frame: bool, frames: int) -> Array:
    """A block's token order for x (rows, frames*h*w, D): raster order, reversed, or (video's
    `temporal_causal`) reversed inside each frame with the frames kept in order. Its own inverse."""
    if not flip:
        return x
    xp = array_namespace(x)
    if in_frame and frames > 1:
        rows, T, D = x.shape
        return xp.reshape(xp.flip(xp.reshape(x, (rows, frames, T // frames, D)), axis=2), (rows, T, D))
    return xp.flip(x, axis=1)


def check_sample_inputs(
    noise: Array,
    y: Array | None,
    y_uncond: Array | None,
    options: SampleOptions,
    *,
    channels: int,
    patch_size: int,
    text_dim: int,
    max_text_length: int | None = None,
    video: bool = False,
    name: str = "noise",
) -> tuple[int, int]:
    """Everything a caller of `sample` can get wrong, before any work; returns the grid (h, w).
    Errors call the first array `name` (the density direction's is latents)."""
    options.check()
    grid = check_latent(noise, channels, patch_size, name, (4, 5) if video else (4,))
    frames = noise.shape[1] if len(noise.shape) == 5 else 1
    if options.method == "sequential" and options.window is not None and frames > options.window:
        raise StarflowError(
            f"{name}: {frames} frames roll past the {options.window}-frame window, which needs "
            "method='jacobi' (the official rolling generation is Jacobi's)"
        )
    check_text(y, noise.shape[0], text_dim, max_text_length, "y")
    if options.guidance > 0:
        if text_dim == 0:
            raise StarflowError("guidance > 0 needs a text-conditioned model")
        if y_uncond is None:
            raise StarflowError("guidance > 0 needs y_uncond (the encoded empty prompt), same shape as y")
        if tuple(y_uncond.shape) != tuple(y.shape):
            raise StarflowError(f"y_uncond: expected shape {shape_of(y)} (as y), got {shape_of(y_uncond)}")
    xp = array_namespace(noise)
    for what, array in ((name, noise), ("y", y), ("y_uncond", y_uncond if options.guidance > 0 else None)):
        if array is not None and not bool(xp.all(xp.isfinite(array))):
            raise StarflowError(f"{what}: contains NaN or inf values; the result would be NaN")
    return grid


# ---- the algorithm ----------------------------------------------------------------------------------
def guide(mu: Array, sigma: Array, weight: float) -> tuple[Array, Array]:
    """The official CFG on a `[cond ; uncond]` batch; both halves receive the guided values."""
    xp = array_namespace(mu, sigma)
    n = mu.shape[0] // 2
    mu_c, mu_u, sigma_c, sigma_u = mu[:n], mu[n:], sigma[:n], sigma[n:]
    s = xp.square(xp.minimum(sigma_c / sigma_u, 1.0))
    denominator = 1 + weight - weight * s
    sigma_g = sigma_c / xp.sqrt(denominator)
    mu_g = ((1 + weight) * mu_c - (weight * s) * mu_u) / denominator
    return xp.concat([mu_g, mu_g]), xp.concat([sigma_g, sigma_g])


def solve_sequential(
    step: CachedStep,
    z: Array,
    sos: Array | None,
    guidance: float,
    stats: BlockStats,
    report: Callable[[int, int], None],
) -> Array:
    """Invert one block token by token (the official `reverse`); z and the result in block order."""
    xp = array_namespace(z)
    x = xp.asarray(z, copy=True)
    rows, T, D = z.shape
    first = 0 if sos is not None else 1  # without sos (TarFlow style) token 0 passes unchanged
    for t in range(first, T):
        inp = xp.broadcast_to(sos, (rows, 1, D)) if t == 0 else x[:, t - 1 : t]
        mu, sigma = step(inp, t - first)
        if guidance > 0:
            mu, sigma = guide(mu, sigma, guidance)
        x[:, t] = z[:, t] * sigma[:, 0] + mu[:, 0]
        stats.iterations.append(1)
        stats.image_iterations.append([1] * rows)
        stats.evaluations += 1
        stats.tokens += rows
        report(t + 1, T)
    return x


@dataclasses.dataclass(frozen=True)
class Frames:
    """A block's sequence as frames of `tokens` tokens, and the video rules that follow."""

    tokens: int  # tokens per frame (all of them for an image)
    warm_start: bool = False  # a chunk after the first frame starts from one frame earlier
    window: int | None = None  # frames the cache holds (None: the whole sequence)
    context: int = 0  # frames re-encoded when the window rolls


LATER_CHUNK_FACTOR = 4  # official video Jacobi: chunks after the first frame are 4x the block size


def solve_jacobi(
    step: CachedStep,
    z: Array,
    sos: Array | None,
    guidance: float,
    settings: JacobiSettings,
    stats: BlockStats,
    report: Callable[[int, int], None],
    agree: Callable[[bool], bool] | None = None,
    frames: Frames | None = None,
    stop: str = "batch",
) -> Array:
    """Block-wise Jacobi (the official `jacobi`): iterate each chunk to a fixed point.

    The noise is the first guess (or the chunk-mean map). Each iteration rewrites the chunk's
    cache entries, so the cache ends one iterate behind the returned values, exactly as in the
    official code. `agree(done)` makes every rank of a distributed run stop together.
    With `stop="row"` each row stops on its own test: a stopped row keeps its values and is fed
    the inputs of its last iteration again, so its cache entries stay those of that iteration,
    as if it had stopped alone.
    Over the frames of a clip (the official video rules): chunks after the first frame are
    LATER_CHUNK_FACTOR times longer, their first iteration reads the inputs one frame earlier
    (`warm_start`), and past `window` frames the cache restarts from the last `context` frames,
    re-encoded (the next window then adds window - context frames).
    """
    if sos is None:
        raise StarflowError("Jacobi sampling needs a model with `sos: 1`; use method='sequential'")
    xp = array_namespace(z)
    rows, T, D = z.shape
    frames = frames or Frames(tokens=T)
    F = frames.tokens
    x_full = xp.concat([xp.broadcast_to(sos, (rows, 1, D)), z], axis=1)  # input position t: x_{t-1}
    window = T if frames.window is None else min(T, frames.window * F)
    start, end, previous_map = 0, window, None  # previous_map: the last (mu, sigma) of the previous chunk
    by_row = stop == "row"
    while True:
        while start < end:
            c = min(settings.block_size * (1 if start <= F else LATER_CHUNK_FACTOR), end - start)
            target = z[:, start : start + c]
            if settings.init == "chunk-mean" and previous_map is not None:
                mu, sigma = previous_map
                mean_mu, mean_sigma = (
                    xp.mean(mu, axis=1, keepdims=True),
                    xp.mean(sigma, axis=1, keepdims=True),
                )
                x_full[:, start + 1 : start + 1 + c] = mean_mu + mean_sigma * target
            if by_row:  # the rows done, the iterations each ran, the inputs of the last iteration
                stopped = xp.zeros((rows, 1, 1), dtype=xp.bool, device=device(z))
                ran = xp.zeros((rows,), dtype=xp.int64, device=device(z))
                held = None
            for i in range(settings.max_iter):
                warm = i == 0 and frames.warm_start and start > F
                first = start - F if warm else start
                inputs = x_full[:, first : first + c]
                if by_row:  # a stopped row sees its last inputs again: its cache entries stay
                    inputs = (
                        xp.asarray(inputs, copy=True) if held is None else xp.where(stopped, held, inputs)
                    )
                    held = inputs
                mu, sigma = step(inputs, start)
                if guidance > 0:
                    mu, sigma = guide(mu, sigma, guidance)
                new = mu + sigma * target
                old = x_full[:, start + 1 : start + 1 + c]
                if by_row:
                    ran = ran + xp.astype(~stopped[:, 0, 0], xp.int64)
                    diff = xp.mean(xp.square(new - old), axis=(1, 2)) / xp.mean(xp.square(new), axis=(1, 2))
                    new = xp.where(stopped, old, new)
                    stopped = stopped | (diff < settings.threshold)[:, None, None]
                    done = bool(xp.all(stopped)) or i == settings.max_iter - 1
                else:
                    diff = xp.mean(xp.square(new - old)) / xp.mean(xp.square(new))
                    done = bool(diff < settings.threshold) or i == settings.max_iter - 1
                x_full[:, start + 1 : start + 1 + c] = new
                stats.evaluations += 1
                stats.tokens += rows * c
                if agree(done) if agree else done:
                    break
            stats.iterations.append(i + 1)
            stats.image_iterations.append([int(n) for n in ran] if by_row else [i + 1] * rows)
            previous_map = mu, sigma
            start += c
            report(start, T)
        if end >= T:
            return x_full[:, 1:]
        # roll: a fresh cache (text kept) holding the last `context` frames, re-encoded as the
        # start of a sequence: sos, then all of them but the last, whose input the next chunk is
        context = frames.context * F
        end = min(end + window - context, T)
        step.origin = start - context
        sos_rows = xp.broadcast_to(sos, (rows, 1, D))
        step(xp.concat([sos_rows, x_full[:, start + 1 - context : start]], axis=1), step.origin)
        stats.evaluations += 1
        stats.tokens += rows * context


def sample(
    blocks: Sequence[SamplerBlock],
    noise: Array,
    y: Array | None,
    y_uncond: Array | None,
    options: SampleOptions,
    *,
    patch_size: int,
    guide_deep_only: bool,
    progress: Progress[int] | None = None,
    agree: Callable[[bool], bool] | None = None,
) -> tuple[Array, list[BlockStats]]:
    """Invert the flow: noise (B, C, H, W) or clips (B, F, C, H, W) float32 -> latents, and
    stats per block (sampling order).

    `blocks` come in sampling order (deep block first). With guidance the blocks run on
    `[cond ; uncond]` (y then y_uncond); with `guide_deep_only` (`cond_top_only`) the uncond half
    is dropped before the shallow blocks. A frame-local block samples each frame of a clip as
    its own sequence. Inputs must have passed `check_sample_inputs`.
    """
    xp = array_namespace(noise)
    clip = len(noise.shape) == 5
    B, n_frames = noise.shape[0], noise.shape[1] if clip else 1
    grid = (noise.shape[-2] // patch_size, noise.shape[-1] // patch_size)
    F = grid[0] * grid[1]
    guidance = options.guidance
    text = xp.concat([y, y_uncond]) if guidance > 0 else y
    x = patchify(noise, patch_size)  # (B, frames * F, D)
    stats = []
    for block in blocks:
        if not block.deep and guide_deep_only and guidance > 0:
            guidance, text = 0.0, y
        z = xp.concat([x, x]) if guidance > 0 else x
        rows = z.shape[0]
        local = block.frame_local and clip
        if local:  # (rows * frames, F, D)
            z = xp.reshape(z, (rows * n_frames, F, z.shape[2]))
        seq_frames = 1 if local else n_frames
        window = options.window if block.deep else None  # only the deep block rolls (official)
        frames = Frames(F, options.warm_start, window, options.context_frames or 0)
        tokens = z.shape[1] if frames.window is None else min(z.shape[1], frames.window * F)
        record = BlockStats(block.index, options.method)
        began = time.perf_counter()
        step = block.open(z.shape[0], grid, text if block.text_conditioned else None, tokens)
        z = permute(z, block.flip, block.flip_in_frame, seq_frames)
        report = functools.partial(progress, block.index) if progress else _no_report
        if options.method == "sequential":
            x = solve_sequential(step, z, block.sos, guidance, record, report)
        else:
            settings = options.jacobi_for(block.deep)
            x = solve_jacobi(
                step, z, block.sos, guidance, settings, record, report, agree, frames, options.stop
            )
        record.image_iterations = [
            per_image(chunk, B, n_frames if local else 1) for chunk in record.image_iterations
        ]
        x = permute(x, block.flip, block.flip_in_frame, seq_frames)
        x = xp.reshape(x, (rows, n_frames * F, x.shape[2])) if local else x
        x = x[:B]
        record.seconds = time.perf_counter() - began
        stats.append(record)
    return unpatchify(x, patch_size, *grid, n_frames if clip else None), stats


def per_image(row_counts: list[int], images: int, rows_per_sequence: int) -> list[int]:
    """A block's per-row counts -> per image: the most over the image's rows, which are its
    guidance twin (`[cond ; uncond]`, image-major halves) and, in a frame-local block, the
    `rows_per_sequence` consecutive rows of its frames."""
    by_image = [0] * images
    for row, n in enumerate(row_counts):
        image = (row // rows_per_sequence) % images
        by_image[image] = max(by_image[image], n)
    return by_image


def density(
    blocks: Sequence[SamplerBlock], x: Array, y: Array | None, *, patch_size: int
) -> tuple[Array, list[Array], list[Array]]:
    """The density direction (training's): latents x (B, C, H, W) or clips (B, F, C, H, W) -> z
    (same shape, x's dtype), the logdet of each block and the sequence after each block.

    `blocks` come in forward order (the reverse of sampling order). Each sees its own token
    order; a frame-local block takes each frame of a clip as its own sequence, and its logdet is
    then (B, F, h*w, D), else (B, T, D) in the block's order. The sequences are (B, T, D) in
    raster order, the patchified input first. Inputs must have passed the engine's checks.
    """
    xp = array_namespace(x)
    clip = len(x.shape) == 5
    B, n_frames = x.shape[0], x.shape[1] if clip else 1
    h, w = x.shape[-2] // patch_size, x.shape[-1] // patch_size
    grid = xp.asarray([h, w], dtype=xp.int64, device=device(x))
    seq = patchify(x, patch_size)  # (B, frames * h * w, D)
    outputs, logdets = [seq], []
    for block in blocks:
        local = block.frame_local and clip
        rows = xp.reshape(seq, (B * n_frames, h * w, seq.shape[2])) if local else seq
        frames = 1 if local else n_frames
        text = y if block.text_conditioned else None
        z, logdet = block.density(permute(rows, block.flip, block.flip_in_frame, frames), grid, text)
        z = xp.astype(permute(z, block.flip, block.flip_in_frame, frames), rows.dtype, copy=False)
        seq = xp.reshape(z, (B, n_frames * h * w, z.shape[2])) if local else z
        logdets.append(xp.reshape(logdet, (B, n_frames, h * w, logdet.shape[2])) if local else logdet)
        outputs.append(seq)
    return unpatchify(seq, patch_size, h, w, n_frames if clip else None), logdets, outputs


def nll_gradient(blocks: Sequence[SamplerBlock], x: Array, y: Array | None, *, patch_size: int) -> Array:
    """The gradient of each sample's total NLL 0.5*sum(z^2) - sum(logdet) with respect to latents
    x (B, C, H, W) or clips (B, F, C, H, W), as one loop over per-block steps: the density pass
    keeps each block's input, then from g = z each block's `vjp`, last block first, maps g back
    through it (in its own token order). `blocks` come in forward order; `StarFlow.denoise` takes
    the same gradient by autograd over the whole model."""
    xp = array_namespace(x)
    clip = len(x.shape) == 5
    B, n_frames = x.shape[0], x.shape[1] if clip else 1
    h, w = x.shape[-2] // patch_size, x.shape[-1] // patch_size
    grid = xp.asarray([h, w], dtype=xp.int64, device=device(x))
    _, _, sequences = density(blocks, x, y, patch_size=patch_size)
    grad = sequences[-1]  # d(0.5*sum(z^2))/dz
    for block, seq in zip(reversed(blocks), reversed(sequences[:-1]), strict=True):
        local = block.frame_local and clip
        order = (block.flip, block.flip_in_frame, 1 if local else n_frames)
        if local:  # each frame its own sequence, as in `density`
            seq, grad = (xp.reshape(t, (B * n_frames, h * w, t.shape[2])) for t in (seq, grad))
        text = y if block.text_conditioned else None
        grad = permute(block.vjp(permute(seq, *order), grid, permute(grad, *order), text), *order)
        grad = xp.reshape(grad, (B, n_frames * h * w, grad.shape[2])) if local else grad
    return unpatchify(grad, patch_size, h, w, n_frames if clip else None)


def nll_per_sample(z: Array, logdets: Sequence[Array]) -> Array:
    """The official training loss of each sample: 0.5 * mean(z^2) - sum over blocks of mean(logdet)
    (means over every dimension but the batch): its negative log-likelihood per latent dimension,
    in nats, less the Gaussian's constant."""
    xp = array_namespace(z)
    loss = 0.5 * xp.mean(xp.reshape(xp.square(z), (z.shape[0], -1)), axis=1)
    for logdet in logdets:
        loss = loss - xp.mean(xp.reshape(logdet, (logdet.shape[0], -1)), axis=1)
    return loss


def to_bits_per_dim(nll: Array) -> Array:
    """`nll_per_sample` -> the Gaussian negative log-likelihood per latent dimension, in bits."""
    return (nll + 0.5 * math.log(2 * math.pi)) / math.log(2)


def denoise_windows(
    x: Array, step: Callable[[Array], Array], window: int | None, overlap: int | None = None
) -> Array:
    """A clip (B, F, C, H, W) through a learned denoiser `step` in windows of `window` frames
    (the official sampler's chunking; None: all frames at once), in place: the first window
    writes all its frames, each later one, starting `window - overlap` frames on, writes the
    frames after the overlap (`denoiser_window`; None: window - 1, so one new frame each)."""
    n = x.shape[1]
    size = n if window is None else window
    if overlap is not None and overlap >= size:
        raise StarflowError(f"denoiser overlap {overlap} must be fewer frames than the window {size}")
    start, kept = 0, 0
    while start + kept < n:  # the next window still has frames to write
        x[:, start + kept : start + size] = step(x[:, start : start + size])[:, kept:]
        kept = size - 1 if overlap is None else overlap
        start += size - kept
    return x


def _no_report(done: int, total: int) -> None:
    pass
