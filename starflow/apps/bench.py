"""`starflow bench`: the reference and the runtime measured side by side, in one process.

Every row samples from the same noise and text. Times are wall-clock medians over `repeats`;
`LEGEND` says what the other columns measure (printed under the table). With `options_row`, one
more runtime row samples with those settings, beside the reference's.
A video preset samples clips of `frames` frames, with one more runtime row: Jacobi without the
warm start (each chunk after the first frame starts from its noise), for its effect on calls.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from starflow.apps.timing import interleaved
from starflow.contract.manifest import SCHEMA_VERSION
from starflow.core.checks import check_count
from starflow.core.config import load_config
from starflow.core.errors import StarflowError
from starflow.core.generation import array_bytes, check_images_fit, counted
from starflow.core.limits import check_fits, check_threads
from starflow.core.outputs import check_output_file, save_text
from starflow.core.sampler import JacobiSettings, SampleOptions

if TYPE_CHECKING:
    from starflow.model.flow import StarFlow

# torch and the model load inside the functions that run them: `starflow bench --help` prints
# these defaults and the legend without them
DEFAULT_PRESET = "bench-256"
DEFAULT_FRAMES = 8
DEFAULT_GUIDANCE = 2.0
DEFAULT_BLOCK_SIZE = 64
DEFAULT_THROUGHPUT_BATCH = 8
DEFAULT_REPEATS = 3
DEFAULT_THREADS = (1, 2)  # the whole bench runs at each count
LEGEND = (
    "fwd units: the row's seconds over one forward pass (density direction, whole model, same batch) "
    "of the same engine, so sampler costs compare across machines. compute: the work its block calls "
    "did, in forward passes: image tokens x graph rows x layers summed over blocks (a guided deep block "
    "runs [cond ; uncond], twice the rows), whatever the chunking. max|Δ| and rms Δ: against PyTorch "
    "sequential sampling, the flow's exact inverse."
)


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    """What to measure. `artifacts` + `checkpoint` bench an export instead of a preset."""

    preset: str = DEFAULT_PRESET  # seeded, perturbed random weights of a config preset
    artifacts: Path | None = None
    checkpoint: Path | None = None
    batch: int = 1
    sampling: SampleOptions = SampleOptions(DEFAULT_GUIDANCE, jacobi=JacobiSettings(DEFAULT_BLOCK_SIZE))
    options_row: SampleOptions | None = None  # one more runtime row, sampled with these
    throughput_batch: int = DEFAULT_THROUGHPUT_BATCH  # 0 skips the throughput row
    repeats: int = DEFAULT_REPEATS  # timed runs per Jacobi/forward row (median)
    threads: int | None = None  # CPU threads of both engines (set explicitly); None: every core
    seed: int = 0
    frames: int | None = None  # video models: clips of this many frames (default DEFAULT_FRAMES)

    @classmethod
    def from_settings(
        cls,
        guidance: float | None = None,
        jacobi_block_size: int | None = None,
        jacobi_max_iter: int | None = None,
        jacobi_threshold: float | None = None,
        jacobi_init: str | None = None,
        shallow_block_size: int | None = None,
        shallow_threshold: float | None = None,
        **given: Any,
    ) -> BenchOptions:
        """Options from flat settings (the command line's), unset ones at the defaults above.
        `jacobi_init` or a `shallow_*` setting adds the options row: the first guess everywhere,
        the shallow blocks' own chunking."""
        default = cls.sampling
        jacobi = dataclasses.replace(
            default.jacobi,
            **{k: v for k, v in (("block_size", jacobi_block_size), ("max_iter", jacobi_max_iter),
                                 ("threshold", jacobi_threshold)) if v is not None},
        )  # fmt: skip
        sampling = SampleOptions(default.guidance if guidance is None else guidance, "jacobi", jacobi)
        row = None
        if jacobi_init is not None or shallow_block_size is not None or shallow_threshold is not None:
            first_guess = dataclasses.replace(jacobi, init=jacobi_init or "noise")
            shallow = dataclasses.replace(
                first_guess,
                block_size=shallow_block_size or jacobi.block_size,
                threshold=jacobi.threshold if shallow_threshold is None else shallow_threshold,
            )
            row = SampleOptions(sampling.guidance, "jacobi", first_guess, shallow)
        options = cls(sampling=sampling, options_row=row, **{k: v for k, v in given.items() if v is not None})
        options.check()
        return options

    def check(self) -> None:
        self.sampling.check()
        if self.options_row is not None:
            self.options_row.check()
        for name in ("batch", "repeats"):
            check_count(getattr(self, name), name)
        check_count(self.throughput_batch, "throughput_batch", 0)
        check_threads(self.threads)
        if self.artifacts is not None and self.checkpoint is None:
            raise StarflowError("artifacts needs checkpoint too: the PyTorch rows run that checkpoint")
        if self.frames is not None:
            check_count(self.frames, "frames")
        self.check_memory()

    def check_memory(self) -> None:
        """The largest batch's arrays (`array_bytes`), refused before any model is built: a preset's
        config is read here; an export's model is not known yet, so the least any model needs."""
        n = max(self.batch, self.throughput_batch)
        if self.artifacts is not None:
            check_images_fit(n, self.frames)
            return
        config = load_config(self.preset)
        frames = (self.frames or DEFAULT_FRAMES) if config.video else None
        side = config.latent_size
        clips = f" of {frames} frames" if frames else ""
        what = f"a batch of {counted(n, 'clip' if frames else 'image')}{clips}, {side}x{side} latent pixels"
        check_fits(array_bytes(n, frames, (side, side), config.channel_size, 1), what)


@dataclasses.dataclass
class Row:
    name: str
    engine: str  # pytorch | runtime
    seconds: float
    units: float  # seconds / this engine's forward pass
    evaluations: int  # block calls (transformer passes over image tokens)
    compute: float  # token rows x layers the calls processed, in forward passes
    max_abs: float | None  # vs PyTorch sequential
    rms: float | None


def prepare(options: BenchOptions) -> tuple[StarFlow, Path]:
    """The model and an fp32 export of it; a preset's export is cached (`export.cache`, "bench")."""
    from starflow.export.cache import cache_folder, cached_export
    from starflow.model.checkpoint import load_model, save_model
    from starflow.model.testing import random_model

    if options.artifacts is not None:
        config = None if options.checkpoint.suffix == ".safetensors" else options.preset
        return load_model(config, options.checkpoint), options.artifacts
    model = random_model(load_config(options.preset), options.seed)
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode() + tensor.numpy().tobytes())
    frames = max(options.frames or DEFAULT_FRAMES, 16) if model.config.video else None
    clips = f"-frames{frames}" if frames else ""
    folder = cache_folder("bench")
    name = f"{options.preset}-seed{options.seed}-{digest.hexdigest()[:12]}{clips}"
    checkpoint = folder / f"{name}.safetensors"
    if not checkpoint.is_file():
        save_model(model, checkpoint)  # the same bytes every time, written atomically: whoever is first
    # no validation (the bench itself measures agreement) and no self-denoise (it samples latents)
    export = {"precisions": ("fp32",), "validate": False, "denoise": False, "max_frames": frames}
    artifacts, _ = cached_export(folder / f"{name}-schema{SCHEMA_VERSION}", checkpoint, export)
    return model, artifacts


