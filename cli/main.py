"""Typer entry point for the `starflow` console script.

Each command parses its flags, builds one options object, and calls the library; the library
raises `StarflowError` for anything a user can fix, and `user_errors` alone turns that into a
one-line message and exit code 2. A command function is long only by its option declarations.
Module-level imports stay light (no torch, no model code), so `starflow --help` is instant.
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path
from typing import Annotated

import typer

from starflow.apps import bench as B  # its defaults and column legend (no torch at import)
from starflow.apps.generate import DEFAULT_CLIPS_OUT, DEFAULT_IMAGES_OUT
from starflow.cli.errors import user_errors
from starflow.cli.export import export_app
from starflow.cli.serve import serve
from starflow.core.request import (
    BACKENDS,
    DEFAULT_BACKEND,
    DEFAULT_ENGINE,
    DEFAULT_NUM_IMAGES,
    DEFAULT_PRECISION,
    DEFAULT_SEED,
    PRECISIONS,
    GenerateRequest,
)
from starflow.core.sampler import JacobiSettings
from starflow.core.sampling_presets import OFFICIAL

MODEL_FIELDS = ("artifacts", "checkpoint", "config", "text_encoder", "vae")  # ModelSource's
REQUEST_FIELDS = set(GenerateRequest.model_fields)
THREADS_HELP = "CPU threads, >= 1; default: every core."

app = typer.Typer(
    name="starflow",
    help="Export-and-deploy toolchain for Apple's STARFlow normalizing-flow model.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"starflow {version('starflow')}")
        raise typer.Exit()


@app.callback()
def main(
    version_: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """STARFlow reference model, export and runtime tools."""


SAMPLING = dict(rich_help_panel="Sampling")
MODEL = dict(rich_help_panel="Model (the caller's files, never part of a request)")
BULK = dict(rich_help_panel="Bulk generation (a prompts file)")


@app.command()
def generate(
    prompt: Annotated[
        list[str] | None, typer.Option(help='Prompt (repeatable); "" is the unconditional one.')
    ] = None,
    num_images: Annotated[
        int | None, typer.Option(help=f"Images per prompt; default {DEFAULT_NUM_IMAGES}.")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help=f"Seed of the noise (numpy PCG64), >= 0; default {DEFAULT_SEED}.")
    ] = None,
    negative_prompt: Annotated[
        str | None, typer.Option(help='Unconditional text of the guidance ("").')
    ] = None,
    aspect_ratio: Annotated[
        str | None, typer.Option(help="Bucket W:H, e.g. 16:9 (area of the training size).")
    ] = None,
    size: Annotated[str | None, typer.Option(help="Image size HxW in pixels.")] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help=f"Images: a grid .png (default {DEFAULT_IMAGES_OUT}), a .npy (N, H, W, C) float32 in "
            f"[0, 1], or a folder of PNGs. Clips: a .gif (default {DEFAULT_CLIPS_OUT}), an .mp4, a .npy "
            "(N, T, H, W, C) uint8, or a folder of PNG frames."
        ),
    ] = None,
    frames: Annotated[
        int | None, typer.Option(help="Clips of this many frames (a video model; default: moving digits).")
    ] = None,
    fps: Annotated[float | None, typer.Option(help="Clips: frames per second; default the export's.")] = None,
    engine: Annotated[
        str | None,
        typer.Option(
            help=f"runtime (an export, no torch) or pytorch (the reference model); default {DEFAULT_ENGINE}."
        ),
    ] = None,
    artifacts: Annotated[
        Path | None,
        typer.Option(
            help="runtime: an export directory; default: the embedded model (exported once).", **MODEL
        ),
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="pytorch: a checkpoint; default: the embedded digits model.", **MODEL)
    ] = None,
    config: Annotated[
        str | None, typer.Option(help="pytorch: a preset or the YAML config of an official .pth.", **MODEL)
    ] = None,
    text_encoder: Annotated[
        Path | None, typer.Option(help="pytorch: a local Hugging Face encoder.", **MODEL)
    ] = None,
    vae: Annotated[
        Path | None, typer.Option(help="pytorch: a local diffusers AutoencoderKL.", **MODEL)
    ] = None,
    backend: Annotated[
        str | None,
        typer.Option(help=f"runtime: {' or '.join(BACKENDS)} (flow blocks); default {DEFAULT_BACKEND}."),
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option(help=f"runtime: {' or '.join(PRECISIONS)} flow graphs; default {DEFAULT_PRECISION}."),
    ] = None,
    threads: Annotated[int | None, typer.Option(help=THREADS_HELP)] = None,
    sampler: Annotated[
        str | None,
        typer.Option(
            help=f"{OFFICIAL} (the model's settings, default) or a calibrated preset, e.g. fast.", **SAMPLING
        ),
    ] = None,
    guidance: Annotated[
        float | None, typer.Option(help="CFG weight; default: the model's.", **SAMPLING)
    ] = None,
    method: Annotated[
        str | None, typer.Option(help="jacobi or sequential; default: the model's.", **SAMPLING)
    ] = None,
    jacobi_block_size: Annotated[int | None, typer.Option(help="Default: the model's.", **SAMPLING)] = None,
    jacobi_max_iter: Annotated[int | None, typer.Option(help="Default: the model's.", **SAMPLING)] = None,
    jacobi_threshold: Annotated[float | None, typer.Option(help="Default: the model's.", **SAMPLING)] = None,
    jacobi_stop: Annotated[
        str | None,
        typer.Option(
            help="batch (official, default) or row: each image stops alone, as a server.", **SAMPLING
        ),
    ] = None,
    denoise: Annotated[
        bool | None, typer.Option(help="The self-denoise step after the flow; default on.", **SAMPLING)
    ] = None,
    check_finite: Annotated[
        bool | None,
        typer.Option(help="Fail (writing nothing) when a sample holds NaN or inf; default on.", **SAMPLING),
    ] = None,
    prompts_file: Annotated[
        Path | None,
        typer.Option(help="One prompt per line; prompt i from seed --seed + i. --out: a folder.", **BULK),
    ] = None,
    ray: Annotated[
        str | None, typer.Option(help="local (start Ray here), auto, HOST:PORT or ray://HOST:PORT.", **BULK)
    ] = None,
    shard_size: Annotated[int | None, typer.Option(help="Prompts per shard; default 16.", **BULK)] = None,
    format: Annotated[str | None, typer.Option(help="png or npy (clips: gif or npy).", **BULK)] = None,
) -> None:
    """Images (or clips, with --frames) from prompts: through an export (the torch-free runtime) or
    the PyTorch reference. Every option and path is checked before the engine loads. With
    --prompts-file: shards of images in --out, resumable, here or over a Ray cluster (--ray)."""
    fields = dict(locals())
    from starflow.apps.generate import generate as run_generate
    from starflow.cli.progress import block_bars, step_lines
    from starflow.core.request import ModelSource, request

    bulk = {name: fields.pop(name) for name in ("prompts_file", "ray", "shard_size", "format")}
    source = ModelSource(**{name: fields.pop(name) for name in MODEL_FIELDS})
    given = {name: value for name, value in fields.items() if value is not None and name in REQUEST_FIELDS}
    if any(value is not None for value in bulk.values()):
        from starflow.serving.bulk import INTERRUPTED, run_bulk

        with user_errors(INTERRUPTED):
            shards = run_bulk(
                given | {"prompts": prompt}, source, out, **bulk, log=lambda line: typer.echo(line, err=True)
            )
        typer.echo("\n".join(shards.lines()))
        return
    with user_errors():
        result = run_generate(
            request(**given, prompts=prompt or []), source, out, export_progress=step_lines("export: "),
            bars=block_bars, log=lambda line: typer.echo(line, err=True),
        )  # fmt: skip
    typer.echo("\n".join(result.lines()))


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="The grid PNG to write.")] = Path("starflow-demo.png"),
    video_out: Annotated[
        Path | None,
        typer.Option(help="A .gif or .mp4 of one clip of each digit (the embedded video model)."),
    ] = Path("starflow-demo.gif"),
    video: Annotated[bool, typer.Option(help="Also the video model's clips.")] = True,
    pytorch: Annotated[
        bool, typer.Option(help="Also time the PyTorch reference (--no-pytorch: the runtime alone, fast).")
    ] = True,
    per_digit: Annotated[int, typer.Option(help="Samples of each digit (grid rows).")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the noise, >= 0.")] = 0,
    threads: Annotated[int | None, typer.Option(help=f"{THREADS_HELP} Both engines.")] = None,
) -> None:
    """Export the embedded digits model, draw 0-9 through the runtime, time it against PyTorch;
    then a clip of each digit from the embedded moving-digits video model."""
    from starflow.apps.demo import run_demo
    from starflow.cli.progress import step_lines

    with user_errors("interrupted: files reported written before stay; none is half-written"):
        result = run_demo(
            out, per_digit, seed, threads, export_progress=step_lines("export: "),
            video_out=video_out if video else None, video_export_progress=step_lines("export (video): "),
            pytorch=pytorch,
        )  # fmt: skip
    typer.echo("\n".join(result.lines()))


@app.command()
def train(
    config: Annotated[str, typer.Option(help="Preset name or YAML config path.")],
    data: Annotated[
        str, typer.Option(help="'digits' (embedded), a folder of class sub-folders, or of latent shards.")
    ] = "digits",
    out: Annotated[
        str, typer.Option(help="Run folder: checkpoints/, samples/, metrics.jsonl.")
    ] = "runs/digits",
    steps: Annotated[int, typer.Option(min=1)] = 1000,
    batch_size: Annotated[int, typer.Option(min=1, help="Global batch, split over processes.")] = 64,
    lr: Annotated[float, typer.Option(min=0.0)] = 1e-3,
    min_lr: Annotated[float, typer.Option(min=0.0, help="Cosine floor.")] = 1e-6,
    warmup: Annotated[int, typer.Option(min=0)] = 100,
    weight_decay: Annotated[float, typer.Option(min=0.0)] = 1e-4,
    grad_clip: Annotated[float, typer.Option(min=0.0)] = 1.0,
    drop_label: Annotated[float, typer.Option(help="Condition dropout for CFG.")] = 0.1,
    latent_reg: Annotated[float, typer.Option(min=0.0, help="Weight of the latent-norm regulariser.")] = 1e-4,
    ema_decay: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.999,
    seed: int = 0,
    nproc: Annotated[int, typer.Option(help="Worker processes to spawn (1 under torchrun).")] = 1,
    device: Annotated[str, typer.Option(help="auto (cuda when available), cpu or cuda.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU), fp32 or bf16.")] = "auto",
    activation_checkpointing: bool = False,
    checkpoint_every: Annotated[int, typer.Option(min=1)] = 500,
    sample_every: Annotated[int, typer.Option(min=0, help="Sample grid PNG every N steps (0: never).")] = 500,
    log_every: Annotated[int, typer.Option(min=1)] = 10,
    resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint in --out.")] = False,
    threads: Annotated[int | None, typer.Option(help=f"{THREADS_HELP} Per process.")] = None,
    progress: bool = True,
    export_ema: Annotated[bool, typer.Option(help="Export EMA weights (else the raw weights).")] = True,
) -> None:
    """Train with FSDP2 (single process, --nproc N, or under torchrun); exports OUT/model.safetensors."""
    from starflow.core.errors import StarflowError
    from starflow.core.limits import check_threads
    from starflow.core.request import ModelSource

    with user_errors():  # the paths, before torch loads
        check_threads(threads)
        ModelSource(config=config).check("pytorch")
        if data != "digits" and not Path(data).is_dir():
            raise StarflowError(f"dataset {data}: no such folder")
    from starflow.training.train import TrainOptions
    from starflow.training.train import train as run_training

    given = {k: v for k, v in locals().items() if k in TrainOptions.__dataclass_fields__}
    with user_errors("interrupted: the checkpoints already saved in --out stay (continue with --resume)"):
        path = run_training(
            TrainOptions(**{**given, "threads": threads or 0})
        )  # 0: torch's default, all cores
    typer.echo(f"exported {path}")


checkpoint_app = typer.Typer(help="Training checkpoints.", no_args_is_help=True)
app.add_typer(checkpoint_app, name="checkpoint")
app.add_typer(export_app, name="export")
app.command("serve")(serve)


@checkpoint_app.command()
def consolidate(
    checkpoint: Annotated[
        Path, typer.Argument(help="A sharded checkpoint folder (runs/x/checkpoints/step_N).")
    ],
    out: Annotated[Path, typer.Option(help="Output .safetensors (labels go to .labels.safetensors).")],
    ema: Annotated[bool, typer.Option(help="EMA weights (default) or the raw training weights.")] = True,
) -> None:
    """Merge a sharded training checkpoint into one .safetensors with the config embedded."""
    from starflow.core.errors import StarflowError

    with user_errors():  # before torch loads
        if not checkpoint.is_dir():
            raise StarflowError(f"checkpoint {checkpoint}: no such folder (a runs/NAME/checkpoints/step_N)")
    from starflow.training.train import consolidate as run_consolidate

    with user_errors():
        path = run_consolidate(checkpoint, out, ema=ema)
    typer.echo(f"wrote {path}")


@app.command("validate")
def validate(
    directory: Annotated[Path, typer.Argument(help="An export directory (holds manifest.json).")],
    checkpoint: Annotated[Path, typer.Option(help="The checkpoint the directory was exported from.")],
    config: Annotated[str | None, typer.Option(help="YAML config; default: the manifest's model.")] = None,
) -> None:
    """Rerun the export's validation: every graph against PyTorch through ONNX Runtime."""
    from starflow.core.request import ModelSource

    with user_errors():  # both paths, before torch and onnx load
        ModelSource(artifacts=directory).check("runtime")
        ModelSource(checkpoint=checkpoint, config=config).check("pytorch")
    from starflow.export.validate import describe_results, validate_directory

    with user_errors():
        typer.echo(describe_results(validate_directory(directory, checkpoint, config)))


