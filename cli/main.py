"""Typer entry point for the `starflow` console script.

Keep module-level imports light (no torch, no starflow model code) so that
`starflow --help` is instant; import heavy modules inside command functions.
"""

import contextlib
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Annotated

import typer

from starflow.errors import StarflowError

app = typer.Typer(
    name="starflow",
    help="Export-and-deploy toolchain for Apple's STARFlow normalizing-flow model.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"starflow {version('starflow')}")
        raise typer.Exit()


@app.callback()
def main(
    version_: bool = typer.Option(
        False,
        "--version",
        callback=_version_callback,
        is_eager=True,
        help="Show the version and exit.",
    ),
) -> None:
    """STARFlow reference model, export and runtime tools."""


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """The one place where a StarflowError becomes a red one-line message and exit code 2."""
    try:
        yield
    except StarflowError as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(code=2) from None


@app.command()
def sample(
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="Our .safetensors (+ .labels.safetensors beside it); default: the embedded digits model."
        ),
    ] = None,
    prompt: Annotated[str, typer.Option(help='Class to draw; for the digits model "0" to "9".')] = "7",
    num_images: Annotated[int, typer.Option(min=1, help="How many images to sample.")] = 16,
    seed: Annotated[int, typer.Option(help="Seed of the noise.")] = 0,
    guidance: Annotated[
        float | None, typer.Option(min=0.0, help="CFG weight; default: the checkpoint config's cfg.")
    ] = None,
    method: Annotated[str, typer.Option(help="jacobi or sequential.")] = "jacobi",
    jacobi_block_size: Annotated[int, typer.Option(min=1)] = 16,
    jacobi_max_iter: Annotated[int, typer.Option(min=1)] = 32,
    jacobi_threshold: Annotated[float, typer.Option(min=0.0)] = 1e-3,
    denoise: Annotated[bool, typer.Option(help="One self-denoising (Tweedie) step after the flow.")] = True,
    config: Annotated[
        str | None, typer.Option(help="Preset or YAML overriding the checkpoint's embedded config.")
    ] = None,
    out: Annotated[Path, typer.Option(help=".png grid, or .npy float32 (N, H, W, C) in [0, 1].")] = Path(
        "starflow-demo.png"
    ),
) -> None:
    """Sample images of one class with the PyTorch reference model."""
    from starflow.sampling import sample_report

    with user_errors():
        report = sample_report(
            checkpoint=checkpoint,
            config=config,
            prompt=prompt,
            num_images=num_images,
            seed=seed,
            guidance=guidance,
            method=method,
            jacobi_block_size=jacobi_block_size,
            jacobi_max_iter=jacobi_max_iter,
            jacobi_threshold=jacobi_threshold,
            denoise=denoise,
            out=out,
        )
    for line in report:
        typer.echo(line)


