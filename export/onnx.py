"""`starflow export onnx`: per-block step/prefill/forward/vjp graphs + components + manifest, validated.

The export runs in small steps so that a failure leaves nothing behind: check every option and
the checkpoint's keys and shapes (no file touched), plan the graphs, trace each block structure
once (two processes at a time), then, block by block, write a block's graphs into a temporary
sibling of `out` (its weights read from the checkpoint one tensor at a time) and validate them
against PyTorch; then the components and the manifest, and the finished directory is swapped
into place with renames.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path

from starflow.contract.manifest import (
    GUIDANCE_EXPRESSION,
    SCHEMA_VERSION,
    Block,
    FileEntry,
    Graph,
    Guidance,
    Latent,
    Manifest,
    PrecisionInfo,
    Producer,
    Range,
    Source,
    Text,
    Video,
    is_starflow_export,
    sha256,
)
from starflow.core.atomic import partial_folder
from starflow.core.checks import check_count
from starflow.core.config import StarFlowConfig
from starflow.core.errors import StarflowError
from starflow.core.outputs import DEFAULT_FPS
from starflow.core.sampler import LATER_CHUNK_FACTOR, JacobiSettings, Progress, SampleOptions
from starflow.core.sampling_presets import check_presets
from starflow.export.components import ComponentEntries, Components
from starflow.export.defaults import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_FRAMES,
    DEFAULT_OPSET,
    DEFAULT_PRECISIONS,
    SUPPORTED_OPSETS,
)
from starflow.export.graphs import LatentRange, Precision, block_entry, block_specs, profile_dims
from starflow.export.trace import BlockGraphExporter, GraphJob, weight_bytes
from starflow.model.flow import StarFlow

# The self-denoise's chain is checked against whole-model autograd when all blocks fit this
# together (the digits model: 1 MB); a larger export checks each block's vjp graph alone.
GRADIENT_CHECK_BYTES = 1 << 30

# fp16 LayerNorm/softmax measured against keeping them fp32 (benchmarks/export_scale.py): no
# difference on the fixture, 2.7e-3 vs 3.0e-3 (mu) and 5.7e-3 vs 5.3e-3 (z) relative on the
# 3B-shaped block. Random weights lack the outlier activations of trained transformers that make
# fp16 norms overflow, so both stay fp32: the cost is a cast around each.
PRECISIONS = {"fp32": Precision("fp32"), "fp16": Precision("fp16", fp32_norms=True)}


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """What to export, and how. `min_latent`/`max_latent` (H, W latent pixels) default to half and
    twice the model's training side; `text_encoder`/`vae` are local directories."""

    precisions: tuple[str, ...] = DEFAULT_PRECISIONS
    opset: int = DEFAULT_OPSET
    max_batch: int = DEFAULT_MAX_BATCH  # most images per call; the graphs allow twice that rows (guidance)
    min_latent: tuple[int, int] | None = None
    max_latent: tuple[int, int] | None = None
    density: bool = True  # the per-block forward (density) graphs; sampling does not use them
    denoise: bool = True  # the self-denoise: the blocks' fp32 forward and vjp graphs, or the learned denoiser
    text_encoder: Path | None = None
    vae: Path | None = None
    validate: bool = True  # compare every graph with PyTorch; a miss fails the export
    force: bool = False  # replace a non-empty `out` that holds no starflow export
    # opt-in sampling settings calibrated for this model (`generate --sampler NAME`)
    sampling_presets: dict[str, SampleOptions] = dataclasses.field(default_factory=dict)
    max_frames: int | None = None  # video models: the longest clip (DEFAULT_MAX_FRAMES)
    fps: float | None = None  # video models: the frame rate samples are shown at (DEFAULT_FPS)

    def check(self) -> None:
        check_presets(self.sampling_presets, "sampling_presets")
        if self.opset not in SUPPORTED_OPSETS:
            raise StarflowError(
                f"opset {self.opset}: unsupported; choose "
                f"{SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}"
            )
        unknown = [p for p in self.precisions if p not in PRECISIONS]
        if unknown or not self.precisions:
            raise StarflowError(
                f"precisions: got {list(self.precisions)}, allowed values are {sorted(PRECISIONS)}"
            )
        if self.opset >= 23 and "fp16" in self.precisions:
            # measured with torch 2.13 / onnxscript 0.7; exporting unoptimised instead leaves
            # sequence ops that TensorRT cannot parse
            raise StarflowError(
                f"opset {self.opset} with fp16 graphs: at opset 23 the exporter's optimizer turns the fp32 "
                "RMSNorm of fp16 graphs into an RMSNormalization node that fails ONNX shape inference; "
                "use opset 22 or lower, or fp32 graphs only"
            )
        check_count(self.max_batch, "max_batch")
        if self.max_frames is not None:  # None: the default
            check_count(self.max_frames, "max_frames")
        if self.fps is not None and not (isinstance(self.fps, int | float) and 0 < self.fps < float("inf")):
            raise StarflowError(f"fps: must be a number > 0, got {self.fps!r}")

    def video(self, model: StarFlow) -> Video | None:
        """The clip settings of a video model's export; frame options are refused for images."""
        config = model.config
        if not config.video:
            given = [name for name in ("max_frames", "fps") if getattr(self, name) is not None]
            if given:
                raise StarflowError(
                    f"{', '.join(given)}: this is an image model; frame options need a video model"
                )
            return None
        most = self.max_frames or DEFAULT_MAX_FRAMES
        window = config.local_attn_window
        frames = Range(1, min(8, most), most)
        return Video(frames, window, None, LATER_CHUNK_FACTOR, True, self.fps or DEFAULT_FPS)


