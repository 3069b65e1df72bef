"""The artifact contract: `manifest.json` as typed, frozen dataclasses.

A runtime in any language drives the graphs from the manifest alone: the blocks in sampling
order, every graph's file, sha256, input/output names, dtypes and symbolic dims with their
min/opt/max, and the rules outside the graphs (permutation, guidance, Jacobi defaults, latent
sizes). `manifest.schema.json` beside this file is the normative description of every field;
these classes mirror it one to one, and every writer (ONNX export, TensorRT engines) and reader
(the runtime, `starflow inspect`) goes through them. numpy-free and torch-free.

What loading checks, so that a directory a service did not make cannot point it elsewhere or
change its numbers unnoticed: the schema (unknown keys refused, every file a plain name), that
every name refers to a graph of the right kind and every block to graphs of its own shape, that
every file resolves inside the directory (symbolic links included) and matches its sha256, and
`digest`: the sha256 of the fields that decide the numbers (everything but the validation
record and the engines), written at export, so an edited manifest is refused. The digest
detects edits, not forgery: whoever can write the directory can rewrite it (`starflow validate`
compares the fields with the checkpoint).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any

import dacite

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
    Jacobi,
    JacobiPreset,
    Latent,
    PrecisionInfo,
    Producer,
    Range,
    SamplingPreset,
    Source,
    TensorSpec,
    Text,
    TextComponent,
    Tolerance,
    Video,
    sha256,
)
from starflow.core.atomic import atomic_path
from starflow.core.errors import StarflowError
from starflow.core.sampler import SampleOptions
from starflow.core.sampling_presets import OFFICIAL, check_preset_name, choose

SCHEMA_VERSION = 6
MANIFEST_NAME = "manifest.json"
UNDIGESTED = ("digest", "validation", "engines")  # written after the export; no effect on samples
VAE_SCALE = 0.18215  # SD-VAE latents are decoded at z / VAE_SCALE
GUIDANCE_EXPRESSION = (
    "batch [cond ; uncond]; s = min(sigma_c/sigma_u, 1)^2; sigma = sigma_c / sqrt(1 + w - w*s); "
    "mu = ((1 + w)*mu_c - w*s*mu_u) / (1 + w - w*s); both halves receive (mu, sigma)"
)
__all__ = [  # the whole contract, entries included
    "GUIDANCE_EXPRESSION",
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "VAE_SCALE",
    "Manifest",
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
    "Jacobi",
    "JacobiPreset",
    "Latent",
    "PrecisionInfo",
    "Producer",
    "Range",
    "SamplingPreset",
    "Source",
    "TensorSpec",
    "Text",
    "TextComponent",
    "Tolerance",
    "Video",
    "sha256",
]


# ---- the manifest ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Manifest:
    schema_version: int
    producer: Producer
    source: Source
    model: dict[str, Any]  # the StarFlowConfig fields, for provenance and `starflow validate`
    latent: Latent
    text: Text | None
    decoder: Decoder
    denoise: Denoise | None
    video: Video | None  # None: an image export
    files: tuple[FileEntry, ...]
    guidance: Guidance
    jacobi: Jacobi
    sampling_presets: dict[str, SamplingPreset]  # opt-in, calibrated for this model; {} for most
    noise_std: float
    dims: dict[str, Range]
    precisions: dict[str, PrecisionInfo]
    blocks: tuple[Block, ...]  # sampling order: deep block first
    graphs: tuple[Graph, ...]
    validation: tuple[Comparison, ...]
    engines: tuple[Engine, ...] = ()
    digest: str = ""  # sha256 of every field but UNDIGESTED; `write` fills it in

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
        one of its named sampling presets."""
        official = SampleOptions(guidance=self.guidance.default_weight, jacobi=self.jacobi.settings())
        presets = {name: p.options() for name, p in self.sampling_presets.items()}
        options = choose(preset, official, presets, "this export")
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

    def images_per_batch(self, guidance: float) -> int:
        return self.max_rows // 2 if guidance > 0 else self.max_rows

    # -- reading and writing --
    @classmethod
    def from_dict(cls, data: Any, source: str) -> Manifest:
        """Schema-check a parsed manifest.json and build the typed manifest."""
        if isinstance(data, dict) and data.get("schema_version") != SCHEMA_VERSION:
            raise StarflowError(
                f"{source}: schema_version {data.get('schema_version')!r}, "
                f"this starflow reads {SCHEMA_VERSION}"
            )
        check_schema(data, source)
        try:
            manifest = dacite.from_dict(cls, data, config=dacite.Config(cast=[tuple], strict=True))
        except dacite.DaciteError as err:  # the schema admits something the classes do not
            raise StarflowError(f"{source}: {err}") from None
        if manifest.digest != manifest.semantic_digest():
            raise StarflowError(
                f"{source}: its fields changed since the export (digest mismatch): the graphs would be "
                "driven by settings they were not validated with; re-export instead of editing"
            )
        manifest.check_references(source)
        return manifest

    def semantic_digest(self) -> str:
        """sha256 over the canonical JSON of every field that decides the numbers."""
        fields = {k: v for k, v in self.to_dict().items() if k not in UNDIGESTED}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    def check_references(self, source: str) -> None:
        """Every name refers to a graph of the right kind; every block's graphs have its shape."""
        graphs = {g.name: g for g in self.graphs}
        for name, preset in self.sampling_presets.items():
            check_preset_name(name, source)
            try:
                preset.options().check()
            except StarflowError as err:
                raise StarflowError(f"{source}: sampling preset {name!r}: {err}") from None

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
        refer(self.decoder.graph, "decoder", "decoder")
        refer(self.denoise.graph if self.denoise else None, "denoise", "denoise")
        for engine in self.engines:
            if engine.graph not in graphs or graphs[engine.graph].block is None:
                raise StarflowError(
                    f"{source}: engine {engine.file} names {engine.graph!r}, no flow-block graph here"
                )

    @classmethod
    def load(cls, directory: str | Path, verify_files: bool = True) -> Manifest:
        """Read and schema-check `directory/manifest.json`; with `verify_files`, every sha256 too."""
        directory = Path(directory)
        path = directory / MANIFEST_NAME
        if not path.is_file():
            raise StarflowError(f"{directory}: no {MANIFEST_NAME}; not a starflow export directory")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise StarflowError(f"{path}: not valid JSON ({err})") from None
        manifest = cls.from_dict(data, str(path))
        if verify_files:
            manifest.verify_files(directory)
        return manifest

    def verify_files(self, directory: Path) -> None:
        """Every graph, external-data and other file exists and matches its sha256."""
        owned = [(f"graph {g.name}", e) for g in self.graphs for e in (g, *g.external_data)]
        for owner, entry in owned + [(f"file {f.file}", f) for f in self.files]:
            path = inside(directory, entry.file)
            if not path.is_file():
                raise StarflowError(f"{owner}: file {path} is missing")
            if sha256(path) != entry.sha256:
                raise StarflowError(f"{owner}: {path} does not match its sha256 in the manifest")

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)

    def write(self, directory: Path) -> Manifest:
        """Fill in the digest, validate against the schema, write atomically; returns what was written."""
        manifest = dataclasses.replace(self, digest=self.semantic_digest())
        data = manifest.to_dict()
        check_schema(data, str(directory / MANIFEST_NAME))
        try:
            with atomic_path(directory / MANIFEST_NAME) as tmp:
                tmp.write_text(json.dumps(data, indent=2) + "\n")
        except OSError as err:
            raise StarflowError(
                f"{directory / MANIFEST_NAME}: cannot write ({err.strerror or err})"
            ) from None
        return manifest

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
    return line + f"; {component.kind} graph {component.graph} from {component.source}"