@app.command()
def generate(
    prompt: Annotated[
        list[str] | None, typer.Option(help='Prompt (repeatable); "" is the unconditional prompt.')
    ] = None,
    artifacts: Annotated[
        Path | None,
        typer.Option(help="An export directory; default: the embedded demo model (exported on first use)."),
    ] = None,
    negative_prompt: Annotated[
        str | None, typer.Option(help='Unconditional text of the guidance (default "").')
    ] = None,
    guidance: Annotated[float | None, typer.Option(help="CFG weight; default: the manifest's.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the noise (numpy PCG64).")] = 0,
    num_images: Annotated[int, typer.Option(help="Images per prompt.")] = 1,
    aspect_ratio: Annotated[
        str | None, typer.Option(help="Bucket W:H, e.g. 16:9 (area near the training resolution).")
    ] = None,
    size: Annotated[str | None, typer.Option(help="Image size HxW in pixels.")] = None,
    method: Annotated[str, typer.Option(help="jacobi or sequential.")] = "jacobi",
    jacobi_block_size: Annotated[int | None, typer.Option(help="Default: the manifest's.")] = None,
    jacobi_max_iter: Annotated[int | None, typer.Option(help="Default: the manifest's.")] = None,
    jacobi_threshold: Annotated[float | None, typer.Option(help="Default: the manifest's.")] = None,
    denoise: Annotated[bool, typer.Option(help="The self-denoise step after the flow.")] = True,
    backend: Annotated[str, typer.Option(help="onnxruntime or tensorrt (flow blocks).")] = "onnxruntime",
    precision: Annotated[str, typer.Option(help="fp32 or fp16 flow graphs.")] = "fp32",
    threads: Annotated[int | None, typer.Option(help="CPU threads per session.")] = None,
    out: Annotated[
        Path, typer.Option(help="grid .png, .npy (N, H, W, C) float32 in [0, 1], or a folder of PNGs.")
    ] = Path("starflow-generate.png"),
) -> None:
    """Images from prompts through the standalone runtime (text encoder, flow, denoise, decoder)."""
    from starflow.cli.generate import generate_command

    with user_errors():
        generate_command(
            artifacts=artifacts,
            prompts=prompt or [],
            negative_prompt=negative_prompt,
            guidance=guidance,
            seed=seed,
            num_images=num_images,
            aspect_ratio=aspect_ratio,
            size=size,
            method=method,
            jacobi_block_size=jacobi_block_size,
            jacobi_max_iter=jacobi_max_iter,
            jacobi_threshold=jacobi_threshold,
            denoise=denoise,
            backend=backend,
            precision=precision,
            threads=threads,
            out=out,
            echo=typer.echo,
        )


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="The grid PNG to write.")] = Path("starflow-demo.png"),
    per_digit: Annotated[int, typer.Option(help="Samples of each digit (grid rows).")] = 4,
    seed: int = 0,
    threads: Annotated[int | None, typer.Option(help="CPU threads for both engines.")] = None,
) -> None:
    """Export the embedded digits model, draw 0-9 through the runtime, time it against PyTorch."""
    from starflow.cli.generate import demo_command

    with user_errors():
        demo_command(out=out, per_digit=per_digit, seed=seed, threads=threads, echo=typer.echo)


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
    from starflow.train import TrainOptions
    from starflow.train import train as run_training

    options = TrainOptions(**{k: v for k, v in locals().items() if k in TrainOptions.__dataclass_fields__})
    with user_errors():
        path = run_training(options)
    typer.echo(f"exported {path}")


checkpoint_app = typer.Typer(help="Training checkpoints.", no_args_is_help=True)
app.add_typer(checkpoint_app, name="checkpoint")


@checkpoint_app.command()
def consolidate(
    checkpoint: Annotated[
        Path, typer.Argument(help="A sharded checkpoint folder (runs/x/checkpoints/step_N).")
    ],
    out: Annotated[Path, typer.Option(help="Output .safetensors (labels go to .labels.safetensors).")],
    ema: Annotated[bool, typer.Option(help="EMA weights (default) or the raw training weights.")] = True,
) -> None:
    """Merge a sharded training checkpoint into one .safetensors with the config embedded."""
    from starflow.train import consolidate as run_consolidate

    with user_errors():
        path = run_consolidate(checkpoint, out, ema=ema)
    typer.echo(f"wrote {path}")


# ---- export / validate / inspect (bodies live in starflow.export) ---------------------------------
export_app = typer.Typer(help="Export a checkpoint to deployable artifacts.", no_args_is_help=True)
app.add_typer(export_app, name="export")


