"""The artifact contract: `manifest.json` as typed, frozen dataclasses.

A runtime in any language drives the graphs from the manifest alone: the blocks in sampling
order, every graph's file, sha256, input/output names, dtypes and symbolic dims with their
min/opt/max, and the rules outside the graphs (permutation, guidance, Jacobi defaults, latent
sizes). `manifest.schema.json` beside this file is the normative description of every field;
these classes mirror it one to one, and every writer (ONNX export, TensorRT engines) and reader
(the runtime, `starflow inspect`) goes through them. numpy-free and torch-free.
"""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from pathlib import Path
from typing import Any

import dacite

from starflow.atomic import atomic_path
from starflow.errors import StarflowError
from starflow.export.entries import (
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
    Latent,
    PrecisionInfo,
    Producer,
    Range,
    Source,
    TensorSpec,
    Text,
    TextComponent,
    Tolerance,
    sha256,
)

SCHEMA_VERSION = 3
MANIFEST_NAME = "manifest.json"
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
    "Latent",
    "PrecisionInfo",
    "Producer",
    "Range",
    "Source",
    "TensorSpec",
    "Text",
    "TextComponent",
    "Tolerance",
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
    files: tuple[FileEntry, ...]
    guidance: Guidance
    jacobi: Jacobi
    noise_std: float
    dims: dict[str, Range]
    precisions: dict[str, PrecisionInfo]
    blocks: tuple[Block, ...]  # sampling order: deep block first
    graphs: tuple[Graph, ...]
    validation: tuple[Comparison, ...]
    engines: tuple[Engine, ...] = ()

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
            return dacite.from_dict(cls, data, config=dacite.Config(cast=[tuple], strict=True))
        except dacite.DaciteError as err:  # the schema admits something the classes do not
            raise StarflowError(f"{source}: {err}") from None

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
            path = directory / entry.file
            if not path.is_file():
                raise StarflowError(f"{owner}: file {path} is missing")
            if sha256(path) != entry.sha256:
                raise StarflowError(f"{owner}: {path} does not match its sha256 in the manifest")

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)

    def write(self, directory: Path) -> None:
        """Validate against the schema, then write atomically."""
        data = self.to_dict()
        check_schema(data, str(directory / MANIFEST_NAME))
        with atomic_path(directory / MANIFEST_NAME) as tmp:
            tmp.write_text(json.dumps(data, indent=2) + "\n")

    def summary(self) -> str:
        """A human-readable summary (what `starflow inspect` prints)."""
        latent, guidance = self.latent, self.guidance
        lines = [
            f"starflow export (schema {self.schema_version}, starflow {self.producer.version}, "
            f"opset {self.producer.opset}) from {self.source.checkpoint}",
            f"latent: {latent.channels} channels, patch {latent.patch_size}, {latent.describe_range()} "
            f"(multiples of {latent.multiple_of}, trained at {latent.train[0]}x{latent.train[1]})",
            "text: " + _describe_text(self.text),
            f"guidance: {guidance.formula} on {guidance.blocks} block(s), default weight "
            f"{guidance.default_weight:g}; jacobi: block {self.jacobi.block_size}, max_iter "
            f"{self.jacobi.max_iter}, threshold {self.jacobi.threshold:g}",
            "dims: " + ", ".join(f"{d} {r.min}/{r.opt}/{r.max}" for d, r in self.dims.items()),
            "blocks (sampling order):",
        ]
        for b in self.blocks:
            lines.append(
                f"  block {b.index} {b.role:7} {b.permutation:8} layers {b.layers} width {b.width} "
                f"heads {b.heads}/{b.kv_heads} head_dim {b.head_dim}"
                + (" text" if b.text_conditioned else "")
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
def schema() -> dict[str, Any]:
    return json.loads(resources.files("starflow.export").joinpath("manifest.schema.json").read_text())


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