def check_exportable(model: StarFlow) -> None:
    """The graphs assume RoPE and a start-of-sequence token (every released config has both)."""
    if not model.config.rope:
        raise StarflowError("export: models with learned pos_embed (rope: 0) are not exportable yet")
    if not model.config.sos:
        raise StarflowError(
            "export: models without a start-of-sequence token (sos: 0) are not exportable yet"
        )


def check_out(out: Path, force: bool) -> None:
    """Refuse a file, a non-empty directory that is not a previous export (unless `force`), or a
    place where nothing can be written."""
    from starflow.core.outputs import check_writable

    existing = out.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    check_writable(existing, f"out {out}")
    if out.exists() and not out.is_dir():
        raise StarflowError(f"out {out}: is a file, expected a directory")
    if out.is_dir() and any(out.iterdir()) and not force and not is_starflow_export(out):
        raise StarflowError(
            f"out {out}: directory is not empty and holds no starflow export; "
            "replace it with force=True (--force)"
        )


def export_onnx(
    checkpoint: str | Path,
    out: str | Path,
    options: ExportOptions | None = None,
    *,
    config: str | Path | None = None,
    progress: Progress[str] | None = None,
) -> Manifest:
    """Export every flow block of a checkpoint, and its pipeline components, into `out`.

    Nothing is written before every option and the checkpoint's keys and shapes have been checked, and
    `out` only ever holds a complete, validated export. Returns the manifest written there.
    """
    from starflow.export.denoise import validate_gradient
    from starflow.export.validate import block_references, check_results, compare_block, shape_cases
    from starflow.model.checkpoint import StreamedModel

    options = options or ExportOptions()
    options.check()
    out, checkpoint = Path(out), Path(checkpoint)
    check_out(out, options.force)
    streamed = StreamedModel(config, checkpoint)  # the blocks' weights are read one block at a time
    model = streamed.model
    check_exportable(model)
    if options.denoise and model.learnable_self_denoiser is None and "fp32" not in options.precisions:
        raise StarflowError(
            "denoise: the self-denoise runs the blocks' fp32 graphs; add fp32 to precisions "
            "(--precision fp32 or both) or export without it (denoise=False, --no-denoise)"
        )
    default = LatentRange.default(model.config)
    latent = LatentRange(options.min_latent or default.min, options.max_latent or default.max)
    latent.check(model.config)
    video = options.video(model)
    dims = profile_dims(model.config, latent, options.max_batch, video.frames if video else None)
    components = Components.load(model, checkpoint, options.text_encoder, options.vae, options.denoise)
    plan = plan_graphs(model, options)
    blocks = model.sampling_blocks()
    # the gradient chain against whole-model autograd needs every block at once: small models only
    check_gradient = (
        options.validate and components.gradient is not None and weight_bytes(model) <= GRADIENT_CHECK_BYTES
    )
    validations = len(blocks) + check_gradient if options.validate else 0
    total = 1 + len(plan) + len(components.pending()) + validations  # 1: the traces
    done = 0

    def report(what: str) -> None:
        nonlocal done
        if progress:
            progress(what, done, total)
        done += 1

    cases = shape_cases(latent_entry(model.config, latent), model.config.txt_size, video)
    used = [p for p in PRECISIONS if p in options.precisions]
    with staging_directory(out) as work:
        graphs, entries, results = [], [], []
        exporter = BlockGraphExporter(options.opset)
        traces = exporter.untraced(plan)
        report(f"trace {len(traces)} block graph structures")
        exporter.trace_all(traces)
        source = _source_in_background(checkpoint)  # after the traces: they fork only without threads
        for block in blocks:  # one block's weights at a time
            jobs = [job for job in plan if job.block is block]
            specs = [job.spec for job in jobs]
            tensors = streamed.block_tensors(block.index)  # each read as its graph is written
            for job in jobs:
                report(f"export {job.spec.name}")
                exporter.export(job, work / job.spec.file, tensors)
            hashed: dict[str, FileEntry] = {}  # the block's shared weights file, hashed once
            block_graphs = [spec.entry(work, dims, hashed) for spec in specs]
            graphs += block_graphs
            entries.append(block_entry(model, block, block_graphs, used, tensors["sos_embed"]))
            if options.validate:
                kinds = {spec.kind for spec in specs}
                with streamed.loaded(block.index):
                    references = block_references(block, model.config.txt_dim, cases, kinds)
                # with the block's weights released: one session's memory
                report(f"validate block{block.index} against PyTorch")
                results += compare_block(work, block_graphs, cases, references)
                check_results(results)
        if check_gradient:
            report("validate the self-denoise gradient against PyTorch")
            blocks_only = build_manifest(
                model, source(), graphs, entries, dims, latent, video, options, ComponentEntries(), work
            )
            results += validate_gradient(work, streamed.load_all(), blocks_only)
            check_results(results)
        components_entries = components.export(model, work, options.opset, report)
        graphs += [spec.entry(work, dims) for spec in components_entries.graphs]
        manifest = build_manifest(
            model, source(), graphs, entries, dims, latent, video, options, components_entries, work
        )
        manifest = dataclasses.replace(manifest, validation=tuple(results)).write(work)
        if progress:
            progress("done", total, total)
        replace_dir(work, out)
    return manifest