@export_app.command("onnx")
def export_onnx(
    checkpoint: Annotated[Path, typer.Option(help="Official .pth (with --config) or our .safetensors.")],
    out: Annotated[Path, typer.Option(help="Directory to write the graphs and manifest.json into.")],
    config: Annotated[
        str | None, typer.Option(help="YAML config or preset name; default: the one in the .safetensors.")
    ] = None,
    precision: Annotated[str, typer.Option(help="fp32, fp16 or both (one directory).")] = "both",
    opset: Annotated[
        int | None, typer.Option(help="ONNX opset, 18..23 (default 20; 23 with --precision fp32 only).")
    ] = None,
    max_batch: Annotated[int, typer.Option(help="Most images per call; graphs allow twice that (CFG).")] = 8,
    min_latent: Annotated[
        str | None, typer.Option(help="Smallest latent HxW (latent pixels); default half the training side.")
    ] = None,
    max_latent: Annotated[
        str | None, typer.Option(help="Largest latent HxW (latent pixels); default twice the training side.")
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Replace a non-empty --out that holds no starflow export.")
    ] = False,
    validate: Annotated[bool, typer.Option(help="Compare every graph with PyTorch; a miss fails.")] = True,
    text_encoder: Annotated[
        Path | None,
        typer.Option(
            help="Local Hugging Face encoder directory (e.g. a copy of google/flan-t5-xl) to export "
            "with its tokenizer; class-conditional checkpoints export their label table by default."
        ),
    ] = None,
    vae: Annotated[
        Path | None,
        typer.Option(help="Local diffusers AutoencoderKL directory (e.g. sd-vae-ft-ema): its decoder."),
    ] = None,
    denoise: Annotated[
        bool, typer.Option(help="Export the self-denoise graph (gradient of the flow's NLL).")
    ] = True,
) -> None:
    """Export every flow block to ONNX (step, prefill, forward graphs) and the pipeline components."""
    from rich.progress import Progress

    from starflow.export.onnx_export import export_command

    with Progress(transient=True) as bar:
        task = bar.add_task("export", total=None)

        def report(what: str, done: int, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total)

        with user_errors():
            summary = export_command(
                checkpoint=checkpoint,
                out=out,
                config=config,
                precision=precision,
                opset=opset,
                max_batch=max_batch,
                min_latent=min_latent,
                max_latent=max_latent,
                force=force,
                validate=validate,
                progress=report,
                text_encoder=text_encoder,
                vae=vae,
                denoise=denoise,
            )
    typer.echo(summary)


@export_app.command("trt")
def export_trt(
    directory: Annotated[Path, typer.Argument(help="An export directory (holds manifest.json).")],
    builder: Annotated[
        str,
        typer.Option(help="auto (tensorrt when importable, else tensorrt-rtx), tensorrt or tensorrt-rtx."),
    ] = "auto",
    precision: Annotated[str, typer.Option(help="fp32, fp16 or all (every precision exported).")] = "all",
    profile: Annotated[
        list[str] | None,
        typer.Option(
            help="default, sequential (chunk 1) or jacobi (chunk up to --jacobi-chunk); repeatable."
        ),
    ] = None,
    grid: Annotated[
        list[str] | None,
        typer.Option(help="A resolution bucket as a token grid HxW (latent / patch); repeatable."),
    ] = None,
    batch: Annotated[
        str | None,
        typer.Option(help="Rows per call, N or MIN:OPT:MAX (CFG doubles images); default: export's."),
    ] = None,
    jacobi_chunk: Annotated[
        int | None, typer.Option(help="Chunk of the jacobi profile; default the manifest's block size.")
    ] = None,
    optimization_level: Annotated[int, typer.Option(help="TensorRT builder optimization level, 0..5.")] = 3,
    workspace: Annotated[int | None, typer.Option(help="Workspace memory limit in MiB.")] = None,
    compute_capability: Annotated[
        list[str] | None,
        typer.Option(help="TensorRT-RTX target, e.g. SM86; repeatable; default: all it knows."),
    ] = None,
) -> None:
    """Build a TensorRT engine per graph; engines whose cache key is unchanged are kept, not rebuilt."""
    from rich.progress import Progress

    from starflow.export.trt import trt_command

    with Progress(transient=True) as bar:
        engines, phase = bar.add_task("engines", total=None), bar.add_task("", total=None, visible=False)

        def report(what: str, done: int, total: int) -> None:
            bar.update(engines, description=what, completed=done, total=total)

        def report_phase(what: str, done: int, total: int) -> None:
            bar.update(phase, description=f"  {what}", completed=done, total=total or None, visible=True)

        with user_errors():
            summary = trt_command(
                directory=directory,
                builder=builder,
                precision=precision,
                profiles=profile or [],
                grids=grid or [],
                batch=batch,
                jacobi_chunk=jacobi_chunk,
                optimization_level=optimization_level,
                workspace_mib=workspace,
                compute_capabilities=compute_capability or [],
                progress=report,
                phases=report_phase,
            )
    typer.echo(summary)


