"""The artifact contract: `manifest.json` and `record.json` as typed, frozen dataclasses.

A runtime in any language drives the graphs from the manifest alone: the blocks in sampling
order, every graph's file, sha256, input/output names, dtypes and symbolic dims with their
min/opt/max, and the rules outside the graphs (permutation, guidance, Jacobi defaults, latent
sizes). The types (here and in `entries.py`) are the one definition: `manifest.schema.json` and
`record.schema.json` beside this file are generated from them (`python -m
starflow.contract.schema`), and every writer (ONNX export, TensorRT engines) and reader (the
runtime, `starflow inspect`) goes through them. numpy-free and torch-free.

Two files, so that the digest is plain bytes every language hashes alike: `manifest.json` holds
exactly the fields that decide the numbers; `record.json` holds what is added after them (the
validation record, the engines) and `manifest_sha256`, the sha256 of manifest.json's bytes.

What loading checks, so that a directory a service did not make cannot point it elsewhere or
change its numbers unnoticed: the schema (unknown keys refused, every file a plain name), that
manifest.json's bytes are the ones its record names, that every name refers to a graph of the
right kind and every block to graphs of its own shape, and that every file resolves inside the
directory (symbolic links included) and matches its sha256. The digest detects edits, not
forgery: whoever can write the directory can rewrite it (`starflow validate` compares the fields
with the checkpoint).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

# pydantic: the contract's types give the JSON Schema (generated, not written) and build the typed
# manifest from JSON in one definition; the sampler's own dataclasses are used as they are.
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, with_config

from starflow.contract.entries import (
    Block,
    Comparison,
    Decoder,
    Denoise,
    Engine,
    EngineBuilder,
    EngineProfile,
    FileEntry,
    Graph,
    Guidance,
    Latent,
    Precision,
    PrecisionInfo,
    Producer,
    Range,
    Sha256,
    Source,
    TensorSpec,
    Text,
    TextComponent,
    Tolerance,
    Video,
    sha256,
)
from starflow.core.atomic import atomic_path
from starflow.core.bounded import parse_json, read_bytes
from starflow.core.errors import StarflowError
from starflow.core.sampler import JacobiSettings, SampleOptions
from starflow.core.sampling_presets import OFFICIAL, check_presets, choose

SCHEMA_VERSION = 10  # the one place: the schemas carry it as a const, CMake reads it from there
MANIFEST_NAME = "manifest.json"
RECORD_NAME = "record.json"
MAX_FILE_BYTES = 64 << 20  # either file; libstarflow reads no more either
VAE_SCALE = 0.18215  # SD-VAE latents are decoded at z / VAE_SCALE
GUIDANCE_EXPRESSION = (
    "batch [cond ; uncond]; s = min(sigma_c/sigma_u, 1)^2; sigma = sigma_c / sqrt(1 + w - w*s); "
    "mu = ((1 + w)*mu_c - w*s*mu_u) / (1 + w - w*s); both halves receive (mu, sigma)"
)
MODEL_KEYS = ["channel_size", "patch_size", "txt_size", "cond_top_only", "sos"]  # read by every runtime
# Unknown keys refused; no coercion ("1" is not 1). NaN and inf are refused when either file is read or
# written (starflow.core.bounded: libstarflow's JSON reader has no such numbers).
CONFIG = ConfigDict(extra="forbid", strict=True, ser_json_inf_nan="constants")
__all__ = [  # the whole contract, entries included
    "GUIDANCE_EXPRESSION",
    "MANIFEST_NAME",
    "RECORD_NAME",
    "SCHEMA_VERSION",
    "VAE_SCALE",
    "Contract",
    "Manifest",
    "Record",
    "check_schema",
    "inside",
    "is_starflow_export",
    "schema",
    "Block",
    "Comparison",
    "Decoder",
    "Denoise",
    "Engine",
    "EngineBuilder",
    "EngineProfile",
    "FileEntry",
    "Graph",
    "Guidance",
    "Latent",
    "PrecisionInfo",
    "Producer",
    "Range",
    "Source",
    "TensorSpec",
    "Text",
    "TextComponent",
    "Tolerance",
    "Video",
    "sha256",
]


# ---- the two files -------------------------------------------------------------------------------------
@with_config(CONFIG)
@dataclasses.dataclass(frozen=True)
class Contract:
    """Everything a runtime needs to sample from a starflow ONNX export (manifest.json). Graphs
    see tokens in their block's order (after the block's permutation); the permutation, guidance,
    the Jacobi update and its stop test run outside the graphs, in fp32. Unknown keys are rejected.
    record.json holds this file's sha256: a reader refuses a manifest.json whose bytes changed."""

    schema_version: Literal[SCHEMA_VERSION]
    producer: Producer
    source: Source
    model: Annotated[
        dict[str, Any],
        Field(
            description="The StarFlowConfig fields (official training-argument names), for provenance "
            "and for reloading the PyTorch model in `starflow validate`.",
            json_schema_extra={"required": MODEL_KEYS},
        ),
    ]
    latent: Latent
    text: Annotated[Text | None, Field(description="null when the model has no text")]
    decoder: Decoder
    denoise: Annotated[Denoise | None, Field(description="null when not exported")]
    video: Annotated[Video | None, Field(description="null for an image export")]
    files: Annotated[
        tuple[FileEntry, ...],
        Field(
            description="non-graph files the runtime reads (the tokenizer), with sha256; paths "
            "relative to the manifest"
        ),
    ]
    guidance: Guidance
    jacobi: Annotated[
        JacobiSettings,
        Field(
            description="Default block-wise Jacobi settings: stop a chunk when "
            "mean((new-old)^2)/mean(new^2) < threshold or after max_iter iterations."
        ),
    ]
    sampling_presets: Annotated[
        dict[str, SampleOptions],
        Field(
            description="Opt-in sampling settings calibrated for this model (e.g. 'fast'); the default "
            "stays guidance.default_weight with jacobi. Each names the guidance weight, the method and "
            "the Jacobi settings of the deep block (jacobi) and of the shallow blocks (shallow_jacobi; "
            "null: the same). init: a chunk's first guess, 'noise' (official) or 'chunk-mean' (the "
            "previous chunk's mean affine map applied to the chunk's noise). In a video export the "
            "clip settings (warm_start, window, context) are the video section's."
        ),
    ]
    noise_std: Annotated[float, Field(ge=0)]
    dims: Annotated[
        dict[str, Range],
        Field(
            description="Every symbolic dim: batch (rows, twice the images under guidance), chunk "
            "(tokens per step), past (cached positions = text length + chunk start), text (text "
            "tokens), tokens (h*w, times the frames of a clip), frames (a clip's frames)."
        ),
    ]
    precisions: dict[Precision, PrecisionInfo]
    blocks: Annotated[
        tuple[Block, ...],
        Field(min_length=1, description="Flow blocks in sampling order (deep block first)."),
    ]
    graphs: tuple[Graph, ...]


