"""`starflow export onnx`: per-block step/prefill/forward graphs + manifest, validated, atomic.

The export runs in four phases so that a failure leaves nothing behind: check every argument
and load the checkpoint (no file touched), export into a temporary sibling of `out`, validate
there against PyTorch, then swap the finished directory into place with renames.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import onnx
import torch

from starflow.atomic import current_umask
from starflow.config import StarFlowConfig
from starflow.errors import StarflowError
from starflow.export.graphs import ForwardGraph, Precision, PrefillGraph, StepGraph
from starflow.export.manifest import (
    MANIFEST_NAME,
    VAE_SCALE,
    ComponentEntries,
    GraphSpec,
    Profile,
    build_manifest,
    graph_file_entry,
    graph_specs,
    is_starflow_export,
    write_manifest,
)
from starflow.model import FlowBlock, StarFlow
from starflow.runtime.sizes import parse_hw

DEFAULT_OPSET = 20
SUPPORTED_OPSETS = range(18, 24)  # torch's exporter starts at 18; 23 is the newest it emits
DEFAULT_PRECISIONS = ("fp32", "fp16")
# fp16 LayerNorm/softmax measured against keeping them fp32 (benchmarks/export_scale.py): no
# difference on the fixture, 2.7e-3 vs 3.0e-3 (mu) and 5.7e-3 vs 5.3e-3 (z) relative on the
# 3B-shaped block. Random weights lack the outlier activations of trained transformers that make
# fp16 norms overflow, so both stay fp32: the cost is a cast around each.
PRECISIONS = {"fp32": Precision("fp32"), "fp16": Precision("fp16", fp32_norms=True, fp32_softmax=True)}
# Graphs whose weights exceed this go to ONNX external data (protobuf's hard limit is 2 GiB).
EXTERNAL_DATA_BYTES = 1 << 30

Progress = Callable[[str, int, int], None]  # (what is being done, steps done, steps in all)


@dataclasses.dataclass(frozen=True)
class LatentRange:
    """Latent sizes (H, W in latent pixels) the graphs' profiles cover, inclusive."""

    min: tuple[int, int]
    max: tuple[int, int]


def parse_latent(text: str, option: str) -> tuple[int, int]:
    """'HxW' or 'N' (square) latent pixels -> (H, W)."""
    return parse_hw(text, option, "latent pixels", "32x48", square=True)


