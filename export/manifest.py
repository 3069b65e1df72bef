"""The artifact contract: graph signatures, shape profiles and `manifest.json`.

A runtime in any language drives the graphs from the manifest alone: the blocks in sampling
order, every graph's file, sha256, input/output names, dtypes and symbolic dims with their
min/opt/max, and the rules outside the graphs (permutation, guidance, Jacobi defaults, latent
sizes). `manifest.schema.json` beside this file is the normative description of every field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from importlib import resources
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starflow.atomic import atomic_path
from starflow.errors import StarflowError

if TYPE_CHECKING:
    import onnx

    from starflow.config import StarFlowConfig
    from starflow.export.graphs import Precision
    from starflow.export.onnx_export import LatentRange
    from starflow.model import FlowBlock, StarFlow

SCHEMA_VERSION = 3
MANIFEST_NAME = "manifest.json"
VAE_SCALE = 0.18215  # SD-VAE latents are decoded at z / VAE_SCALE
JACOBI_DEFAULTS = {"block_size": 16, "max_iter": 32, "threshold": 1e-3}  # the shipped image script
GUIDANCE_EXPRESSION = (
    "batch [cond ; uncond]; s = min(sigma_c/sigma_u, 1)^2; sigma = sigma_c / sqrt(1 + w - w*s); "
    "mu = ((1 + w)*mu_c - w*s*mu_u) / (1 + w - w*s); both halves receive (mu, sigma)"
)
ONNX_DTYPES = {1: "float32", 10: "float16", 7: "int64"}


# ---- graph signatures ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # float32 | float16 | int64
    shape: tuple[int | str, ...]  # str: a symbolic dim named in the profile

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclasses.dataclass(frozen=True)
class GraphSpec:
    """What one graph must look like; checked against the exported file."""

    block: int | None  # None: a component graph (text_encoder, decoder, denoise)
    kind: str  # step | prefill | forward | text_encoder | decoder | denoise
    precision: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def name(self) -> str:
        prefix = f"block{self.block}." if self.block is not None else ""
        return f"{prefix}{self.kind}.{self.precision}"

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"

    @property
    def dims(self) -> list[str]:
        """The symbolic dims with a profile; derived ones ("8*height") follow from those."""
        names = [
            d for t in self.inputs + self.outputs for d in t.shape if isinstance(d, str) and d.isidentifier()
        ]
        return list(dict.fromkeys(names))

    def check_signature(self, model: onnx.ModelProto) -> None:
        """Fail if a symbolic dim was specialised to a constant (or names/dtypes drifted)."""
        for kind, declared, actual in (
            ("input", self.inputs, model.graph.input),
            ("output", self.outputs, model.graph.output),
        ):
            found = [_tensor_spec(v) for v in actual]
            if found != list(declared):
                raise StarflowError(
                    f"graph {self.name}: exported {kind}s {[t.to_dict() for t in found]} differ from "
                    f"the declared {[t.to_dict() for t in declared]} (a dynamic dim was specialised?)"
                )


def _tensor_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor = value.type.tensor_type
    shape = tuple(d.dim_param if d.dim_param else d.dim_value for d in tensor.shape.dim)
    return TensorSpec(value.name, ONNX_DTYPES.get(tensor.elem_type, str(tensor.elem_type)), shape)


def graph_specs(config: StarFlowConfig, index: int, block: FlowBlock, precision: str) -> list[GraphSpec]:
    """The step, (prefill,) forward graphs of one block; see the README for their contract."""
    D, layers = config.token_dim, len(block.attn_blocks)
    kv, hd = block.num_kv_heads, block.head_dim
    cache_dtype = "float16" if precision == "fp16" else "float32"

    def cache(name: str, length: str) -> TensorSpec:
        return TensorSpec(name, cache_dtype, (layers, "batch", kv, length, hd))

    tokens = TensorSpec("x", "float32", ("batch", "chunk", D))
    grid, start = TensorSpec("grid", "int64", (2,)), TensorSpec("start", "int64", ())
    text = TensorSpec("text", "float32", ("batch", "text", config.txt_dim))
    specs = [
        GraphSpec(
            index,
            "step",
            precision,
            (tokens, cache("past_keys", "past"), cache("past_values", "past"), grid, start),
            (
                TensorSpec("mu", "float32", ("batch", "chunk", D)),
                TensorSpec("sigma", "float32", ("batch", "chunk", D)),
                cache("new_keys", "chunk"),
                cache("new_values", "chunk"),
            ),
        )
    ]
    if block.text_conditioned:
        specs.append(
            GraphSpec(index, "prefill", precision, (text,), (cache("keys", "text"), cache("values", "text")))
        )
    sequence = TensorSpec("x", "float32", ("batch", "tokens", D))
    specs.append(
        GraphSpec(
            index,
            "forward",
            precision,
            (sequence, grid) + ((text,) if block.text_conditioned else ()),
            (
                TensorSpec("z", "float32", ("batch", "tokens", D)),
                TensorSpec("logdet", "float32", ("batch", "tokens", D)),
            ),
        )
    )
    return specs


@dataclasses.dataclass(frozen=True)
class Profile:
    """min/opt/max of every symbolic dim (TensorRT optimization profiles read these)."""

    dims: dict[str, tuple[int, int, int]]
    latent: LatentRange

    @classmethod
    def build(cls, config: StarFlowConfig, latent: LatentRange, max_batch: int) -> Profile:
        p, L = config.patch_size, config.txt_size
        t_min = (latent.min[0] // p) * (latent.min[1] // p)
        t_opt = (config.latent_size // p) ** 2
        t_max = (latent.max[0] // p) * (latent.max[1] // p)
        dims = {
            "batch": (1, 2, 2 * max_batch),  # guidance runs [cond ; uncond]: twice the images
            "tokens": (t_min, t_opt, t_max),
            "chunk": (1, min(JACOBI_DEFAULTS["block_size"], t_opt), t_max),
            "past": (0, L + t_opt // 2, L + t_max - 1),
            # whole latents (decoder and denoise graphs), in latent pixels
            "height": (latent.min[0], config.latent_size, latent.max[0]),
            "width": (latent.min[1], config.latent_size, latent.max[1]),
        }
        if L > 0:
            dims["text"] = (1, L, L)
        return cls(dims, latent)


@dataclasses.dataclass
class ComponentEntries:
    """The manifest entries of the pipeline components of one export."""

    text: dict[str, Any] | None = None  # the `text.component` entry
    decoder: dict[str, Any] = dataclasses.field(default_factory=lambda: {"kind": "identity"})
    denoise: dict[str, Any] | None = None
    graphs: list[GraphSpec] = dataclasses.field(default_factory=list)
    files: list[str] = dataclasses.field(default_factory=list)  # non-graph files, relative paths


# ---- files -----------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(directory: Path, name: str) -> dict[str, Any]:
    path = directory / name
    return {"file": name, "sha256": sha256(path), "bytes": path.stat().st_size}


def graph_file_entry(spec: GraphSpec, directory: Path, profile: Profile) -> dict[str, Any]:
    """The manifest entry of an exported graph: files with sha256, signature, profile."""
    path = directory / spec.file
    data = directory / f"{spec.file}.data"
    external = (
        [{"file": data.name, "sha256": sha256(data), "bytes": data.stat().st_size}] if data.exists() else []
    )
    return {
        "name": spec.name,
        "block": spec.block,
        "kind": spec.kind,
        "precision": spec.precision,
        "file": spec.file,
        "sha256": sha256(path),
        "bytes": path.stat().st_size,
        "external_data": external,
        "inputs": [t.to_dict() for t in spec.inputs],
        "outputs": [t.to_dict() for t in spec.outputs],
        "profile": {d: dict(zip(("min", "opt", "max"), profile.dims[d], strict=True)) for d in spec.dims},
    }


def build_manifest(
    model: StarFlow,
    checkpoint: str | Path,
    blocks: list[tuple[int, FlowBlock]],
    graphs: list[dict[str, Any]],
    profile: Profile,
    opset: int,
    precisions: dict[str, Precision],
    components: ComponentEntries,
    directory: Path,
) -> dict[str, Any]:
    """Everything a runtime needs, in one JSON document (see manifest.schema.json)."""
    import torch

    from starflow.export.validate import TOLERANCES

    config = model.config
    used = sorted({g["precision"] for g in graphs})
    n = config.num_blocks
    block_entries = []
    for index, block in blocks:
        heads, kv_heads = config.heads(block.proj_in.out_features)
        names = {
            p: {g["kind"]: g["name"] for g in graphs if g["block"] == index and g["precision"] == p}
            for p in used
        }
        block_entries.append(
            {
                "index": index,
                "role": "deep" if index == n - 1 else "shallow",
                "permutation": "flip" if block.flip else "identity",
                "layers": len(block.attn_blocks),
                "width": block.proj_in.out_features,
                "heads": heads,
                "kv_heads": kv_heads,
                "head_dim": block.head_dim,
                "text_conditioned": block.text_conditioned,
                "sos_embed": block.sos_embed.detach().float().reshape(-1).tolist(),
                "graphs": names,
            }
        )
    p = config.patch_size
    return {
        "schema_version": SCHEMA_VERSION,
        "producer": {
            "name": "starflow",
            "version": version("starflow"),
            "torch": torch.__version__,
            "opset": opset,
        },
        "source": {"checkpoint": Path(checkpoint).name, "sha256": sha256(Path(checkpoint))},
        "model": {k: v for k, v in config.to_dict().items() if k != "extra"},
        "latent": {
            "channels": config.channel_size,
            "patch_size": p,
            "token_dim": config.token_dim,
            "train": [config.latent_size, config.latent_size],
            "min": list(profile.latent.min),
            "max": list(profile.latent.max),
            "multiple_of": p,
        },
        "text": (
            {
                "encoder": config.text,
                "dim": config.txt_dim,
                "max_length": config.txt_size,
                "component": components.text,
            }
            if config.txt_dim > 0
            else None
        ),
        "decoder": components.decoder,
        "denoise": components.denoise,
        "files": [file_entry(directory, name) for name in components.files],
        "guidance": {
            "formula": "starflow-cfg",
            "expression": GUIDANCE_EXPRESSION,
            "default_weight": config.cfg,
            "blocks": "deep" if config.cond_top_only else "all",
        },
        "jacobi": dict(JACOBI_DEFAULTS),
        "noise_std": config.noise_std,
        "dims": {d: dict(zip(("min", "opt", "max"), v, strict=True)) for d, v in profile.dims.items()},
        "precisions": {
            name: {
                "tolerance": dataclasses.asdict(TOLERANCES[name]),
                "fp32_ops": _fp32_ops(precisions[name]),
            }
            for name in used
        },
        "blocks": block_entries,
        "graphs": graphs,
        "validation": [],
    }


def _fp32_ops(precision: Precision) -> list[str]:
    """Which computations stay fp32 in this precision (all of them in fp32 graphs)."""
    ops = ["rope", "flow_head", "rms_norm"]
    if precision.name == "fp32" or precision.fp32_norms:
        ops.append("layer_norm")
    if precision.name == "fp32" or precision.fp32_softmax:
        ops.append("softmax")
    if precision.name == "fp32":
        ops.append("matmul")
    return ops


# ---- reading and writing ---------------------------------------------------------------------
def schema() -> dict[str, Any]:
    return json.loads(resources.files("starflow.export").joinpath("manifest.schema.json").read_text())


def check_schema(manifest: Any, source: str) -> None:
    import jsonschema

    try:
        jsonschema.validate(manifest, schema())
    except jsonschema.ValidationError as err:
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        raise StarflowError(
            f"{source}: manifest does not match its schema at {where}: {err.message}"
        ) from None


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Validate against the schema, then write atomically."""
    check_schema(manifest, str(directory / MANIFEST_NAME))
    with atomic_path(directory / MANIFEST_NAME) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")