@app.command("validate")
def validate(
    directory: Annotated[Path, typer.Argument(help="An export directory (holds manifest.json).")],
    checkpoint: Annotated[Path, typer.Option(help="The checkpoint the directory was exported from.")],
    config: Annotated[str | None, typer.Option(help="YAML config; default: the manifest's model.")] = None,
) -> None:
    """Rerun the export's validation: every graph against PyTorch through ONNX Runtime."""
    from starflow.export.validate import validate_command

    with user_errors():
        typer.echo(validate_command(directory, checkpoint, config))


@app.command("inspect")
def inspect(
    directory: Annotated[Path, typer.Argument(help="An export directory (holds manifest.json).")],
) -> None:
    """Print a summary of an export: blocks, graphs, dims, precisions, validation."""
    from starflow.export.manifest import summarize

    with user_errors():
        typer.echo(summarize(directory))


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
    guidance: Annotated[float, typer.Option(min=0.0)] = 2.0,
    batch: Annotated[int, typer.Option(min=1)] = 1,
    jacobi_block_size: Annotated[int, typer.Option(min=1)] = 64,
    jacobi_threshold: Annotated[float, typer.Option(min=0.0)] = 1e-3,
    jacobi_max_iter: Annotated[int, typer.Option(min=1)] = 32,
    jacobi_init: Annotated[
        str, typer.Option(help="First guess of each chunk: noise (the reference) or chunk-mean.")
    ] = "noise",
    shallow_block_size: Annotated[
        int | None, typer.Option(min=1, help="Chunk length for the shallow blocks only.")
    ] = None,
    shallow_threshold: Annotated[
        float | None, typer.Option(min=0.0, help="Stop threshold for the shallow blocks only.")
    ] = None,
    throughput_batch: Annotated[
        int, typer.Option(min=0, help="Batch of the throughput row; 0 skips it.")
    ] = 8,
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs per Jacobi/forward row (median).")] = 3,
    threads: Annotated[int | None, typer.Option(help="CPU threads for both engines.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the results as JSON.")] = None,
) -> None:
    """PyTorch reference vs runtime, side by side: forward pass, sequential and Jacobi sampling.

    --jacobi-init or a --shallow-* option adds one runtime row sampled with them.
    """
    import json

    from starflow.bench import format_table, run_bench
    from starflow.runtime import JacobiSettings

    shallow = None
    if shallow_block_size is not None or shallow_threshold is not None:
        shallow = JacobiSettings(
            shallow_block_size or jacobi_block_size,
            jacobi_max_iter,
            jacobi_threshold if shallow_threshold is None else shallow_threshold,
            jacobi_init,
        )

    with user_errors():
        result = run_bench(
            preset=preset,
            artifacts=artifacts,
            checkpoint=checkpoint,
            guidance=guidance,
            batch=batch,
            jacobi_block_size=jacobi_block_size,
            jacobi_threshold=jacobi_threshold,
            jacobi_max_iter=jacobi_max_iter,
            jacobi_init=jacobi_init,
            shallow_jacobi=shallow,
            throughput_batch=throughput_batch,
            repeats=repeats,
            threads=threads,
            log=lambda line: typer.echo(line, err=True),
        )
    typer.echo(format_table(result))
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2) + "\n")