def default_latent_range(config: StarFlowConfig) -> LatentRange:
    """Half to twice the training latent side, per side: covers the official aspect buckets."""
    p, side = config.patch_size, config.latent_size
    low = max(p, -(-side // 2) // p * p)
    return LatentRange((low, low), (2 * side, 2 * side))


def check_latent_range(config: StarFlowConfig, latent: LatentRange) -> None:
    p = config.patch_size
    for name, (h, w) in (("--min-latent", latent.min), ("--max-latent", latent.max)):
        if h % p or w % p:
            raise StarflowError(f"{name}: {h}x{w} is not a multiple of patch_size {p}")
    if latent.min[0] > latent.max[0] or latent.min[1] > latent.max[1]:
        raise StarflowError(
            f"--min-latent {latent.min[0]}x{latent.min[1]} exceeds "
            f"--max-latent {latent.max[0]}x{latent.max[1]}"
        )
    side = config.latent_size
    if not (latent.min[0] <= side <= latent.max[0] and latent.min[1] <= side <= latent.max[1]):
        raise StarflowError(
            f"the latent range {latent.min[0]}x{latent.min[1]}..{latent.max[0]}x{latent.max[1]} must "
            f"include the model's training latent {side}x{side}"
        )


def check_exportable(model: StarFlow) -> None:
    """The graphs assume RoPE and a start-of-sequence token (every released config has both)."""
    if model.rope is None:
        raise StarflowError("export: models with learned pos_embed (rope: 0) are not exportable yet")
    if not model.config.sos:
        raise StarflowError(
            "export: models without a start-of-sequence token (sos: 0) are not exportable yet"
        )


def check_out(out: Path, force: bool) -> None:
    """Refuse a file, or a non-empty directory that is not a previous export (unless --force)."""
    if out.exists() and not out.is_dir():
        raise StarflowError(f"--out {out}: is a file, expected a directory")
    if out.is_dir() and any(out.iterdir()) and not force and not is_starflow_export(out):
        raise StarflowError(
            f"--out {out}: directory is not empty and holds no starflow export; pass --force to replace it"
        )


def sampling_blocks(model: StarFlow) -> list[tuple[int, FlowBlock]]:
    """(forward index, block) in sampling order (deep block first); identity blocks skipped."""
    blocks = [(i, b) for i, b in enumerate(model.blocks) if isinstance(b, FlowBlock)]
    return blocks[::-1]


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """torch.onnx logs and warns per graph about things that do not concern our users."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _example_args(spec: GraphSpec, precision: Precision) -> tuple[torch.Tensor, ...]:
    """Example inputs with every symbolic dim >= 2 and distinct, so export cannot specialise them."""
    sizes = {"batch": 2, "chunk": 3, "past": 5, "text": 4, "tokens": 6}
    args = []
    for tensor in spec.inputs:
        if tensor.dtype == "int64":
            args.append(torch.tensor([2, 3]) if tensor.name == "grid" else torch.tensor(2))
            continue
        shape = [sizes[d] if isinstance(d, str) else d for d in tensor.shape]
        dtype = precision.dtype if tensor.dtype == "float16" else torch.float32
        args.append(torch.randn(shape).to(dtype))
    return tuple(args)


def dynamic_shapes_of(spec: GraphSpec) -> tuple[dict[int, torch.export.Dim] | None, ...]:
    dims: dict[str, torch.export.Dim] = {}
    out = []
    for tensor in spec.inputs:
        axes = {}
        for axis, d in enumerate(tensor.shape):
            if isinstance(d, str):
                low = 0 if d == "past" else 1
                axes[axis] = dims.setdefault(d, torch.export.Dim(d, min=low))
        out.append(axes or None)
    return tuple(out)


def _graph_module(
    spec: GraphSpec, model: StarFlow, block: FlowBlock, precision: Precision
) -> torch.nn.Module:
    cls = {"step": StepGraph, "prefill": PrefillGraph, "forward": ForwardGraph}[spec.kind]
    return cls(block, model.rope, precision).eval()


def export_graph(
    spec: GraphSpec, model: StarFlow, block: FlowBlock, precision: Precision, path: Path, opset: int
) -> None:
    """Export one block graph to `path` (see `export_module`)."""
    module = _graph_module(spec, model, block, precision)
    export_module(module, _example_args(spec, precision), dynamic_shapes_of(spec), spec, path, opset)


def export_module(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    dynamic_shapes: tuple[Any, ...],
    spec: GraphSpec,
    path: Path,
    opset: int,
    optimize: bool = True,
) -> None:
    """Export `module` to `path`, check it, and prove its I/O signature kept every symbolic dim.

    Every graph of an export (blocks and components) goes through here: one exporter setup,
    external data for big weights, `onnx.checker`, and the declared-signature check.
    `optimize=False` skips onnxscript's optimizer (ONNX Runtime optimises at load anyway).
    """
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                module,
                args,
                input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs],
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                dynamo=True,
                optimize=optimize,
                verbose=False,
            )
            program.save(str(path), external_data=weight_bytes > EXTERNAL_DATA_BYTES)
    except Exception as err:  # the exporter raises many types; name the graph and keep the cause
        raise StarflowError(f"export of graph {spec.name} failed: {type(err).__name__}: {err}") from err
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise StarflowError(f"graph {spec.name}: onnx.checker failed: {err}") from None
    spec.check_signature(onnx.load(str(path), load_external_data=False))


def export_onnx(
    checkpoint: str | Path,
    out: str | Path,
    *,
    config: str | Path | None = None,
    precisions: tuple[str, ...] = DEFAULT_PRECISIONS,
    opset: int = DEFAULT_OPSET,
    max_batch: int = 8,
    min_latent: tuple[int, int] | None = None,
    max_latent: tuple[int, int] | None = None,
    force: bool = False,
    validate: bool = True,
    progress: Progress | None = None,
    text_encoder: str | Path | None = None,
    vae: str | Path | None = None,
    denoise: bool = True,
    density: bool = True,
) -> Path:
    """Export every flow block of a checkpoint, and its pipeline components, into `out`.

    Components (fp32): the text encoder (`text_encoder`, a local Hugging Face encoder directory,
    or the label encoder saved beside a class-conditional checkpoint), the SD-VAE decoder (`vae`,
    a local diffusers AutoencoderKL directory; pixel models decode by identity) and, with
    `denoise`, the self-denoise gradient graph. `density=False` leaves out the per-block forward
    (density) graphs, which sampling does not use. Returns `out`.

    `min_latent`/`max_latent` (H, W latent pixels) default to half and twice the model's training
    side. Nothing is written before the checkpoint has loaded and every option has been checked, and
    `out` only ever holds a complete, validated export: the work happens in a temporary sibling
    directory that replaces `out` at the end.
    """
    from starflow.checkpoint import load_model
    from starflow.export.validate import check_results, validate_export

    out = Path(out)
    if opset not in SUPPORTED_OPSETS:
        raise StarflowError(
            f"--opset {opset}: unsupported; choose {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}"
        )
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or not precisions:
        raise StarflowError(f"--precision: got {list(precisions)}, allowed values are {sorted(PRECISIONS)}")
    if opset >= 23 and "fp16" in precisions:
        # measured with torch 2.13 / onnxscript 0.7; exporting unoptimised instead leaves
        # sequence ops that TensorRT cannot parse
        raise StarflowError(
            f"--opset {opset} with fp16 graphs: at opset 23 the exporter's optimizer turns the fp32 "
            "RMSNorm of fp16 graphs into an RMSNormalization node that fails ONNX shape inference; "
            "use --opset 22 or lower, or --precision fp32"
        )
    if max_batch < 1:
        raise StarflowError(f"--max-batch: must be >= 1, got {max_batch}")
    check_out(out, force)
    model = load_model(config, checkpoint)
    check_exportable(model)
    default = default_latent_range(model.config)
    latent = LatentRange(min_latent or default.min, max_latent or default.max)
    check_latent_range(model.config, latent)
    profile = Profile.build(model.config, latent, max_batch)
    components = load_components(model, Path(checkpoint), text_encoder, vae)

    jobs = [
        (spec, block, PRECISIONS[name])
        for name in precisions
        for index, block in sampling_blocks(model)
        for spec in graph_specs(model.config, index, block, name)
        if density or spec.kind != "forward"
    ]
    total = len(jobs) + len(components.pending(denoise)) + (1 if validate else 0)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
        os.chmod(work, 0o777 & ~current_umask())  # mkdtemp makes it private; the export is for sharing
    except OSError as err:
        raise StarflowError(f"--out {out}: cannot write there ({err.strerror})") from None
    try:
        files = []
        for done, (spec, block, precision) in enumerate(jobs):
            if progress:
                progress(f"export {spec.name}", done, total)
            export_graph(spec, model, block, precision, work / spec.file, opset)
            files.append(graph_file_entry(spec, work, profile))
        entries = components.export(
            model, work, opset, denoise, lambda what, i: progress and progress(what, len(jobs) + i, total)
        )
        files += [graph_file_entry(spec, work, profile) for spec in entries.graphs]
        manifest = build_manifest(
            model, checkpoint, sampling_blocks(model), files, profile, opset, PRECISIONS, entries, work
        )
        write_manifest(work, manifest)
        if validate:
            if progress:
                progress("validate against PyTorch", total - 1, total)
            results = validate_export(work, model, verify_files=False)  # hashed moments ago
            check_results(results)
            manifest["validation"] = [r.to_dict() for r in results]
            write_manifest(work, manifest)
        if progress:
            progress("done", total, total)
        replace_dir(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out


@dataclasses.dataclass
class Components:
    """The pipeline around the flow, loaded and checked before anything is written."""

    text_encoder: Any  # HFTextEncoder | LabelTextEncoder | None
    vae: Any  # diffusers AutoencoderKL | None
    vae_source: str | None

    def pending(self, denoise: bool) -> list[str]:
        names = ["text_encoder"] if self.text_encoder is not None else []
        names += ["decoder"] if self.vae is not None else []
        return names + (["denoise"] if denoise else [])

    def export(
        self, model: StarFlow, work: Path, opset: int, denoise: bool, progress: Callable[[str, int], None]
    ) -> ComponentEntries:
        """Export (and validate: each exporter checks its graph against PyTorch) every component."""
        entries = ComponentEntries()
        for i, name in enumerate(self.pending(denoise)):
            progress(f"export {name}", i)
            if name == "text_encoder":
                from starflow.export.text_encoder import export_text_encoder

                spec, entries.text = export_text_encoder(self.text_encoder, work, opset)
            elif name == "decoder":
                from starflow.export.decoder import export_decoder
                from starflow.vae import upsampling

                spec = export_decoder(self.vae, work / "decoder.fp32.onnx", VAE_SCALE, opset)
                entries.decoder = {
                    "kind": "sd-vae",
                    "source": self.vae_source,
                    "scale": VAE_SCALE,
                    "graph": spec.name,
                    "factor": upsampling(self.vae),
                }
            else:
                from starflow.export.denoise import export_denoise

                spec = export_denoise(model, work / "denoise.fp32.onnx", opset)
                entries.denoise = {
                    "kind": "nll-gradient",
                    "graph": spec.name,
                    "noise_std": model.config.noise_std,
                }
            entries.graphs.append(spec)
        if self.vae is None and model.config.vae:  # named by the config, but not given: graph null
            entries.decoder = {
                "kind": "sd-vae",
                "source": model.config.vae,
                "scale": VAE_SCALE,
                "graph": None,
                "factor": model.config.img_size // model.config.latent_size,
            }
        if entries.text is not None:
            entries.files.append(entries.text["tokenizer"])
        return entries


def load_components(
    model: StarFlow, checkpoint: Path, text_encoder: str | Path | None, vae: str | Path | None
) -> Components:
    """Load the text encoder and VAE (local directories only) and check they fit the flow."""
    from starflow.label_encoder import labels_path, load_label_encoder

    config = model.config
    encoder = None
    if text_encoder is not None:
        if config.txt_dim == 0:
            raise StarflowError(f"--text-encoder {text_encoder}: this model is not text-conditioned")
        from starflow.text_encoder import HFTextEncoder

        encoder = HFTextEncoder.from_directory(Path(text_encoder), config.txt_size)
        encoder.check_dim(config.txt_dim)
    elif config.txt_dim > 0 and labels_path(checkpoint).is_file():
        from starflow.text_encoder import LabelTextEncoder

        table = load_label_encoder(labels_path(checkpoint), config.txt_size, config.txt_dim)
        encoder = LabelTextEncoder(table)
    loaded_vae = None
    if vae is not None:
        if config.vae is None:
            raise StarflowError(f"--vae {vae}: this is a pixel-space model (its config names no VAE)")
        from starflow.vae import check_channels, load_vae

        loaded_vae = load_vae(Path(vae))
        check_channels(loaded_vae, config.channel_size)
    return Components(encoder, loaded_vae, Path(vae).name if vae is not None else None)


def replace_dir(new: Path, out: Path) -> None:
    """Move `new` to `out`; an existing `out` is renamed aside first and deleted after."""
    if not out.exists():
        os.replace(new, out)
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    os.replace(out, old / "previous")
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)


def export_command(
    *,
    checkpoint: Path,
    out: Path,
    config: str | None,
    precision: str,
    opset: int | None,
    max_batch: int,
    min_latent: str | None,
    max_latent: str | None,
    force: bool,
    validate: bool,
    progress: Progress | None,
    text_encoder: Path | None = None,
    vae: Path | None = None,
    denoise: bool = True,
) -> str:
    """`starflow export onnx`: parse the CLI's strings, export, and describe the result."""
    from starflow.export.manifest import load_manifest

    precisions = DEFAULT_PRECISIONS if precision == "both" else (precision,)
    export_onnx(
        checkpoint,
        out,
        config=config,
        precisions=precisions,
        opset=DEFAULT_OPSET if opset is None else opset,
        max_batch=max_batch,
        min_latent=parse_latent(min_latent, "--min-latent") if min_latent else None,
        max_latent=parse_latent(max_latent, "--max-latent") if max_latent else None,
        force=force,
        validate=validate,
        progress=progress,
        text_encoder=text_encoder,
        vae=vae,
        denoise=denoise,
    )
    manifest = load_manifest(out, verify_files=False)
    lines = [f"wrote {len(manifest['graphs'])} graphs and {MANIFEST_NAME} to {out}"]
    if manifest["validation"]:
        worst = max(manifest["validation"], key=lambda v: v["max_abs_error"] / (v["limit"] or 1.0))
        lines.append(
            f"validation passed: {len(manifest['validation'])} tensors; "
            f"closest to its limit: {worst['graph']} "
            f"{worst['tensor']} error {worst['max_abs_error']:.3g} (limit {worst['limit']:.3g})"
        )
    else:
        lines.append("validation skipped (--no-validate)")
    return "\n".join(lines)