def run_bench(options: BenchOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure the forward, sequential and Jacobi rows (and batch throughput); a JSON-ready dict."""
    import torch

    from starflow.runtime import Pipeline

    options.check()
    # torch's default OpenMP threads collapse when other jobs share the cores: both engines get
    # the same explicit count
    threads = options.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    log(f"preparing {options.artifacts or options.preset} ...")
    model, artifacts = prepare(options)
    if options.frames is not None and not model.config.video:
        raise StarflowError(f"frames: {options.frames} asked of an image model; clips need a video preset")
    frames = (options.frames or DEFAULT_FRAMES) if model.config.video else None
    engines = Engines(model, Pipeline.load(artifacts, threads=threads), frames)
    load_before = os.getloadavg()[0]
    guided = options.sampling if model.text_dim else dataclasses.replace(options.sampling, guidance=0.0)
    inputs = engines.inputs(options.batch, guided.guidance, options.seed)
    rows = forward_rows(engines, inputs, options.repeats)
    rows += sampling_rows(engines, inputs, guided, options, {r.engine: r.seconds for r in rows}, log)
    throughput = {}
    if options.throughput_batch:
        log(f"batch {options.throughput_batch} throughput ...")
        throughput = engines.throughput(options.throughput_batch, guided, options.seed + 1)
    by_key = {(r.engine, r.name): r for r in rows}
    speedup = by_key[("pytorch", "jacobi sampling")].seconds / by_key[("runtime", "jacobi sampling")].seconds
    return {
        "model": options.preset if options.checkpoint is None else str(options.checkpoint),
        "artifacts": str(artifacts),
        "batch": options.batch,
        "frames": frames,
        "guidance": guided.guidance,
        "jacobi": dataclasses.asdict(guided.jacobi),
        "options": None if options.options_row is None else dataclasses.asdict(options.options_row),
        "threads": threads,
        "load_average": [load_before, os.getloadavg()[0]],
        "cores": os.cpu_count(),
        "rows": [dataclasses.asdict(r) for r in rows],
        "runtime_jacobi_speedup_vs_pytorch_jacobi": speedup,
        "throughput": throughput,
    }


@dataclasses.dataclass
class Engines:
    """The PyTorch model and the runtime pipeline of the same weights, run on the same inputs."""

    model: StarFlow
    pipe: Any  # starflow.runtime.Pipeline
    frames: int | None = None  # clips of this many frames (video models)

    def inputs(self, n: int, guidance: float, seed: int) -> dict[str, list[Any]]:
        """noise (n, C, H, W) or (n, frames, C, H, W), y and y_uncond (zeros under guidance), as
        numpy and as torch."""
        import torch

        config = self.model.config
        rng = np.random.default_rng(seed)
        side = config.latent_size
        clip = () if self.frames is None else (self.frames,)
        arrays = [
            rng.standard_normal((n, *clip, config.channel_size, side, side), dtype=np.float32),
            None,
            None,
        ]
        if self.model.text_dim:
            arrays[1] = rng.standard_normal((n, config.txt_size, config.txt_dim), dtype=np.float32)
            arrays[2] = np.zeros_like(arrays[1]) if guidance > 0 else None
        return {"runtime": arrays, "pytorch": [None if a is None else torch.from_numpy(a) for a in arrays]}

    def sampler(
        self, engine: str, inputs: dict[str, list[Any]], sampling: SampleOptions
    ) -> Callable[[], Any]:
        run = self.model.sample if engine == "pytorch" else self.pipe.sample
        return lambda: run(*inputs[engine], sampling, return_stats=True)

    def throughput(self, n: int, sampling: SampleOptions, seed: int) -> dict[str, Any]:
        inputs = self.inputs(n, sampling.guidance, seed)
        batched = interleaved({e: self.sampler(e, inputs, sampling) for e in ("pytorch", "runtime")}, 1)
        return {
            "batch": n,
            "pytorch_jacobi_images_per_s": n / batched["pytorch"][0],
            "runtime_jacobi_images_per_s": n / batched["runtime"][0],
        }


def forward_rows(engines: Engines, inputs: dict[str, list[Any]], repeats: int) -> list[Row]:
    """One forward pass (density direction) per engine: the unit the sampling rows are measured in."""
    import torch

    (noise, y, _), (t_noise, t_y, _) = inputs["runtime"], inputs["pytorch"]
    with torch.no_grad():
        runs = {
            "pytorch": lambda: engines.model(t_noise, t_y),
            "runtime": lambda: engines.pipe.forward(noise, y),
        }
        forward = interleaved(runs, repeats, warmup=1)
    blocks = len(engines.pipe.blocks)
    return [
        Row("forward pass", e, seconds, 1.0, blocks, 1.0, None, None) for e, (seconds, _) in forward.items()
    ]


def sampling_rows(
    engines: Engines,
    inputs: dict[str, list[Any]],
    guided: SampleOptions,
    options: BenchOptions,
    unit: dict[str, float],
    log: Callable[[str], None],
) -> list[Row]:
    """Sequential and Jacobi sampling on both engines (and the options row), against PyTorch sequential."""
    config = engines.model.config
    sequential = dataclasses.replace(guided, method="sequential")
    cases = [
        ("sequential sampling", "pytorch", sequential),
        ("jacobi sampling", "pytorch", guided),
        ("sequential sampling", "runtime", sequential),
        ("jacobi sampling", "runtime", guided),
    ]
    if options.options_row is not None:
        cases.append(("jacobi, options", "runtime", options.options_row))
    if engines.frames is not None:
        cases.append(("jacobi, no warm start", "runtime", dataclasses.replace(guided, warm_start=False)))
    # sequential sampling is 100s of times slower and deterministic: one run each; the Jacobi
    # rows are interleaved so that their ratio is measured under the same machine load
    log("sequential sampling ...")
    runs = {f"{e}/{n}": engines.sampler(e, inputs, s) for n, e, s in cases if s.method == "sequential"}
    measured = interleaved(runs, 1)
    log(f"jacobi sampling, {options.repeats} interleaved rounds ...")
    runs = {f"{e}/{n}": engines.sampler(e, inputs, s) for n, e, s in cases if s.method == "jacobi"}
    measured |= interleaved(runs, options.repeats, warmup=1)
    reference = measured["pytorch/sequential sampling"][1][0].numpy()
    side = config.latent_size // config.patch_size
    forward_work = side * side * (engines.frames or 1) * options.batch * sum(config.block_layers)
    rows = []
    for name, engine, _ in cases:
        seconds, (sample, stats) = measured[f"{engine}/{name}"]
        error = np.asarray(sample) - reference  # a CPU tensor or an array
        compute = sum(s.tokens * config.block_layers[s.block] for s in stats) / forward_work
        calls = sum(s.evaluations for s in stats)
        rows.append(
            Row(name, engine, seconds, seconds / unit[engine], calls, compute,
                float(np.abs(error).max()), float(np.sqrt(np.mean(error**2))))
        )  # fmt: skip
    return rows


def run_benches(
    options: BenchOptions,
    threads: tuple[int, ...] = DEFAULT_THREADS,
    json_out: Path | None = None,
    log: Callable[[str], None] = print,
    show: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """The whole bench at each thread count (every count checked first), each table shown as it
    is done; all results also to `json_out`."""
    runs = [dataclasses.replace(options, threads=count) for count in check_thread_counts(threads)]
    for run in runs:
        run.check()
    if json_out is not None:
        check_output_file(json_out, f"json {json_out}")
    results = []
    for run in runs:
        results.append(run_bench(run, log))
        show(format_table(results[-1]))
    if json_out is not None:
        save_text(json_out, json.dumps(results, indent=2) + "\n", f"json {json_out}")
    return results


def run_quality(
    artifacts: Path | None,
    per_digit: int,
    threads: tuple[int, ...] = DEFAULT_THREADS,
    json_out: Path | None = None,
) -> str:
    """Block calls and sample quality of the official settings and every calibrated preset of a
    digits export (default: the embedded one), at the largest thread count, as a table; also to
    `json_out`."""
    from starflow.apps.quality import format_quality, quality_bench

    threads = check_thread_counts(threads)
    if json_out is not None:
        check_output_file(json_out, f"json {json_out}")
    qualities, held_out = quality_bench(artifacts, per_digit, max(threads))
    if json_out is not None:
        document = {"held_out_accuracy": held_out, "settings": [dataclasses.asdict(q) for q in qualities]}
        save_text(json_out, json.dumps(document, indent=2) + "\n", f"json {json_out}")
    return format_quality(qualities, held_out)


def check_thread_counts(counts: tuple[int, ...]) -> tuple[int, ...]:
    """Distinct counts, each as `check_threads` wants it."""
    if not counts or len(set(counts)) != len(counts):
        raise StarflowError(f"threads: expected distinct counts, got {list(counts)}")
    for count in counts:
        check_threads(count)
    return counts


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"{'row':22} {'engine':8} {'seconds':>9} {'fwd units':>9} {'block calls':>11} "
        f"{'compute':>7} {'max|Δ| vs seq':>13} {'rms Δ':>9}"
    ]
    for r in result["rows"]:
        agree = "" if r["max_abs"] is None else f"{r['max_abs']:13.2e} {r['rms']:9.2e}"
        lines.append(
            f"{r['name']:22} {r['engine']:8} {r['seconds']:9.3f} {r['units']:9.2f} "
            f"{r['evaluations']:11d} {r['compute']:7.2f} {agree}"
        )
    lines.append(
        f"runtime Jacobi is {result['runtime_jacobi_speedup_vs_pytorch_jacobi']:.2f}x faster than "
        "PyTorch Jacobi "
        f"(block {result['jacobi']['block_size']}, threshold {result['jacobi']['threshold']}, "
        f"guidance {result['guidance']}, batch {result['batch']}"
        + (f" of {result['frames']}-frame clips" if result["frames"] else "")
        + f", {result['threads']} threads; "
        f"load average {result['load_average'][0]:.2f} -> {result['load_average'][1]:.2f} "
        f"on {result['cores']} cores)"
    )
    if result["options"]:
        lines.append(f"options row: {result['options']}")
    t = result["throughput"]
    if t:
        lines.append(
            f"batch {t['batch']} Jacobi throughput: PyTorch {t['pytorch_jacobi_images_per_s']:.2f} images/s, "
            f"runtime {t['runtime_jacobi_images_per_s']:.2f} images/s"
        )
    lines += textwrap.wrap(LEGEND, 110)
    return "\n".join(lines)
