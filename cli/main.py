"""Typer entry point for the `starflow` console script.

Each command parses its flags, builds one options object, and calls the library; the library
raises `StarflowError` for anything a user can fix, and `user_errors` alone turns that into a
one-line message and exit code 2. A command function is long only by its option declarations.
Module-level imports stay light (no torch, no model code), so `starflow --help` is instant.
"""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path
from typing import Annotated

import typer

from starflow.cli.errors import user_errors
from starflow.cli.export import export_app

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


@app.command()
def generate(
    prompt: Annotated[
        list[str] | None, typer.Option(help='Prompt (repeatable); "" is the unconditional one.')
    ] = None,
    num_images: Annotated[int, typer.Option(help="Images per prompt.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the noise (numpy PCG64), >= 0.")] = 0,
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
            help="Images: a grid .png (default starflow-generate.png), a .npy (N, H, W, C) float32 in "
            "[0, 1], or a folder of PNGs. Clips: a .gif (default starflow-generate.gif), an .mp4, a .npy "
            "(N, T, H, W, C) uint8, or a folder of PNG frames."
        ),
    ] = None,
    frames: Annotated[
        int | None,
        typer.Option(help="Clips of this many frames (a video model; default: moving digits).", min=1),
    ] = None,
    fps: Annotated[float | None, typer.Option(help="Clips: frames per second; default the export's.")] = None,
    engine: Annotated[
        str, typer.Option(help="runtime (an export, no torch) or pytorch (the reference model).")
    ] = "runtime",
    artifacts: Annotated[
        Path | None,
        typer.Option(help="runtime: an export directory; default: the embedded model (exported once)."),
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="pytorch: a checkpoint; default: the embedded digits model.")
    ] = None,
    config: Annotated[str | None, typer.Option(help="pytorch: the YAML config of an official .pth.")] = None,
    text_encoder: Annotated[Path | None, typer.Option(help="pytorch: a local Hugging Face encoder.")] = None,
    vae: Annotated[Path | None, typer.Option(help="pytorch: a local diffusers AutoencoderKL.")] = None,
    backend: Annotated[
        str, typer.Option(help="runtime: onnxruntime or tensorrt (flow blocks).")
    ] = "onnxruntime",
    precision: Annotated[str, typer.Option(help="runtime: fp32 or fp16 flow graphs.")] = "fp32",
    threads: Annotated[int | None, typer.Option(help="CPU threads.")] = None,
    sampler: Annotated[
        str,
        typer.Option(help="official (the model's settings) or a calibrated preset, e.g. fast.", **SAMPLING),
    ] = "official",
    guidance: Annotated[
        float | None, typer.Option(help="CFG weight; default: the model's.", **SAMPLING)
    ] = None,
    method: Annotated[str | None, typer.Option(help="jacobi (default) or sequential.", **SAMPLING)] = None,
    jacobi_block_size: Annotated[int | None, typer.Option(help="Default: the model's.", **SAMPLING)] = None,
    jacobi_max_iter: Annotated[int | None, typer.Option(help="Default: the model's.", **SAMPLING)] = None,
    jacobi_threshold: Annotated[float | None, typer.Option(help="Default: the model's.", **SAMPLING)] = None,
    denoise: Annotated[bool, typer.Option(help="The self-denoise step after the flow.", **SAMPLING)] = True,
    check_finite: Annotated[
        bool, typer.Option(help="Fail (writing nothing) when a sample holds NaN or inf.", **SAMPLING)
    ] = True,
) -> None:
    """Images (or clips, with --frames) from prompts: through an export (the torch-free runtime) or
    the PyTorch reference."""
    import numpy as np

    from starflow.cli.generate import open_generator, progress_bars
    from starflow.cli.parse import parse_hw
    from starflow.core.errors import StarflowError
    from starflow.core.generation import check_request
    from starflow.core.outputs import output_kind, save_images, video_output_kind, write_video
    from starflow.core.sampler import with_overrides

    clips = frames is not None
    out = out or Path("starflow-generate.gif" if clips else "starflow-generate.png")
    with user_errors():
        # a bad or unwritable --out, a bad count, seed or fps fail before any work
        video_output_kind(out) if clips else output_kind(out)
        check_request(prompt or [], num_images, seed)
        if fps is not None and not clips:
            raise StarflowError("--fps: a clip option; pass --frames N too")
        if fps is not None and not 0 < fps < float("inf"):
            raise StarflowError(f"--fps: must be a number > 0, got {fps}")
        generator = open_generator(
            engine, artifacts=artifacts, checkpoint=checkpoint, config=config, text_encoder=text_encoder,
            vae=vae, backend=backend, precision=precision, threads=threads, video=clips,
        )  # fmt: skip
        sampling = with_overrides(
            generator.sampling(sampler), guidance=guidance, method=method, block_size=jacobi_block_size,
            max_iter=jacobi_max_iter, threshold=jacobi_threshold,
        )  # fmt: skip
        pixels = parse_hw(size, "--size", "image pixels", "256x384") if size else None
        latent_size = generator.latent_size(aspect_ratio, pixels)
        prompts = prompt or []
        frame_tokens = latent_size[0] * latent_size[1] // generator.multiple_of**2 if clips else None
        with progress_bars(generator, len(prompts) * num_images, sampling, frame_tokens) as report:
            result = generator.generate(
                prompts, num_images=num_images, negative_prompt=negative_prompt, seed=seed,
                latent_size=latent_size, sampling=sampling, denoise=denoise, progress=report,
                check_finite=check_finite, frames=frames,
            )  # fmt: skip
        if clips:
            video = np.round(result.images * 255).astype(np.uint8)
            files = write_video(video, out, fps or generator.fps, columns=min(num_images, 8))
        else:
            files = save_images(out, result.images, columns=min(num_images, 8), prompts=result.prompts)
    h, w = result.images.shape[-3:-1]
    where = out if len(files) == 1 else f"{out}/ ({len(files)} PNGs)"
    what = f"clips of {frames} frames" if clips else "images"
    typer.echo(
        f"generated {len(result.images)} {what} {h}x{w} with the {engine} engine ({sampler} sampler, "
        f"{sampling.method}, "
        f"guidance "
        f"{sampling.guidance:g}, seed {seed}) -> {where}\n{result.summary()}"
    )


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="The grid PNG to write.")] = Path("starflow-demo.png"),
    video_out: Annotated[
        Path | None,
        typer.Option(help="A .gif or .mp4 of one clip of each digit (the embedded video model)."),
    ] = Path("starflow-demo.gif"),
    video: Annotated[bool, typer.Option(help="Also the video model's clips.")] = True,
    per_digit: Annotated[int, typer.Option(help="Samples of each digit (grid rows).")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the noise, >= 0.")] = 0,
    threads: Annotated[int | None, typer.Option(help="CPU threads for both engines.")] = None,
) -> None:
    """Export the embedded digits model, draw 0-9 through the runtime, time it against PyTorch;
    then a clip of each digit from the embedded moving-digits video model."""
    from starflow.apps.demo import run_demo
    from starflow.cli.progress import step_lines

    with user_errors():
        result = run_demo(
            out, per_digit, seed, threads, export_progress=step_lines("export: "),
            video_out=video_out if video else None, video_export_progress=step_lines("export (video): "),
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
    threads: Annotated[int, typer.Option(min=0, help="Torch threads per process (0: default).")] = 0,
    progress: bool = True,
    export_ema: Annotated[bool, typer.Option(help="Export EMA weights (else the raw weights).")] = True,
) -> None:
    """Train with FSDP2 (single process, --nproc N, or under torchrun); exports OUT/model.safetensors."""
    from starflow.training.train import TrainOptions
    from starflow.training.train import train as run_training

    options = TrainOptions(**{k: v for k, v in locals().items() if k in TrainOptions.__dataclass_fields__})
    with user_errors():
        path = run_training(options)
    typer.echo(f"exported {path}")


