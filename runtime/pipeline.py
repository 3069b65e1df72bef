"""The standalone sampler: the exported block graphs driven by `starflow.sampler` (no torch).

`Pipeline.sample` is the loop of `StarFlow.sample` (the same `starflow.sampler.sample`), with
each block's step, prefill and forward graphs behind a backend runner. Guidance, the Jacobi
update and the stop test run in numpy in fp32, exactly as in the reference.

Lifetimes: a `Pipeline` owns its sessions and its key/value caches, which are allocated once
per (block, batch, length) and reused by later calls. One `sample` call at a time per Pipeline;
the returned arrays belong to the caller.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from starflow import sampler
from starflow.errors import StarflowError
from starflow.export.manifest import Block, Manifest
from starflow.runtime.backends import Runner, check_backend, open_runner
from starflow.sampler import BlockStats, CachedStep, SampleOptions


class GraphBlock:
    """One exported flow block as the sampler sees it (`starflow.sampler.Block`)."""

    def __init__(self, entry: Block, step: Runner, prefill: Runner | None, cache_dtype: str, open_forward):
        self.entry = entry
        self.index, self.deep, self.flip = entry.index, entry.deep, entry.flip
        self.text_conditioned = entry.text_conditioned
        self.sos = np.asarray(entry.sos_embed, dtype=np.float32).reshape(1, 1, -1)
        self.step, self.prefill = step, prefill
        self.cache_dtype = np.dtype(cache_dtype)
        self._open_forward = open_forward  # the density graph, opened on first use
        self._forward: Runner | None = None
        self._caches: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def cache(self, rows: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values (layers, rows, kv_heads, length, head_dim), allocated once per size."""
        if (rows, length) not in self._caches:
            e = self.entry
            shape = (e.layers, rows, e.kv_heads, length, e.head_dim)
            self._caches[rows, length] = np.zeros(shape, self.cache_dtype), np.zeros(shape, self.cache_dtype)
        return self._caches[rows, length]

    def open(self, rows: int, grid: tuple[int, int], text: np.ndarray | None) -> CachedStep:
        text_length = 0 if text is None else text.shape[1]
        keys, values = self.cache(rows, text_length + grid[0] * grid[1])
        feeds = {"grid": np.array(grid, dtype=np.int64)}

        def run(x: np.ndarray, past_keys: np.ndarray, past_values: np.ndarray, start: int):
            feeds.update(x=np.ascontiguousarray(x), past_keys=past_keys, past_values=past_values)
            out = self.step.run({**feeds, "start": np.array(start, dtype=np.int64)})
            return out["mu"], out["sigma"], out["new_keys"], out["new_values"]

        step = CachedStep(run, keys, values, text_length)
        if text is not None:
            out = self.prefill.run({"text": text})
            step.prefill(out["keys"], out["values"])
        return step

    def forward(
        self, x: np.ndarray, grid: np.ndarray, text: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The density graph: x (B, T, D) in block order -> z, logdet."""
        if self._forward is None:
            self._forward = self._open_forward()
        feeds = {"x": np.ascontiguousarray(x), "grid": grid} | ({"text": text} if text is not None else {})
        out = self._forward.run(feeds)
        return out["z"], out["logdet"]


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

        def runner(entry: Block, kind: str) -> Runner:
            graph = manifest.block_graph(entry, kind, precision)
            return open_runner(backend, directory, graph, manifest.engine(graph.name), providers, threads)

        blocks = []
        for entry in manifest.blocks:
            step = manifest.block_graph(entry, "step", precision)
            blocks.append(
                GraphBlock(
                    entry,
                    runner(entry, "step"),
                    runner(entry, "prefill") if entry.text_conditioned else None,
                    step.input("past_keys").dtype,
                    lambda entry=entry: runner(entry, "forward"),
                )
            )
        return cls(directory, manifest, blocks, precision)

    def check_inputs(self, noise: Any, y: Any, y_uncond: Any, options: SampleOptions) -> tuple[int, int]:
        """`sampler.check_sample_inputs`, then float32 and this export's latent and batch ranges."""
        latent, text = self.manifest.latent, self.manifest.text
        grid = sampler.check_sample_inputs(
            noise, y, y_uncond, options, channels=latent.channels, patch_size=latent.patch_size,
            text_dim=text.dim if text else 0, max_text_length=text.max_length if text else None,
        )  # fmt: skip
        arrays = {"noise": noise, "y": y, "y_uncond": y_uncond if options.guidance > 0 else None}
        for name, array in arrays.items():
            if array is not None and (not isinstance(array, np.ndarray) or array.dtype != np.float32):
                raise StarflowError(
                    f"{name}: expected a float32 numpy array, got {getattr(array, 'dtype', type(array))}"
                )
        B, _, H, W = noise.shape
        if not latent.holds(H, W):
            raise StarflowError(
                f"noise: latent {H}x{W} is outside this export's range {latent.describe_range()} "
                "(re-export with min_latent/max_latent to cover it)"
            )
        rows = B * (2 if options.guidance > 0 else 1)
        if rows > self.manifest.max_rows:
            raise StarflowError(
                f"noise: batch {B} runs as {rows} graph rows (guidance doubles the batch); "
                f"this export allows 1 .. {self.manifest.max_rows} rows"
            )
        return grid

    # ---- density --------------------------------------------------------------------------------
    def forward(self, x: np.ndarray, y: np.ndarray | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Latent x (B, C, H, W) -> z (same shape) and per-block logdets, as `StarFlow.forward`.

        Blocks run in forward order (the reverse of sampling order); logdets are (B, T, D) in
        each block's token order, listed in forward order like the reference.
        """
        h, w = self.check_inputs(x, y, None, SampleOptions())
        p = self.manifest.latent.patch_size
        grid = np.array([h, w], dtype=np.int64)
        seq, logdets = sampler.patchify(x, p), []
        for block in reversed(self.blocks):
            z, logdet = block.forward(
                np.flip(seq, 1) if block.flip else seq, grid, y if block.text_conditioned else None
            )
            seq = np.flip(z, 1) if block.flip else z
            logdets.append(logdet)
        return sampler.unpatchify(seq, p, h, w), logdets

    # ---- sampling -------------------------------------------------------------------------------
    def sample(
        self,
        noise: np.ndarray,
        y: np.ndarray | None = None,
        y_uncond: np.ndarray | None = None,
        options: SampleOptions | None = None,
        *,
        return_stats: bool = False,
        progress: sampler.Progress | None = None,
    ) -> np.ndarray | tuple[np.ndarray, list[BlockStats]]:
        """noise (B, C, H, W) float32 -> latent, as `StarFlow.sample` with the same arguments.

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
