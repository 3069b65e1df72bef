"""The standalone sampler: numpy orchestration of the exported block graphs (no torch).

It is the loop of `StarFlow.sample` reimplemented over the step/prefill graphs: text prefill,
the deep block first (on `[cond ; uncond]` with guidance), the uncond half dropped after it,
shallow blocks in reverse order, permutations, the official Jacobi stop test and cache rewind.
Guidance, the Jacobi update and the stop test run here in fp32, exactly as in the reference.

Lifetimes: a `Pipeline` owns its sessions and its key/value caches, which are allocated once
per (block, batch, length) and reused by later calls. One `sample` call at a time per Pipeline;
the returned arrays belong to the caller.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from starflow.errors import StarflowError
from starflow.export.manifest import load_manifest
from starflow.runtime.backends import Runner, open_runner
from starflow.stats import BlockStats

METHODS = ("jacobi", "sequential")
# First guess of a Jacobi chunk. "noise": the chunk's input z (the reference). "chunk-mean": z
# through the previous chunk's mean affine map, x = mean(mu) + mean(sigma) * z, per row and channel.
JACOBI_INITS = ("noise", "chunk-mean")
Progress = Callable[[int, int, int], None]  # (block index, tokens done, tokens in the block)


@dataclasses.dataclass(frozen=True)
class JacobiSettings:
    """How Jacobi solves one block: chunk length, the official stop test, the first guess."""

    block_size: int = 16
    max_iter: int = 32
    threshold: float = 1e-3
    init: str = "noise"

    def check(self, what: str) -> None:
        if self.block_size < 1 or self.max_iter < 1:
            raise StarflowError(
                f"{what}: block_size and max_iter must be >= 1, got {self.block_size}, {self.max_iter}"
            )
        if self.threshold < 0:
            raise StarflowError(f"{what}: threshold must be >= 0, got {self.threshold}")
        if self.init not in JACOBI_INITS:
            raise StarflowError(f"{what}: init must be one of {list(JACOBI_INITS)}, got {self.init!r}")


def guide(mu: np.ndarray, sigma: np.ndarray, weight: float) -> tuple[np.ndarray, np.ndarray]:
    """The official CFG on a `[cond ; uncond]` batch; both halves receive the guided values."""
    n = mu.shape[0] // 2
    mu_c, mu_u, sigma_c, sigma_u = mu[:n], mu[n:], sigma[:n], sigma[n:]
    s = np.square(np.minimum(sigma_c / sigma_u, 1.0))
    denominator = 1 + weight - weight * s
    sigma_g = sigma_c / np.sqrt(denominator)
    mu_g = ((1 + weight) * mu_c - (weight * s) * mu_u) / denominator
    return np.concatenate([mu_g, mu_g]), np.concatenate([sigma_g, sigma_g])


@dataclasses.dataclass
class BlockPlan:
    """One flow block as the manifest describes it, with its loaded graphs."""

    index: int
    deep: bool
    flip: bool
    layers: int
    kv_heads: int
    head_dim: int
    text_conditioned: bool
    sos: np.ndarray  # (1, 1, D) float32
    step: Runner
    prefill: Runner | None
    cache_dtype: np.dtype
    open_forward: Callable[[], Runner]  # the density graph, opened on first use
    forward: Runner | None = None


class Pipeline:
    """Samples latents from an artifacts directory written by `starflow export onnx`."""

    def __init__(self, directory: Path, manifest: dict[str, Any], plans: list[BlockPlan], precision: str):
        self.directory = directory
        self.manifest = manifest
        self.plans = plans  # sampling order: deep block first
        self.precision = precision
        latent = manifest["latent"]
        self.channels, self.patch = latent["channels"], latent["patch_size"]
        self.latent_min, self.latent_max = tuple(latent["min"]), tuple(latent["max"])
        self.max_batch = manifest["dims"]["batch"]["max"]
        self.text = manifest["text"]
        self.guide_deep_only = manifest["guidance"]["blocks"] == "deep"
        self._caches: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = {}

    @classmethod
    def load(
        cls,
        artifacts_dir: str | Path,
        backend: str = "onnxruntime",
        precision: str = "fp32",
        providers: list[Any] | None = None,
        threads: int | None = None,
    ) -> Pipeline:
        """Validate the manifest and every file's sha256, then create each session once."""
        directory = Path(artifacts_dir)
        manifest = load_manifest(directory)
        if precision not in manifest["precisions"]:
            raise StarflowError(
                f"{directory}: no {precision} graphs; this export has {sorted(manifest['precisions'])}"
            )
        graphs = {g["name"]: g for g in manifest["graphs"]}
        plans = []
        for block in manifest["blocks"]:
            names = block["graphs"][precision]

            def runner(kind: str, names: dict[str, str] = names, index: int = block["index"]) -> Runner:
                if kind not in names:
                    raise StarflowError(
                        f"{directory}: block {index} has no {kind} graph in {precision} "
                        "(exported without density graphs?); re-export with them"
                    )
                graph = graphs[names[kind]]
                return open_runner(backend, graph["name"], directory / graph["file"], providers, threads)

            step_graph = graphs[names["step"]]
            cache_dtype = next(t["dtype"] for t in step_graph["inputs"] if t["name"] == "past_keys")
            plans.append(
                BlockPlan(
                    index=block["index"],
                    deep=block["role"] == "deep",
                    flip=block["permutation"] == "flip",
                    layers=block["layers"],
                    kv_heads=block["kv_heads"],
                    head_dim=block["head_dim"],
                    text_conditioned=block["text_conditioned"],
                    sos=np.asarray(block["sos_embed"], dtype=np.float32).reshape(1, 1, -1),
                    step=runner("step"),
                    prefill=runner("prefill") if block["text_conditioned"] else None,
                    cache_dtype=np.dtype(cache_dtype),
                    open_forward=functools.partial(runner, "forward"),
                )
            )
        return cls(directory, manifest, plans, precision)

    # ---- checks (all before any work) -----------------------------------------------------------
    def _check_inputs(
        self, noise: Any, y: Any, y_uncond: Any, guidance: float, method: str
    ) -> tuple[int, int]:
        if method not in METHODS:
            raise StarflowError(f"method: expected one of {list(METHODS)}, got {method!r}")
        if not isinstance(noise, np.ndarray) or noise.dtype != np.float32 or noise.ndim != 4:
            what = (
                f"{noise.dtype} array of shape {noise.shape}"
                if isinstance(noise, np.ndarray)
                else type(noise)
            )
            raise StarflowError(f"noise: expected a float32 (B, C, H, W) numpy array, got {what}")
        B, C, H, W = noise.shape
        if C != self.channels:
            raise StarflowError(f"noise: expected {self.channels} latent channels, got shape {noise.shape}")
        if H % self.patch or W % self.patch:
            raise StarflowError(f"noise: latent {H}x{W} is not a multiple of patch_size {self.patch}")
        lo, hi = self.latent_min, self.latent_max
        if not (lo[0] <= H <= hi[0] and lo[1] <= W <= hi[1]):
            raise StarflowError(
                f"noise: latent {H}x{W} is outside this export's range {lo[0]}x{lo[1]} .. {hi[0]}x{hi[1]} "
                "(re-export with --min-latent/--max-latent to cover it)"
            )
        rows = B * (2 if guidance > 0 else 1)
        if B < 1 or rows > self.max_batch:
            raise StarflowError(
                f"noise: batch {B} runs as {rows} graph rows (guidance doubles the batch); "
                f"this export allows 1 .. {self.max_batch} rows"
            )
        if guidance < 0:
            raise StarflowError(f"guidance: must be >= 0, got {guidance}")
        if self.text is None:
            if y is not None or y_uncond is not None or guidance > 0:
                raise StarflowError("this model is not text-conditioned: pass no y, y_uncond or guidance")
            return H // self.patch, W // self.patch
        dim, max_len = self.text["dim"], self.text["max_length"]
        if y is None:
            raise StarflowError(f"y: this model is text-conditioned; pass ({B}, L, {dim}) float32 embeddings")
        if guidance > 0 and y_uncond is None:
            raise StarflowError("guidance > 0 needs y_uncond (the encoded empty prompt), same shape as y")
        for name, value in (("y", y), ("y_uncond", y_uncond)) if guidance > 0 else (("y", y),):
            if (
                not isinstance(value, np.ndarray)
                or value.dtype != np.float32
                or value.ndim != 3
                or value.shape[0] != B
                or value.shape[2] != dim
                or not 1 <= value.shape[1] <= max_len
            ):
                got = f"{value.dtype} {value.shape}" if isinstance(value, np.ndarray) else type(value)
                raise StarflowError(
                    f"{name}: expected float32 text embeddings ({B}, L, {dim}) with 1 <= L <= {max_len}, "
                    f"got {got}"
                )
        if guidance > 0 and y_uncond.shape != y.shape:
            raise StarflowError(f"y_uncond: expected shape {y.shape} (as y), got {y_uncond.shape}")
        return H // self.patch, W // self.patch

    # ---- shapes ---------------------------------------------------------------------------------
    def patchify(self, x: np.ndarray) -> np.ndarray:
        """(B, C, H, W) -> (B, T, p*p*C), channel order (p1 p2 c), tokens row-major."""
        p = self.patch
        B, C, H, W = x.shape
        x = x.reshape(B, C, H // p, p, W // p, p).transpose(0, 2, 4, 3, 5, 1)
        return x.reshape(B, (H // p) * (W // p), p * p * C)

    def unpatchify(self, x: np.ndarray, h: int, w: int) -> np.ndarray:
        p = self.patch
        B = x.shape[0]
        x = x.reshape(B, h, w, p, p, -1).transpose(0, 5, 1, 3, 2, 4)
        return x.reshape(B, -1, h * p, w * p)

    def _cache(self, plan: BlockPlan, batch: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        key = (plan.index, batch, length)
        if key not in self._caches:
            shape = (plan.layers, batch, plan.kv_heads, length, plan.head_dim)
            self._caches[key] = (np.zeros(shape, plan.cache_dtype), np.zeros(shape, plan.cache_dtype))
        return self._caches[key]

    # ---- density --------------------------------------------------------------------------------
    def forward(self, x: np.ndarray, y: np.ndarray | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Latent x (B, C, H, W) -> z (same shape) and per-block logdets, as `StarFlow.forward`.

        Blocks run in forward order (the reverse of sampling order); logdets are (B, T, D) in
        each block's token order, listed in forward order like the reference.
        """
        h, w = self._check_inputs(x, y, None, 0.0, "jacobi")
        grid = np.array([h, w], dtype=np.int64)
        seq, logdets = self.patchify(x), []
        for plan in reversed(self.plans):
            if plan.forward is None:
                plan.forward = plan.open_forward()
            feeds = {"x": np.ascontiguousarray(seq[:, ::-1] if plan.flip else seq), "grid": grid}
            if plan.text_conditioned:
                feeds["text"] = y
            out = plan.forward.run(feeds)
            seq = out["z"][:, ::-1] if plan.flip else out["z"]
            logdets.append(out["logdet"])
        return self.unpatchify(seq, h, w), logdets

    # ---- sampling -------------------------------------------------------------------------------
    def sample(
        self,
        noise: np.ndarray,
        y: np.ndarray | None = None,
        y_uncond: np.ndarray | None = None,
        guidance: float = 0.0,
        method: str = "jacobi",
        jacobi_block_size: int = 16,
        jacobi_max_iter: int = 32,
        jacobi_threshold: float = 1e-3,
        jacobi_init: str = "noise",
        shallow_jacobi: JacobiSettings | None = None,
        return_stats: bool = False,
        progress: Progress | None = None,
    ) -> np.ndarray | tuple[np.ndarray, list[BlockStats]]:
        """noise (B, C, H, W) float32 -> latent, as `StarFlow.sample` with the same arguments.

        The `jacobi_*` settings apply to every block unless `shallow_jacobi` overrides them for the
        shallow blocks (which converge in fewer iterations than the deep block). The defaults are
        the reference's; `starflow bench` measures what any other setting does to agreement with
        sequential sampling. `progress(block, tokens_done, tokens)` is called after every chunk
        (every token in sequential sampling), for progress bars.
        """
        jacobi = JacobiSettings(jacobi_block_size, jacobi_max_iter, jacobi_threshold, jacobi_init)
        jacobi.check("jacobi settings")
        if shallow_jacobi is not None:
            shallow_jacobi.check("shallow_jacobi")
        h, w = self._check_inputs(noise, y, y_uncond, guidance, method)
        B = noise.shape[0]
        grid = np.array([h, w], dtype=np.int64)
        text = np.concatenate([y, y_uncond]) if guidance > 0 else y
        x = self.patchify(noise)
        stats = []
        for plan in self.plans:
            if not plan.deep and self.guide_deep_only and guidance > 0:
                guidance, text = 0.0, y
            z = np.concatenate([x, x]) if guidance > 0 else x
            record = BlockStats(plan.index, method)
            began = time.perf_counter()
            block_text = text if plan.text_conditioned else None
            report = functools.partial(progress, plan.index) if progress else None
            if method == "sequential":
                x = self._sequential(plan, z, block_text, guidance, grid, record, report)
            else:
                settings = jacobi if plan.deep or shallow_jacobi is None else shallow_jacobi
                x = self._jacobi(plan, z, block_text, guidance, grid, record, settings, report)
            x = x[:B]
            record.seconds = time.perf_counter() - began
            stats.append(record)
        out = self.unpatchify(x, h, w)
        return (out, stats) if return_stats else out

    def _prepare(self, plan: BlockPlan, z: np.ndarray, text: np.ndarray | None):
        zp = np.ascontiguousarray(z[:, ::-1] if plan.flip else z)
        text_len = text.shape[1] if text is not None else 0
        keys, values = self._cache(plan, zp.shape[0], text_len + zp.shape[1])
        if text is not None:
            out = plan.prefill.run({"text": text})
            keys[:, :, :, :text_len] = out["keys"]
            values[:, :, :, :text_len] = out["values"]
        return zp, keys, values, text_len

    @staticmethod
    def _step(plan, inp, keys, values, past: int, start: int, grid) -> tuple[np.ndarray, np.ndarray]:
        """Run a chunk at sequence positions [past, past+c); its keys/values go to the cache there."""
        out = plan.step.run(
            {
                "x": inp,
                "past_keys": keys[:, :, :, :past],
                "past_values": values[:, :, :, :past],
                "grid": grid,
                "start": np.array(start, dtype=np.int64),
            }
        )
        c = inp.shape[1]
        keys[:, :, :, past : past + c] = out["new_keys"]
        values[:, :, :, past : past + c] = out["new_values"]
        return out["mu"], out["sigma"]

    def _sequential(self, plan, z, text, guidance, grid, record: BlockStats, report=None) -> np.ndarray:
        zp, keys, values, text_len = self._prepare(plan, z, text)
        x = zp.copy()
        sos = np.broadcast_to(plan.sos, (zp.shape[0], 1, zp.shape[2]))
        for t in range(zp.shape[1]):
            inp = sos if t == 0 else x[:, t - 1 : t]
            mu, sigma = self._step(plan, inp, keys, values, text_len + t, t, grid)
            if guidance > 0:
                mu, sigma = guide(mu, sigma, guidance)
            x[:, t] = zp[:, t] * sigma[:, 0] + mu[:, 0]
            record.iterations.append(1)
            record.evaluations += 1
            record.tokens += zp.shape[0]
            if report:
                report(t + 1, zp.shape[1])
        return x[:, ::-1] if plan.flip else x

    def _jacobi(
        self, plan, z, text, guidance, grid, record: BlockStats, settings: JacobiSettings, report=None
    ) -> np.ndarray:
        zp, keys, values, text_len = self._prepare(plan, z, text)
        B, T, D = zp.shape
        x_full = np.concatenate([np.broadcast_to(plan.sos, (B, 1, D)), zp], axis=1)
        start, previous_map = 0, None  # the last (mu, sigma) of the previous chunk
        while start < T:
            c = min(settings.block_size, T - start)
            target = zp[:, start : start + c]
            if settings.init == "chunk-mean" and previous_map is not None:
                mu, sigma = previous_map
                guess = mu.mean(axis=1, keepdims=True) + sigma.mean(axis=1, keepdims=True) * target
                x_full[:, start + 1 : start + 1 + c] = guess
            for i in range(settings.max_iter):
                inp = x_full[:, start : start + c]
                mu, sigma = self._step(plan, inp, keys, values, text_len + start, start, grid)
                if guidance > 0:
                    mu, sigma = guide(mu, sigma, guidance)
                new = mu + sigma * target
                old = x_full[:, start + 1 : start + 1 + c]
                diff = np.square(new - old).mean() / np.square(new).mean()
                x_full[:, start + 1 : start + 1 + c] = new
                record.evaluations += 1
                record.tokens += B * c
                if diff < settings.threshold or i == settings.max_iter - 1:
                    break
            record.iterations.append(i + 1)
            previous_map = mu, sigma
            start += c
            if report:
                report(start, T)
        x = x_full[:, 1:]
        return x[:, ::-1] if plan.flip else x