checkpoint_app = typer.Typer(help="Training checkpoints.", no_args_is_help=True)
app.add_typer(checkpoint_app, name="checkpoint")
app.add_typer(export_app, name="export")


@checkpoint_app.command()
def consolidate(
    checkpoint: Annotated[
        Path, typer.Argument(help="A sharded checkpoint folder (runs/x/checkpoints/step_N).")
    ],
    out: Annotated[Path, typer.Option(help="Output .safetensors (labels go to .labels.safetensors).")],
    ema: Annotated[bool, typer.Option(help="EMA weights (default) or the raw training weights.")] = True,
) -> None:
    """Merge a sharded training checkpoint into one .safetensors with the config embedded."""
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


@app.command("bench")
def bench(
    preset: Annotated[
        str, typer.Option(help="Model preset with seeded, perturbed random weights.")
    ] = "bench-256",
    artifacts: Annotated[
        Path | None, typer.Option(help="Bench this export instead (needs --checkpoint).")
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="The checkpoint --artifacts was exported from.")
    ] = None,
    guidance: float = 2.0,
    batch: int = 1,
    jacobi_block_size: int = 64,
    jacobi_threshold: float = 1e-3,
    jacobi_max_iter: int = 32,
    jacobi_init: Annotated[
        str | None, typer.Option(help="Options row: first guess of each chunk, noise or chunk-mean.")
    ] = None,
    shallow_block_size: Annotated[
        int | None, typer.Option(help="Options row: shallow blocks' chunk.")
    ] = None,
    shallow_threshold: Annotated[
        float | None, typer.Option(help="Options row: shallow blocks' threshold.")
    ] = None,
    throughput_batch: Annotated[int, typer.Option(help="Batch of the throughput row; 0 skips it.")] = 8,
    frames: Annotated[
        int | None, typer.Option(help="Video presets (bench-video): frames per clip (default 8).")
    ] = None,
    repeats: Annotated[int, typer.Option(help="Timed runs per Jacobi/forward row (median).")] = 3,
    threads: Annotated[
        str, typer.Option(help="CPU thread counts, comma-separated: the whole bench runs at each.")
    ] = "1,2",
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
    measures what the sampling presets cost and give instead.
    """
    from dataclasses import asdict, replace

    from starflow.apps.bench import BenchOptions, format_table, run_bench
    from starflow.cli.parse import parse_threads
    from starflow.core.outputs import check_writable, save_text
    from starflow.core.sampler import JacobiSettings, SampleOptions

    with user_errors():
        jacobi = JacobiSettings(jacobi_block_size, jacobi_max_iter, jacobi_threshold)
        sampling = SampleOptions(guidance, "jacobi", jacobi)
        row = None  # the options row: the first guess everywhere, the shallow blocks' own chunking
        if jacobi_init is not None or shallow_block_size is not None or shallow_threshold is not None:
            first_guess = replace(jacobi, init=jacobi_init or "noise")
            shallow = replace(
                first_guess,
                block_size=shallow_block_size or jacobi_block_size,
                threshold=jacobi_threshold if shallow_threshold is None else shallow_threshold,
            )
            row = SampleOptions(guidance, "jacobi", first_guess, shallow)
        counts = parse_threads(threads)
        if json_out is not None:
            check_writable(json_out.parent, f"--json {json_out}")
        if quality:
            from starflow.apps.quality import format_quality, quality_bench

            qualities, held_out = quality_bench(artifacts, per_digit, max(counts))
            typer.echo(format_quality(qualities, held_out))
            if json_out is not None:
                document = {"held_out_accuracy": held_out, "settings": [asdict(q) for q in qualities]}
                save_text(json_out, json.dumps(document, indent=2) + "\n")
            return
        options = BenchOptions(
            preset, artifacts, checkpoint, batch, sampling, row, throughput_batch, repeats, frames=frames
        )
        for count in counts:
            replace(options, threads=count).check()
        results = []
        for count in counts:
            results.append(
                run_bench(replace(options, threads=count), log=lambda line: typer.echo(line, err=True))
            )
            typer.echo(format_table(results[-1]))
        if json_out is not None:
            save_text(json_out, json.dumps(results, indent=2) + "\n")