def plan_graphs(model: StarFlow, options: ExportOptions) -> list[GraphJob]:
    """Every block graph to export, block by block in sampling order, each block's precision by
    precision; a forward graph is traced with its block's vjp graph (fp32, with the gradient
    chain)."""
    gradient = options.denoise and model.learnable_self_denoiser is None  # the fp32 vjp chain
    jobs = []
    for block in model.sampling_blocks():
        for precision in options.precisions:
            specs = block_specs(
                model.config, block, precision, density=options.density, vjp=gradient and precision == "fp32"
            )
            vjp = next((spec for spec in specs if spec.kind == "vjp"), None)
            jobs += [
                GraphJob(spec, block, PRECISIONS[precision], vjp if spec.kind == "forward" else None)
                for spec in specs
            ]
    return jobs


def latent_entry(config: StarFlowConfig, latent: LatentRange) -> Latent:
    """The manifest's latent section: the latents' layout and the exported range."""
    p = config.patch_size
    return Latent(
        config.channel_size, p, config.token_dim, (config.latent_size,) * 2, latent.min, latent.max, p
    )


def _source_in_background(checkpoint: Path) -> Callable[[], Source]:
    """The checkpoint's manifest entry, hashed by a daemon thread while the graphs are written
    (reading a 3B checkpoint back from disk took 100 s); the call returned waits for it."""
    found: dict[str, Source | OSError] = {}

    def run() -> None:
        try:
            found["source"] = Source(checkpoint.name, sha256(checkpoint))
        except OSError as err:
            found["source"] = err

    thread = threading.Thread(target=run, name="sha256 of the checkpoint", daemon=True)
    thread.start()

    def result() -> Source:
        thread.join()
        if isinstance(found["source"], OSError):
            raise StarflowError(f"checkpoint {checkpoint}: cannot read it: {found['source'].strerror}")
        return found["source"]

    return result