def _plain(value: Any) -> Any:
    """Dataclasses -> JSON-ready dicts and lists, in field order (the schema's key names)."""
    if isinstance(value, Decoder):
        return value.to_json()
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# ---- files and schema ----------------------------------------------------------------------------------
def inside(directory: Path, name: str) -> Path:
    """`directory/name`, refused unless it resolves inside `directory` (symbolic links followed)."""
    path = Path(directory) / name
    if not path.resolve().is_relative_to(Path(directory).resolve()):
        raise StarflowError(f"{directory}: {name!r} leads outside the export directory; refused")
    return path


def schema() -> dict[str, Any]:
    return json.loads(resources.files("starflow.contract").joinpath("manifest.schema.json").read_text())


def check_schema(data: Any, source: str) -> None:
    import jsonschema

    try:
        jsonschema.validate(data, schema())
    except jsonschema.ValidationError as err:
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        raise StarflowError(
            f"{source}: manifest does not match its schema at {where}: {err.message}"
        ) from None


def is_starflow_export(directory: Path) -> bool:
    """Whether `directory` holds a manifest written by starflow (any schema version)."""
    try:
        data = json.loads((directory / MANIFEST_NAME).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return (
        isinstance(data, dict)
        and isinstance(data.get("producer"), dict)
        and data["producer"].get("name") == "starflow"
    )
