"""The standalone sampler: the exported block graphs driven by `starflow.core.sampler` (no torch).

`Pipeline.sample`, `Pipeline.forward` and `Pipeline.nll_gradient` are the loops of `StarFlow.sample`,
`StarFlow.forward` and the self-denoise's gradient (the same `starflow.core.sampler.sample`,
`density` and `nll_gradient`), with each block's step, prefill, forward and vjp graphs behind a
backend runner. Guidance, the Jacobi update and the stop test run in
numpy in fp32, exactly as in the reference.

Lifetimes: a `Pipeline` owns its sessions and its key/value caches, which are allocated once
per (block, batch, length) and reused by later calls. One `sample` call at a time per Pipeline;
the returned arrays belong to the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from starflow.contract.manifest import Block, Manifest
from starflow.core import sampler
from starflow.core.checks import check_float32
from starflow.core.errors import StarflowError
from starflow.core.sampler import BlockStats, CachedStep, SampleOptions
from starflow.runtime.backends import Runner, check_backend, open_runner


class GraphBlock:
    """One exported flow block as the sampler sees it (`starflow.core.sampler.SamplerBlock`)."""

    def __init__(self, entry: Block, open_graph: Callable[[str], Runner], cache_dtype: str | None):
        self.entry = entry
        self.index, self.deep, self.flip = entry.index, entry.deep, entry.flip
        self.flip_in_frame, self.frame_local = entry.flip_in_frame, entry.frame_local
        self.text_conditioned = entry.text_conditioned
        self.sos = np.asarray(entry.sos_embed, dtype=np.float32).reshape(1, 1, -1)
        self.cache_dtype = None if cache_dtype is None else np.dtype(cache_dtype)  # None: no step graph
        self._open_graph = open_graph  # graph kind -> its runner
        self._runners: dict[str, Runner] = {}
        self._caches: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def runner(self, kind: str) -> Runner:
        """The block's graph of `kind`, its session created on first use."""
        if kind not in self._runners:
            self._runners[kind] = self._open_graph(kind)
        return self._runners[kind]

    def cache(self, rows: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values (layers, rows, kv_heads, length, head_dim), allocated once per size."""
        if (rows, length) not in self._caches:
            e = self.entry
            shape = (e.layers, rows, e.kv_heads, length, e.head_dim)
            self._caches[rows, length] = np.zeros(shape, self.cache_dtype), np.zeros(shape, self.cache_dtype)
        return self._caches[rows, length]

    def open(self, rows: int, grid: tuple[int, int], text: np.ndarray | None, tokens: int) -> CachedStep:
        text_length = 0 if text is None else text.shape[1]
        keys, values = self.cache(rows, text_length + tokens)
        feeds = {"grid": np.array(grid, dtype=np.int64)}
        step_graph = self.runner("step")

        def run(x: np.ndarray, past_keys: np.ndarray, past_values: np.ndarray, start: int):
            feeds.update(x=np.ascontiguousarray(x), past_keys=past_keys, past_values=past_values)
            out = step_graph.run({**feeds, "start": np.array(start, dtype=np.int64)})
            return out["mu"], out["sigma"], out["new_keys"], out["new_values"]

        step = CachedStep(run, keys, values, text_length)
        if text is not None:
            out = self.runner("prefill").run({"text": text})
            step.prefill(out["keys"], out["values"])
        return step

    def density(
        self, x: np.ndarray, grid: np.ndarray, text: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The density graph: x (B, T, D) in block order -> z, logdet."""
        feeds = {"x": np.ascontiguousarray(x), "grid": grid} | ({"text": text} if text is not None else {})
        out = self.runner("forward").run(feeds)
        return out["z"], out["logdet"]

    def vjp(self, x: np.ndarray, grid: np.ndarray, grad_z: np.ndarray, text: np.ndarray | None) -> np.ndarray:
        """The vjp graph: x, grad_z (B, T, D) in block order -> grad_x."""
        feeds = {"x": np.ascontiguousarray(x), "grid": grid, "grad_z": np.ascontiguousarray(grad_z)}
        out = self.runner("vjp").run(feeds | ({"text": text} if text is not None else {}))
        return out["grad_x"]


def graph_blocks(
    directory: Path,
    manifest: Manifest,
    precision: str,
    backend: str = "onnxruntime",
    providers: list[Any] | None = None,
    threads: int | None = None,
) -> list[GraphBlock]:
    """The export's blocks (sampling order) with their `precision` graphs, no session opened yet."""

    def opener(entry: Block) -> Callable[[str], Runner]:
        def open_graph(kind: str) -> Runner:
            graph = manifest.block_graph(entry, kind, precision)
            return open_runner(backend, directory, graph, manifest.engine(graph.name), providers, threads)

        return open_graph

    blocks = []
    for entry in manifest.blocks:
        step = entry.graphs.get(precision, {}).get("step")
        cache_dtype = None if step is None else manifest.graph(step).input("past_keys").dtype
        blocks.append(GraphBlock(entry, opener(entry), cache_dtype))
    return blocks


class Pipeline:
    """Samples latents from an artifacts directory written by `starflow export onnx`."""

    def __init__(self, directory: Path, manifest: Manifest, blocks: list[GraphBlock], precision: str):
        self.directory = directory
        self.manifest = manifest
        self.blocks = blocks  # sampling order: deep block first
        self.precision = precision

    @classmethod
    def load(
        cls,
        artifacts_dir: str | Path,
        backend: str = "onnxruntime",
        precision: str = "fp32",
        providers: list[Any] | None = None,
        threads: int | None = None,
    ) -> Pipeline:
        """Check the manifest and every file's sha256, then create each block's sessions once."""
        directory = Path(artifacts_dir)
        check_backend(backend)
        manifest = Manifest.load(directory)
        if precision not in manifest.precisions:
            raise StarflowError(
                f"{directory}: no {precision} graphs; this export has {sorted(manifest.precisions)}"
            )

        blocks = graph_blocks(directory, manifest, precision, backend, providers, threads)
        for block in blocks:  # the sampling graphs' sessions now, so a broken one fails the load
            block.runner("step")
            if block.text_conditioned:
                block.runner("prefill")
        return cls(directory, manifest, blocks, precision)

    def check_inputs(
        self, noise: Any, y: Any, y_uncond: Any, options: SampleOptions, name: str = "noise"
    ) -> tuple[int, int]:
        """`sampler.check_sample_inputs`, then float32 and this export's latent, frame and batch
        ranges; errors call the first array `name`."""
        manifest = self.manifest
        latent, text, video = manifest.latent, manifest.text, manifest.video
        grid = sampler.check_sample_inputs(
            noise, y, y_uncond, options, channels=latent.channels, patch_size=latent.patch_size,
            text_dim=text.dim if text else 0, max_text_length=text.max_length if text else None,
            video=video is not None, name=name,
        )  # fmt: skip
        arrays = {name: noise, "y": y, "y_uncond": y_uncond if options.guidance > 0 else None}
        for what, array in arrays.items():
            if array is not None:
                check_float32(array, what)
        B, H, W = noise.shape[0], *noise.shape[-2:]
        if not latent.holds(H, W):
            raise StarflowError(
                f"{name}: latent {H}x{W} is outside this export's range {latent.describe_range()} "
                "(re-export with min_latent/max_latent to cover it)"
            )
        if video is not None and noise.ndim != 5:
            raise StarflowError(
                f"{name}: this is a video export; pass clips (B, F, C, H, W) of {video.frames.min} .. "
                f"{video.frames.max} frames, got shape {noise.shape}"
            )
        frames = noise.shape[1] if noise.ndim == 5 else 1  # an image export took no clip above
        self.check_frames(frames)
        rows = B * (2 if options.guidance > 0 else 1)
        if any(b.frame_local for b in self.blocks):
            rows = max(rows, B * frames)
        if rows > manifest.max_rows:
            raise StarflowError(
                f"{name}: batch {B} of {frames} frame(s) runs as {rows} graph rows (guidance doubles the "
                "batch, frame-local blocks take a row per frame); this export allows "
                f"1 .. {manifest.max_rows} rows"
            )
        held = None if video is None else video.window or video.frames.max
        if held is not None and options.window is not None and options.window > held:
            raise StarflowError(
                f"window: {options.window} frames is more than this export's caches hold ({held} frames)"
            )
        if video is not None and video.window and options.window is None and frames > video.window:
            raise StarflowError(
                f"{name}: {frames} frames without a window are more than this export's caches hold "
                f"({video.window} frames); sample with window <= {video.window}"
            )
        return grid

    def check_frames(self, frames: int) -> None:
        """A video export's clips are within its frame range (an image export's stills pass)."""
        video = self.manifest.video
        if video is not None and not video.frames.holds(frames):
            raise StarflowError(
                f"frames: {frames} frames is outside this export's range {video.frames.min} .. "
                f"{video.frames.max} (re-export with max_frames to cover it)"
            )

    # ---- density --------------------------------------------------------------------------------
    def forward(self, x: np.ndarray, y: np.ndarray | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Latent x (B, C, H, W) or clip (B, F, C, H, W) -> z (same shape) and the logdets of the
        blocks in forward order: `StarFlow.forward`'s loop (`starflow.core.sampler.density`)."""
        self.check_inputs(x, y, None, SampleOptions(), name="latents")
        p = self.manifest.latent.patch_size
        z, logdets, _ = sampler.density(self.blocks[::-1], x, y, patch_size=p)
        return z, logdets

    def nll_gradient(self, x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
        """Latents x (B, C, H, W) or clips -> the gradient of each sample's total NLL, through the
        forward and vjp graphs (`starflow.core.sampler.nll_gradient`; the graphs are fp32 only)."""
        self.check_inputs(x, y, None, SampleOptions(), name="latents")
        return sampler.nll_gradient(self.blocks[::-1], x, y, patch_size=self.manifest.latent.patch_size)

    # ---- sampling -------------------------------------------------------------------------------
    def sample(
        self,
        noise: np.ndarray,
        y: np.ndarray | None = None,
        y_uncond: np.ndarray | None = None,
        options: SampleOptions | None = None,
        *,
        return_stats: bool = False,
        progress: sampler.Progress[int] | None = None,
    ) -> np.ndarray | tuple[np.ndarray, list[BlockStats]]:
        """noise (B, C, H, W) or clips (B, F, C, H, W) float32 -> latents, as `StarFlow.sample`
        with the same arguments.

        `progress(block, tokens_done, tokens)` is called after every chunk (every token in
        sequential sampling), for progress bars.
        """
        options = options or SampleOptions()
        self.check_inputs(noise, y, y_uncond, options)
        x, stats = sampler.sample(
            self.blocks, noise, y, y_uncond, options, patch_size=self.manifest.latent.patch_size,
            guide_deep_only=self.manifest.guidance.deep_only, progress=progress,
        )  # fmt: skip
        x = np.ascontiguousarray(x)
        return (x, stats) if return_stats else x