def load_manifest(directory: str | Path, verify_files: bool = True) -> dict[str, Any]:
    """Read and schema-check a manifest; with `verify_files`, every file's sha256 too."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise StarflowError(f"{directory}: no {MANIFEST_NAME}; not a starflow export directory")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise StarflowError(f"{path}: not valid JSON ({err})") from None
    if isinstance(manifest, dict) and manifest.get("schema_version") != SCHEMA_VERSION:
        raise StarflowError(
            f"{path}: schema_version {manifest.get('schema_version')!r}, this starflow reads {SCHEMA_VERSION}"
        )
    check_schema(manifest, str(path))
    if verify_files:
        owned = [(f"graph {g['name']}", e) for g in manifest["graphs"] for e in [g, *g["external_data"]]]
        for owner, entry in owned + [(f"file {f['file']}", f) for f in manifest["files"]]:
            file = directory / entry["file"]
            if not file.is_file():
                raise StarflowError(f"{owner}: file {file} is missing")
            if sha256(file) != entry["sha256"]:
                raise StarflowError(f"{owner}: {file} does not match its sha256 in the manifest")
    return manifest


def is_starflow_export(directory: Path) -> bool:
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(manifest, dict) and manifest.get("producer", {}).get("name") == "starflow"


def summarize(directory: str | Path) -> str:
    """A human-readable summary of an export (what `starflow inspect` prints)."""
    manifest = load_manifest(directory, verify_files=False)
    latent = manifest["latent"]
    lines = [
        f"starflow export (schema {manifest['schema_version']}, starflow {manifest['producer']['version']}, "
        f"opset {manifest['producer']['opset']}) from {manifest['source']['checkpoint']}",
        f"latent: {latent['channels']} channels, patch {latent['patch_size']}, "
        f"{latent['min'][0]}x{latent['min'][1]} .. {latent['max'][0]}x{latent['max'][1]} "
        f"(multiples of {latent['multiple_of']}, trained at {latent['train'][0]}x{latent['train'][1]})",
        f"text: {manifest['text']}" if manifest["text"] else "text: none",
        f"guidance: {manifest['guidance']['formula']} on {manifest['guidance']['blocks']} block(s), "
        f"default weight {manifest['guidance']['default_weight']}; jacobi: {manifest['jacobi']}",
        "dims: " + ", ".join(f"{d} {v['min']}/{v['opt']}/{v['max']}" for d, v in manifest["dims"].items()),
        "blocks (sampling order):",
    ]
    for b in manifest["blocks"]:
        lines.append(
            f"  block {b['index']} {b['role']:7} {b['permutation']:8} layers {b['layers']} "
            f"width {b['width']} "
            f"heads {b['heads']}/{b['kv_heads']} head_dim {b['head_dim']}"
            + (" text" if b["text_conditioned"] else "")
        )
    lines.append("precisions:")
    for name, p in manifest["precisions"].items():
        lines.append(f"  {name}: tolerance {p['tolerance']}, fp32 ops {p['fp32_ops']}")
    lines.append("graphs:")
    for g in manifest["graphs"]:
        size = g["bytes"] + sum(e["bytes"] for e in g["external_data"])
        lines.append(f"  {g['file']:32} {size / 2**20:9.1f} MiB  sha256 {g['sha256'][:12]}")
    failed = [v for v in manifest["validation"] if not v["passed"]]
    lines.append(
        f"validation: {len(manifest['validation'])} comparisons, {len(failed)} failed"
        if manifest["validation"]
        else "validation: not run (--no-validate)"
    )
    return "\n".join(lines)
