"""Bodies of `starflow generate` (runtime only, no torch) and `starflow demo` (runtime vs PyTorch)."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from starflow.errors import StarflowError
from starflow.runtime.generator import Generation, Generator
from starflow.runtime.outputs import output_kind, save_images, save_png

Echo = Callable[[str], None]


@contextmanager
def block_bars(generator: Generator, batches: int) -> Iterator[Callable[[int, int, int], None]]:
    """One progress bar per flow block (tokens done, over every batch); yields the runtime callback."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as bar:
        tasks: dict[int, Any] = {}
        finished: dict[int, int] = {}  # tokens of the batches already done, per block

        def report(block: int, done: int, tokens: int) -> None:
            if block not in tasks:
                role = next(b["role"] for b in generator.manifest["blocks"] if b["index"] == block)
                tasks[block] = bar.add_task(f"block {block} ({role})", total=tokens * batches)
                finished[block] = 0
            bar.update(tasks[block], completed=finished[block] + done)
            if done == tokens:
                finished[block] += tokens

        yield report


def _load(artifacts: Path | None, backend: str, precision: str, threads: int | None, echo: Echo) -> Generator:
    if artifacts is None:
        from starflow.export.cache import demo_artifacts

        began = time.perf_counter()
        artifacts = demo_artifacts(_export_bar())
        if time.perf_counter() - began > 1:
            echo(f"exported the embedded demo model to {artifacts} ({time.perf_counter() - began:.1f} s)")
    return Generator.load(artifacts, backend=backend, precision=precision, threads=threads)


def _export_bar() -> Callable[[str, int, int], None]:
    """A progress callback for `export_onnx` that prints one line per phase."""
    seen: set[str] = set()

    def report(what: str, done: int, total: int) -> None:
        if what not in seen and what != "done":
            seen.add(what)
            print(f"  [{done + 1}/{total}] {what}", flush=True)

    return report


def _run(generator: Generator, batches: int, echo: Echo, **kwargs: Any) -> Generation:
    """Generate with per-block progress bars; warnings (prompt truncation) become yellow lines."""
    with warnings.catch_warnings(record=True) as caught, block_bars(generator, batches) as report:
        warnings.simplefilter("always")
        result = generator.generate(progress=report, **kwargs)
    for warning in caught:
        echo(f"warning: {warning.message}")
    return result


def timing_lines(result: Generation) -> list[str]:
    s = result.seconds
    n = len(result.images)
    calls = sum(b.evaluations for b in result.stats)
    return [
        f"time: {s['total']:.2f} s for {n} images ({n / s['total']:.1f} images/s): text {s['text']:.3f} s, "
        f"flow {s['flow']:.3f} s ({calls} block calls), denoise {s['denoise']:.3f} s, "
        f"decode {s['decode']:.3f} s"
    ]


def generate_command(
    *,
    artifacts: Path | None,
    prompts: list[str],
    negative_prompt: str | None,
    guidance: float | None,
    seed: int,
    num_images: int,
    aspect_ratio: str | None,
    size: str | None,
    method: str,
    jacobi_block_size: int | None,
    jacobi_max_iter: int | None,
    jacobi_threshold: float | None,
    denoise: bool,
    backend: str,
    precision: str,
    threads: int | None,
    out: Path,
    echo: Echo,
) -> None:
    output_kind(out)  # a bad --out fails before any work
    if not prompts:
        raise StarflowError('no prompt given: pass at least one --prompt ("" for the unconditional one)')
    if num_images < 1:
        raise StarflowError(f"--num-images: must be >= 1, got {num_images}")
    generator = _load(artifacts, backend, precision, threads, echo)
    latent_size = generator.latent_size(aspect_ratio, size)
    weight = generator.manifest["guidance"]["default_weight"] if guidance is None else guidance
    total = len(prompts) * num_images
    batches = -(-total // generator.images_per_batch(weight))
    result = _run(
        generator,
        batches,
        echo,
        prompts=prompts,
        num_images=num_images,
        negative_prompt=negative_prompt,
        guidance=weight,
        seed=seed,
        latent_size=latent_size,
        method=method,
        jacobi_block_size=jacobi_block_size,
        jacobi_max_iter=jacobi_max_iter,
        jacobi_threshold=jacobi_threshold,
        denoise=denoise,
    )
    files = save_images(out, result.images, columns=min(num_images, 8), prompts=result.prompts)
    h, w = result.images.shape[1:3]
    where = out if len(files) == 1 else f"{out}/ ({len(files)} PNGs)"
    echo(
        f"generated {total} images {h}x{w} from {generator.pipeline.directory} "
        f"({method}, guidance {weight:g}, seed {seed}) -> {where}"
    )
    for line in timing_lines(result):
        echo(line)


def demo_command(*, out: Path, per_digit: int, seed: int, threads: int | None, echo: Echo) -> None:
    """Export the embedded model, draw every digit through the runtime, time it against PyTorch."""
    import torch

    from starflow.sampling import DEMO_CHECKPOINT, load_conditional
    from starflow.t2i import text_to_image
    from starflow.text_encoder import LabelTextEncoder

    if out.suffix != ".png":
        raise StarflowError(f"--out {out}: the demo writes a .png grid")
    output_kind(out)
    if per_digit < 1:
        raise StarflowError(f"--per-digit: must be >= 1, got {per_digit}")
    if threads:
        torch.set_num_threads(threads)
    generator = _load(None, "onnxruntime", "fp32", threads or torch.get_num_threads(), echo)
    digits = [str(d) for d in range(10)]
    guidance = generator.manifest["guidance"]["default_weight"]
    batch = generator.images_per_batch(guidance)
    batches = -(-len(digits) * per_digit // batch)
    settings = dict(prompts=digits, num_images=per_digit, guidance=guidance, seed=seed)
    generator.generate(**{**settings, "num_images": 1})  # warm-up: sessions, caches
    runtime = _run(generator, batches, echo, **settings)

    model, table = load_conditional(DEMO_CHECKPOINT)
    encoder = LabelTextEncoder(table)
    jacobi = generator.manifest["jacobi"]
    reference_settings = dict(
        jacobi_block_size=jacobi["block_size"],
        jacobi_max_iter=jacobi["max_iter"],
        jacobi_threshold=jacobi["threshold"],
        batch_size=batch,
    )
    text_to_image(model, encoder, **{**settings, "num_images": 1}, **reference_settings)  # warm-up
    began = time.perf_counter()
    reference = text_to_image(model, encoder, **settings, **reference_settings)
    reference_seconds = time.perf_counter() - began

    # column = digit, row = sample
    by_digit = runtime.images.reshape(10, per_digit, *runtime.images.shape[1:]).swapaxes(0, 1)
    save_png(out, by_digit.reshape(-1, *runtime.images.shape[1:]), columns=10)
    n = len(runtime.images)
    difference = float(np.abs(runtime.images - reference).max())
    echo(f"wrote {out.resolve()}: {per_digit} samples of each digit 0-9 (columns), through the runtime")
    echo(
        f"PyTorch reference: {reference_seconds:.2f} s; runtime (ONNX Runtime, no torch): "
        f"{runtime.seconds['total']:.2f} s for the same {n} images "
        f"({reference_seconds / runtime.seconds['total']:.2f}x); "
        f"max pixel difference {difference:.1e}"
    )
    for line in timing_lines(runtime):
        echo(f"runtime {line}")