@app.command("inspect")
def inspect(
    directory: Annotated[Path, typer.Argument(help="An export directory (holds manifest.json).")],
) -> None:
    """Print a summary of an export: blocks, graphs, dims, precisions, validation; fails on a
    broken export (a missing or tampered file, one outside the directory, an edited manifest)."""
    from starflow.contract.manifest import Manifest

    with user_errors():
        manifest = Manifest.load(directory, verify_files=False)
        typer.echo(manifest.summary())
        manifest.verify_files(directory)  # a missing, tampered or outside file: exit code 2


@app.command("bench", epilog=f"Columns: {B.LEGEND}")
def bench(
    preset: Annotated[
        str | None,
        typer.Option(help=f"Model preset with seeded, perturbed random weights; default {B.DEFAULT_PRESET}."),
    ] = None,
    artifacts: Annotated[
        Path | None, typer.Option(help="Bench this export instead (needs --checkpoint).")
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="The checkpoint --artifacts was exported from.")
    ] = None,
    guidance: Annotated[float | None, typer.Option(help=f"Default {B.DEFAULT_GUIDANCE:g}.")] = None,
    batch: Annotated[int | None, typer.Option(help="Images per sampling row; default 1.")] = None,
    jacobi_block_size: Annotated[int | None, typer.Option(help=f"Default {B.DEFAULT_BLOCK_SIZE}.")] = None,
    jacobi_threshold: Annotated[
        float | None, typer.Option(help=f"Default {JacobiSettings.threshold:g}.")
    ] = None,
    jacobi_max_iter: Annotated[int | None, typer.Option(help=f"Default {JacobiSettings.max_iter}.")] = None,
    jacobi_init: Annotated[
        str | None, typer.Option(help="Options row: first guess of each chunk, noise or chunk-mean.")
    ] = None,
    shallow_block_size: Annotated[
        int | None, typer.Option(help="Options row: shallow blocks' chunk.")
    ] = None,
    shallow_threshold: Annotated[
        float | None, typer.Option(help="Options row: shallow blocks' threshold.")
    ] = None,
    throughput_batch: Annotated[
        int | None,
        typer.Option(help=f"Batch of the throughput row; 0 skips it; default {B.DEFAULT_THROUGHPUT_BATCH}."),
    ] = None,
    frames: Annotated[
        int | None,
        typer.Option(help=f"Video presets (bench-video): frames per clip; default {B.DEFAULT_FRAMES}."),
    ] = None,
    repeats: Annotated[
        int | None,
        typer.Option(help=f"Timed runs per Jacobi/forward row (median); default {B.DEFAULT_REPEATS}."),
    ] = None,
    threads: Annotated[
        str | None,
        typer.Option(
            help="CPU thread counts (each >= 1), comma-separated: the whole bench runs at each; default "
            + ",".join(map(str, B.DEFAULT_THREADS))
            + "."
        ),
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the results as JSON.")] = None,
    quality: Annotated[
        bool,
        typer.Option(
            help="Instead: block calls and sample quality (classifier accuracy, diversity) of the "
            "official settings and every calibrated preset of a digits export (default: the embedded one)."
        ),
    ] = False,
    per_digit: Annotated[int, typer.Option(help="--quality: samples of each digit per setting.")] = 20,
) -> None:
    """PyTorch reference vs runtime, side by side: forward pass, sequential and Jacobi sampling.

    --jacobi-init or a --shallow-* option adds one runtime row sampled with them. --quality
    measures what the sampling presets cost and give instead. The columns are explained under
    the table and below.
    """
    from starflow.apps.bench import BenchOptions, run_benches, run_quality
    from starflow.cli.parse import parse_threads

    with user_errors("interrupted: no results written"):
        counts = B.DEFAULT_THREADS if threads is None else parse_threads(threads)
        if quality:
            typer.echo(run_quality(artifacts, per_digit, counts, json_out))
            return
        options = BenchOptions.from_settings(
            guidance, jacobi_block_size, jacobi_max_iter, jacobi_threshold, jacobi_init, shallow_block_size,
            shallow_threshold, preset=preset, artifacts=artifacts, checkpoint=checkpoint, batch=batch,
            throughput_batch=throughput_batch, repeats=repeats, frames=frames,
        )  # fmt: skip
        run_benches(options, counts, json_out, log=lambda line: typer.echo(line, err=True), show=typer.echo)