@with_config(CONFIG)
@dataclasses.dataclass(frozen=True)
class Record:
    """What is added to an export after its manifest.json is written (record.json); nothing here
    changes a sample."""

    schema_version: Literal[SCHEMA_VERSION]
    manifest_sha256: Annotated[
        Sha256,
        Field(
            description="sha256 of manifest.json's bytes as written; a reader hashes the bytes it read "
            "and refuses a mismatch"
        ),
    ]
    validation: Annotated[
        tuple[Comparison, ...],
        Field(description="One entry per compared tensor; empty when exported with --no-validate."),
    ]
    engines: Annotated[
        tuple[Engine, ...],
        Field(description="One TensorRT engine per graph (`starflow export trt`); empty without."),
    ]


CONTRACT = TypeAdapter(Contract)
RECORD = TypeAdapter(Record)


@dataclasses.dataclass(frozen=True)
class Manifest(Contract):
    """An export as callers use it: its contract, its record, and the digest that ties them."""

    validation: tuple[Comparison, ...] = ()
    engines: tuple[Engine, ...] = ()
    digest: str = ""  # sha256 of manifest.json's bytes; `load` and `write` fill it in

    # -- lookups --
    def graph(self, name: str) -> Graph:
        for graph in self.graphs:
            if graph.name == name:
                return graph
        raise StarflowError(f"manifest: no graph named {name!r}; it has {[g.name for g in self.graphs]}")

    def block_graph(self, block: Block, kind: str, precision: str) -> Graph:
        names = block.graphs.get(precision, {})
        if kind not in names:
            raise StarflowError(
                f"block {block.index} has no {kind} graph in {precision} (it has {sorted(names)}); "
                "re-export with it"
            )
        return self.graph(names[kind])

    def sampling(self, preset: str = OFFICIAL) -> SampleOptions:
        """The export's default settings ("official": its guidance weight and Jacobi settings) or
        one of its named sampling presets; a video export's clip settings are its video section's."""
        official = SampleOptions(guidance=self.guidance.default_weight, jacobi=self.jacobi)
        options = choose(preset, official, self.sampling_presets, "this export")
        if self.video is None:
            return options
        video = self.video
        return dataclasses.replace(
            options, warm_start=video.warm_start, window=video.window, context=video.context
        )

    def engine(self, graph: str) -> Engine | None:
        return next((e for e in self.engines if e.graph == graph), None)

    @property
    def max_rows(self) -> int:
        """Graph rows per call: images, or twice the images under guidance ([cond ; uncond])."""
        return self.dims["batch"].max

    def images_per_batch(self, guidance: float, frames: int | None = None) -> int:
        """Samples (images or clips of `frames`) per graph call: guidance doubles the rows, and a
        frame-local block runs a row per frame (at least 1: a clip too long is refused elsewhere)."""
        per_row = 2 if guidance > 0 else 1
        if frames is not None and any(b.frame_local for b in self.blocks):
            per_row = max(per_row, frames)
        return max(self.max_rows // per_row, 1)

    # -- reading and writing --
    @classmethod
    def parse(cls, manifest: bytes, record: bytes | None, source: str) -> Manifest:
        """Check manifest.json's and record.json's bytes (`source`: manifest.json's path) and build
        the typed manifest."""
        data = parse_json(manifest, source)
        _check_version(data, source)
        check_schema(data, source)
        if record is None:
            raise StarflowError(
                f"{source}: no {RECORD_NAME} beside it (the digest and validation record); re-export"
            )
        record_source = str(Path(source).with_name(RECORD_NAME))
        record_data = parse_json(record, record_source)
        _check_version(record_data, record_source)
        check_schema(record_data, record_source, RECORD_NAME)
        digest = hashlib.sha256(manifest).hexdigest()
        if record_data["manifest_sha256"] != digest:
            raise StarflowError(
                f"{source}: its fields changed since the export (digest mismatch): the graphs would be "
                "driven by settings they were not validated with; re-export instead of editing"
            )
        contract = _build(CONTRACT, manifest, source)
        written = _build(RECORD, record, record_source)
        fields = {f.name: getattr(contract, f.name) for f in dataclasses.fields(Contract)}
        result = cls(**fields, validation=written.validation, engines=written.engines, digest=digest)
        if result.video is not None and result.video.later_chunk_factor != 4:
            # the samplers (starflow.core.sampler, libstarflow) run the official rule, 4x
            raise StarflowError(
                f"{source}: video.later_chunk_factor is {result.video.later_chunk_factor}; this runtime "
                "samples clips with the official 4 (chunks after the first frame are 4x the block size)"
            )
        result.check_references(source)
        return result

    def check_references(self, source: str) -> None:
        """Every name refers to a graph of the right kind; every block's graphs have its shape."""
        graphs = {g.name: g for g in self.graphs}
        check_presets(self.sampling_presets, source)
        try:
            self.jacobi.check("jacobi")
        except StarflowError as err:
            raise StarflowError(f"{source}: jacobi: {err}") from None

        def refer(name: str | None, kind: str, owner: str) -> Graph | None:
            if name is None:
                return None
            if name not in graphs or graphs[name].kind != kind:
                raise StarflowError(f"{source}: {owner} names graph {name!r}, which is no {kind} graph here")
            return graphs[name]

        D = self.latent.token_dim
        for block in self.blocks:
            if len(block.sos_embed) != D:
                raise StarflowError(
                    f"{source}: block {block.index} sos_embed has {len(block.sos_embed)} values, not {D}"
                )
            for precision, kinds in block.graphs.items():
                if precision not in self.precisions:
                    raise StarflowError(
                        f"{source}: block {block.index} has {precision} graphs, a precision not listed"
                    )
                for kind, name in kinds.items():
                    graph = refer(name, kind, f"block {block.index}")
                    if graph.block != block.index or graph.precision != precision:
                        raise StarflowError(
                            f"{source}: block {block.index} names graph {name} of another block"
                        )
                    _check_block_shapes(block, graph, D, source)
        text = self.text.component if self.text else None
        refer(text.graph if text else None, "text_encoder", "text")
        if text:  # what the runtimes read has its sha256 (libstarflow's reader refuses the same)
            listed = {f.file for f in self.files}
            for key, name in (("tokenizer", text.tokenizer), ("sentencepiece", text.sentencepiece)):
                if name is not None and name not in listed:
                    raise StarflowError(
                        f"{source}: text.component.{key} names {name!r}, which files does not list "
                        "(every file read has its sha256 there)"
                    )
            if text.kind == "label-table" and text.sentencepiece is not None:
                raise StarflowError(
                    f"{source}: text.component.sentencepiece must be null for a label-table component"
                )
        refer(self.decoder.graph, "decoder", "decoder")
        refer(self.denoise.graph if self.denoise else None, "denoise", "denoise")
        if self.denoise is not None and not self.denoise.learned:
            for block in self.blocks:
                missing = {"forward", "vjp"} - set(block.graphs.get("fp32", {}))
                if missing:
                    raise StarflowError(
                        f"{source}: denoise nll-gradient chains the blocks' fp32 forward and vjp graphs; "
                        f"block {block.index} has no fp32 {' or '.join(sorted(missing))} graph"
                    )
        for engine in self.engines:
            if engine.graph not in graphs or graphs[engine.graph].block is None:
                raise StarflowError(
                    f"{source}: engine {engine.file} names {engine.graph!r}, no flow-block graph here"
                )

    @classmethod
    def load(cls, directory: str | Path, verify_files: bool = True) -> Manifest:
        """Read and check `directory`'s manifest.json and record.json; with `verify_files`, every
        file's sha256 too."""
        directory = Path(directory)
        path = directory / MANIFEST_NAME
        if not path.is_file():
            raise StarflowError(f"{directory}: no {MANIFEST_NAME}; not a starflow export directory")
        record = directory / RECORD_NAME
        manifest = cls.parse(
            read_bytes(path, MAX_FILE_BYTES),
            read_bytes(record, MAX_FILE_BYTES) if record.is_file() else None,
            str(path),
        )
        if verify_files:
            manifest.verify_files(directory)
        return manifest

    def verify_files(self, directory: Path) -> None:
        """Every graph, external-data and other file exists and matches its sha256."""
        owned = [(f"graph {g.name}", e) for g in self.graphs for e in (g, *g.external_data)]
        hashed: dict[str, str] = {}  # a block's graphs share one weights file: hashed once
        for owner, entry in owned + [(f"file {f.file}", f) for f in self.files]:
            path = inside(directory, entry.file)
            if not path.exists():
                raise StarflowError(f"{owner}: file {path} is missing")
            if not path.is_file():  # a FIFO would block the read: refused, as sha256 does
                raise StarflowError(f"{owner}: file {path} is not a regular file")
            if entry.file not in hashed:
                hashed[entry.file] = sha256(path)
            if hashed[entry.file] != entry.sha256:
                raise StarflowError(f"{owner}: {path} does not match its sha256 in the manifest")

    def to_dict(self) -> dict[str, Any]:
        """manifest.json's fields as JSON values (no record, no digest)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(Contract)}
        return CONTRACT.dump_python(Contract(**fields), mode="json")

    def write(self, directory: Path) -> Manifest:
        """Write manifest.json, then record.json with its sha256 (each atomically, each checked
        first against its schema and, as the bytes to be written, against the reading limits: a
        file starflow writes is one it reads); returns what was written, digest filled in."""
        text = _write_json(directory / MANIFEST_NAME, self.to_dict())
        manifest = dataclasses.replace(self, digest=hashlib.sha256(text).hexdigest())
        return manifest.write_record(directory)

    def write_record(self, directory: Path) -> Manifest:
        """Write record.json alone (the engines or validation changed; manifest.json did not)."""
        if not self.digest:
            raise StarflowError(f"{directory}: a record needs the digest of a written manifest.json")
        record = Record(SCHEMA_VERSION, self.digest, self.validation, self.engines)
        _write_json(directory / RECORD_NAME, RECORD.dump_python(record, mode="json"), RECORD_NAME)
        return self

    def summary(self) -> str:
        """A human-readable summary (what `starflow inspect` prints)."""
        latent, guidance = self.latent, self.guidance
        lines = [
            f"starflow export (schema {self.schema_version}, starflow {self.producer.version}, "
            f"opset {self.producer.opset}) from {self.source.checkpoint}",
            f"latent: {latent.channels} channels, patch {latent.patch_size}, {latent.describe_range()} "
            f"(multiples of {latent.multiple_of}, trained at {latent.train[0]}x{latent.train[1]})",
            "text: " + _describe_text(self.text),
            "video: " + _describe_video(self.video),
            f"guidance: {guidance.formula} on {guidance.blocks} block(s), default weight "
            f"{guidance.default_weight:g}; jacobi: block {self.jacobi.block_size}, max_iter "
            f"{self.jacobi.max_iter}, threshold {self.jacobi.threshold:g}",
            "dims: " + ", ".join(f"{d} {r.min}/{r.opt}/{r.max}" for d, r in self.dims.items()),
        ]
        for name, preset in self.sampling_presets.items():
            deep, shallow = preset.jacobi, preset.shallow_jacobi or preset.jacobi
            lines.append(
                f"sampler {name!r} (--sampler {name}): {preset.method}, guidance {preset.guidance:g}; "
                f"deep block {deep.block_size} x {deep.max_iter} ({deep.init}), shallow blocks "
                f"{shallow.block_size} x {shallow.max_iter} ({shallow.init}), "
                f"threshold {deep.threshold:g}/{shallow.threshold:g}"
            )
        lines.append("blocks (sampling order):")
        for b in self.blocks:
            lines.append(
                f"  block {b.index} {b.role:7} {b.permutation:13} layers {b.layers} width {b.width} "
                f"heads {b.heads}/{b.kv_heads} head_dim {b.head_dim}"
                + (" text" if b.text_conditioned else "")
                + (" frame-local" if b.frame_local else "")
            )
        lines.append("precisions:")
        for name, info in self.precisions.items():
            tol = info.tolerance
            lines.append(
                f"  {name}: tolerance atol {tol.atol:g} rtol {tol.rtol:g}, "
                f"fp32 ops {', '.join(info.fp32_ops)}"
            )
        lines.append("graphs:")
        for g in self.graphs:
            size = g.bytes + sum(e.bytes for e in g.external_data)
            lines.append(f"  {g.file:32} {size / 2**20:9.1f} MiB  sha256 {g.sha256[:12]}")
        if self.engines:
            lines.append(
                f"engines: {len(self.engines)} (built by {self.engines[0].builder.name} "
                f"{self.engines[0].builder.version})"
            )
        failed = [v for v in self.validation if not v.passed]
        lines.append(
            f"validation: {len(self.validation)} comparisons, {len(failed)} failed"
            if self.validation
            else "validation: not run (--no-validate)"
        )
        return "\n".join(lines)


def _check_block_shapes(block: Block, graph: Graph, token_dim: int, source: str) -> None:
    """The block's layers, kv_heads, head_dim and token width are its graph's (checked here, not
    at run time by a backend's error)."""
    expected = {
        "past_keys": (block.layers, "batch", block.kv_heads, "past", block.head_dim),
        "keys": (block.layers, "batch", block.kv_heads, "text", block.head_dim),
    }
    for tensor in graph.inputs + graph.outputs:
        want = expected.get(tensor.name)
        if tensor.name == "x":
            want = tensor.shape[:-1] + (token_dim,)
        if want is not None and tensor.shape != want:
            raise StarflowError(
                f"{source}: block {block.index} (layers {block.layers}, kv_heads {block.kv_heads}, head_dim "
                f"{block.head_dim}, token_dim {token_dim}) does not fit graph {graph.name}: "
                f"{tensor.name} is {list(tensor.shape)}"
            )


def _describe_video(video: Video | None) -> str:
    if video is None:
        return "none (an image export)"
    frames = video.frames
    window = "no window"
    if video.window:
        window = f"window {video.window} frames, context {video.context or video.window - 1}"
    return (
        f"clips of {frames.min}..{frames.max} frames (shown at {video.fps:g} fps), {window}, "
        f"later chunks x{video.later_chunk_factor}, warm start {'on' if video.warm_start else 'off'}"
    )


def _describe_text(text: Text | None) -> str:
    if text is None:
        return "none (unconditional model)"
    line = f"{text.dim}-wide embeddings, up to {text.max_length} tokens, encoder {text.encoder or 'unnamed'}"
    component = text.component
    if component is None:
        return line + "; no text-encoder graph (pass embeddings)"
    if component.classes is not None:
        return (
            line + f"; label table of {len(component.classes)} classes ({', '.join(component.classes[:10])})"
        )
    line += f"; {component.kind} graph {component.graph} from {component.source}"
    return line + (f", SentencePiece model {component.sentencepiece}" if component.sentencepiece else "")


# ---- files and schema ----------------------------------------------------------------------------------
def inside(directory: Path, name: str) -> Path:
    """`directory/name`, refused unless it resolves inside `directory` (symbolic links followed)."""
    path = Path(directory) / name
    if not path.resolve().is_relative_to(Path(directory).resolve()):
        raise StarflowError(f"{directory}: {name!r} leads outside the export directory; refused")
    return path


def schema(name: str = MANIFEST_NAME) -> dict[str, Any]:
    """The committed JSON Schema of manifest.json or record.json (generated: see schema.py)."""
    file = name.replace(".json", ".schema.json")
    return json.loads(resources.files("starflow.contract").joinpath(file).read_text())


def check_schema(data: Any, source: str, name: str = MANIFEST_NAME) -> None:
    """`data` against its file's JSON Schema: the file other languages implement, so Python
    refuses exactly what it refuses (every field stated, defaults or not)."""
    import jsonschema

    try:
        jsonschema.validate(data, schema(name))
    except jsonschema.ValidationError as err:
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        raise StarflowError(f"{source}: {name} does not match its schema at {where}: {err.message}") from None


def _write_json(path: Path, data: Any, name: str = MANIFEST_NAME) -> bytes:
    """`data` written to `path` as JSON, checked first against `name`'s schema and, as the bytes
    to be written, against the reading limits (escapes count): a file starflow writes is one it
    reads. Returns the bytes."""
    check_schema(data, str(path), name)
    text = (json.dumps(data, indent=2) + "\n").encode()
    parse_json(text, str(path))
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(text)
    except OSError as err:
        raise StarflowError(f"{path}: cannot write ({err.strerror or err})") from None
    return text


def _check_version(data: Any, source: str) -> None:
    if isinstance(data, dict) and data.get("schema_version") != SCHEMA_VERSION:
        raise StarflowError(
            f"{source}: schema_version {data.get('schema_version')!r}, this starflow reads "
            f"{SCHEMA_VERSION}; re-export with this starflow"
        )


def _build(adapter: TypeAdapter, data: bytes, source: str) -> Any:
    """The typed value of schema-checked JSON; what the schema cannot state refused here."""
    try:
        return adapter.validate_json(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = "/".join(str(p) for p in first["loc"]) or "(top level)"
        raise StarflowError(f"{source}: at {where}: {first['msg']}") from None


def is_starflow_export(directory: Path) -> bool:
    """Whether `directory` holds a manifest written by starflow (any schema version)."""
    path = directory / MANIFEST_NAME
    try:
        data = parse_json(read_bytes(path, MAX_FILE_BYTES), str(path))
    except StarflowError:
        return False
    return (
        isinstance(data, dict)
        and isinstance(data.get("producer"), dict)
        and data["producer"].get("name") == "starflow"
    )