def build_manifest(
    model: StarFlow,
    source: Source,
    graphs: list[Graph],
    blocks: list[Block],
    dims: dict[str, Range],
    latent: LatentRange,
    video: Video | None,
    options: ExportOptions,
    components: ComponentEntries,
    directory: Path,
) -> Manifest:
    """Everything a runtime needs, in one document (see manifest.schema.json)."""
    import torch

    from starflow.export.validate import TOLERANCES

    config = model.config
    used = [p for p in PRECISIONS if any(g.precision == p and g.block is not None for g in graphs)]
    text = None
    if config.txt_dim > 0:
        text = Text(config.text, config.txt_dim, config.txt_size, components.text)
    return Manifest(
        schema_version=SCHEMA_VERSION,
        producer=Producer("starflow", version("starflow"), torch.__version__, options.opset),
        source=source,
        model={k: v for k, v in config.to_dict().items() if k != "extra"},
        latent=latent_entry(config, latent),
        text=text,
        decoder=components.decoder,
        denoise=components.denoise,
        video=video,
        files=tuple(FileEntry.of(directory, name) for name in components.files),
        guidance=Guidance(
            "starflow-cfg", GUIDANCE_EXPRESSION, config.cfg, "deep" if config.cond_top_only else "all"
        ),
        jacobi=JacobiSettings(),
        sampling_presets=dict(options.sampling_presets),
        noise_std=config.noise_std,
        dims=dims,
        precisions={p: PrecisionInfo(TOLERANCES[p], PRECISIONS[p].fp32_ops()) for p in used},
        blocks=tuple(blocks),
        graphs=tuple(graphs),
        validation=(),
    )


# ---- files ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def staging_directory(out: Path) -> Iterator[Path]:
    """A temporary sibling of `out` to export into; removed unless it was moved into place."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = partial_folder(out)  # named for this process; a killed export's partials go first
    except OSError as err:
        raise StarflowError(f"out {out}: cannot write there ({err.strerror})") from None
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)  # gone already when it was moved into place


def replace_dir(new: Path, out: Path, attempts: int = 5) -> None:
    """Move `new` to `out`; an existing `out` is renamed aside first and deleted after.

    Another process may put a directory at `out` between the two renames (two exports to one
    place): then the rename is retried, and the last export to finish wins, whole.
    """
    old = partial_folder(out)
    try:
        for attempt in range(attempts):
            try:
                os.replace(out, old / f"previous-{attempt}")
            except FileNotFoundError:
                pass  # nothing there, or another export has just moved it aside
            try:
                os.replace(new, out)
                return
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST) or attempt == attempts - 1:
                    raise StarflowError(
                        f"out {out}: cannot move the export into place ({err.strerror})"
                    ) from None
    finally:
        shutil.rmtree(old, ignore_errors=True)
