"""`starflow export onnx|trt`: a checkpoint to validated ONNX graphs, graphs to TensorRT engines."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from starflow.cli.errors import user_errors
from starflow.core.outputs import DEFAULT_FPS
from starflow.export.defaults import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_FRAMES,
    DEFAULT_OPSET,
    DEFAULT_PRECISIONS,
    SUPPORTED_OPSETS,
)

export_app = typer.Typer(help="Export a checkpoint to deployable artifacts.", no_args_is_help=True)


@export_app.command("onnx")
def onnx(
    checkpoint: Annotated[Path, typer.Option(help="Official .pth (with --config) or our .safetensors.")],
    out: Annotated[Path, typer.Option(help="Directory to write the graphs and manifest.json into.")],
    config: Annotated[
        str | None, typer.Option(help="YAML config or preset name; default: the one in the .safetensors.")
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option(help=f"fp32, fp16 or both (one directory); default {' and '.join(DEFAULT_PRECISIONS)}."),
    ] = None,
    opset: Annotated[
        int | None,
        typer.Option(
            help=f"ONNX opset, {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1} "
            f"({SUPPORTED_OPSETS.stop - 1} with --precision fp32 only); default {DEFAULT_OPSET}."
        ),
    ] = None,
    max_batch: Annotated[
        int | None,
        typer.Option(
            help=f"Most images per call; graphs allow twice that (CFG); default {DEFAULT_MAX_BATCH}."
        ),
    ] = None,
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
    density: Annotated[bool, typer.Option(help="The per-block forward (density) graphs.")] = True,
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
    sampling_presets: Annotated[
        Path | None,
        typer.Option(help="JSON of named sampling presets calibrated for this model (generate --sampler)."),
    ] = None,
    max_frames: Annotated[
        int | None,
        typer.Option(help=f"Video models: the longest clip in latent frames; default {DEFAULT_MAX_FRAMES}."),
    ] = None,
    fps: Annotated[
        float | None,
        typer.Option(help=f"Video models: the frame rate samples are shown at; default {DEFAULT_FPS:g}."),
    ] = None,
) -> None:
    """Export every flow block to ONNX (step, prefill, forward, vjp graphs) and the pipeline components.

    Prints one line per step; the export appears in --out only once every graph has passed
    validation.
    """
    from starflow.core.request import ModelSource

    with user_errors():  # every path, before torch and onnx load
        ModelSource(checkpoint=checkpoint, config=config, text_encoder=text_encoder, vae=vae).check("pytorch")
    from starflow.cli.parse import parse_hw
    from starflow.cli.progress import step_lines
    from starflow.core.sampling_presets import load_presets
    from starflow.export.onnx import ExportOptions, export_onnx
    from starflow.export.validate import describe_results

    interrupted = f"interrupted: nothing was written to {out} (the export is staged in a temporary folder)"
    with user_errors(interrupted):
        latent = [parse_hw(v, flag, "latent pixels", "32x48", square=True) if v else None
                  for v, flag in ((min_latent, "--min-latent"), (max_latent, "--max-latent"))]  # fmt: skip
        precisions = DEFAULT_PRECISIONS if precision == "both" else precision and (precision,)
        given = dict(
            precisions=precisions, opset=opset, max_batch=max_batch, max_frames=max_frames, fps=fps,
        )  # fmt: skip
        options = ExportOptions(
            min_latent=latent[0], max_latent=latent[1], density=density, denoise=denoise,
            text_encoder=text_encoder, vae=vae, validate=validate, force=force,
            sampling_presets=load_presets(sampling_presets) if sampling_presets else {},
            **{name: value for name, value in given.items() if value is not None},
        )  # fmt: skip
        manifest = export_onnx(checkpoint, out, options, config=config, progress=step_lines())
    typer.echo(
        f"wrote {len(manifest.graphs)} graphs and manifest.json to {out}\n"
        + describe_results(manifest.validation)
    )


@export_app.command("trt")
def trt(
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
        typer.Option(help="TensorRT-RTX target, e.g. SM86; repeatable; default: SM80 and newer."),
    ] = None,
) -> None:
    """Build a TensorRT engine per graph; engines whose cache key is unchanged are kept, not rebuilt."""
    from starflow.cli.parse import parse_hw, parse_range
    from starflow.cli.progress import phase_bar, step_lines
    from starflow.contract.manifest import Manifest
    from starflow.export.trt import EngineOptions, build_engines, describe_engines

    with user_errors():
        options = EngineOptions(
            builder=builder,
            precisions=() if precision == "all" else (precision,),
            profiles=tuple(profile or (() if grid else ("default",))),
            grids=tuple(
                parse_hw(g, "--grid", "tokens (latent size / patch size)", "8x12") for g in grid or ()
            ),
            batch=None if batch is None else parse_range(batch, "--batch"),
            jacobi_chunk=jacobi_chunk,
            optimization_level=optimization_level,
            workspace_bytes=None if workspace is None else workspace << 20,
            compute_capabilities=tuple(compute_capability or ()),
        )
        with phase_bar() as report_phase:
            results = build_engines(directory, options, progress=step_lines(), phases=report_phase)
        summary = describe_engines(results, Manifest.load(directory, verify_files=False))
    typer.echo(summary)
