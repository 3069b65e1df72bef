"""`starflow export trt`: one TensorRT engine per exported graph, cached by what it depends on.

Engines come from the directory's own ONNX graphs, so the manifest stays the single contract:
an `engines` entry per graph records the file, its sha256, the builder and version, the
optimization profiles, precision, target GPUs and a cache key. The key hashes everything an
engine depends on (ONNX sha256s, profiles, precision, builder name and version, targets, builder
level and workspace), so a rerun on an unchanged directory builds nothing, and a changed input
rebuilds exactly the engines it touches. Engines and the manifest are written atomically (temp
file, then rename), after each engine, so an interrupted build keeps what it finished.

Two builders share one API: NVIDIA's full `tensorrt` (needs the GPU it builds for) and
`tensorrt_rtx` (TensorRT for RTX; builds ahead of time on a machine with no GPU, for the compute
capabilities named). Running an engine always needs a GPU (`starflow.runtime.trt_backend`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from starflow.atomic import atomic_path
from starflow.errors import StarflowError
from starflow.export.manifest import load_manifest, sha256, write_manifest
from starflow.runtime.sizes import parse_hw

Progress = Callable[[str, int, int], None]  # (what is being done, steps done, steps in all)
Range = tuple[int, int, int]  # min, opt, max

MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}  # --builder value -> module
INSTALL_HINT = (
    "pip install 'starflow[tensorrt-rtx]' (tensorrt-rtx-cu13 + tensorrt-rtx-cu13-bindings: builds "
    "engines without a GPU), or NVIDIA's full TensorRT (pip install tensorrt) on the GPU machine"
)
PROFILE_KINDS = ("default", "sequential", "jacobi")
TIMING_CACHE = "timing.cache"  # full TensorRT only: TensorRT-RTX timing-cache calls are no-ops
DEFAULT_OPTIMIZATION_LEVEL = 3
TURING = ("SM75",)


# ---- builders --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Builder:
    """An importable TensorRT module: `tensorrt` or `tensorrt_rtx` (same Python API)."""

    name: str  # the module name, recorded in the manifest
    module: ModuleType

    @property
    def version(self) -> str:
        return str(self.module.__version__)

    @property
    def rtx(self) -> bool:
        return self.name == "tensorrt_rtx"


def import_module(name: str) -> ModuleType | None:
    """The module, or None when it (or its native libraries) cannot be loaded."""
    try:
        return importlib.import_module(name)
    except (ImportError, OSError):
        return None


def choose_builder(requested: str = "auto") -> Builder:
    """`tensorrt` when importable (it targets the GPU present), else `tensorrt_rtx`."""
    if requested != "auto" and requested not in MODULES:
        raise StarflowError(f"--builder: expected auto or one of {list(MODULES)}, got {requested!r}")
    names = [MODULES[requested]] if requested != "auto" else list(MODULES.values())
    for name in names:
        module = import_module(name)
        if module is not None:
            return Builder(name, module)
    what = "TensorRT" if requested == "auto" else f"the {names[0]} module"
    raise StarflowError(f"{what} is not installed (or its libraries do not load): {INSTALL_HINT}")


def rtx_compute_capabilities(builder: Builder) -> list[str]:
    """Every GPU architecture this TensorRT-RTX can build for (SM75 ... SM121)."""
    return [n for n in builder.module.ComputeCapability.__members__ if n.startswith("SM")]


def default_rtx_targets(builder: Builder) -> list[str]:
    """Ampere and newer: TensorRT-RTX has no FP32 GEMM for Turing (SM75), so it is opt-in."""
    return [c for c in rtx_compute_capabilities(builder) if c not in TURING]


def current_gpu() -> tuple[str, str]:
    """(compute capability as 'SM90', device name) of CUDA device 0, through cuda-python."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        raise StarflowError(
            "full TensorRT builds for the GPU present; naming it in the engine cache key needs "
            "cuda-python (pip install cuda-python)"
        ) from None
    err, props = cudart.cudaGetDeviceProperties(0)
    if err != cudart.cudaError_t.cudaSuccess:
        raise StarflowError(f"full TensorRT needs a CUDA GPU to build on: cudaGetDeviceProperties: {err}")
    return f"SM{props.major}{props.minor}", props.name.decode().rstrip("\x00")


def resolve_targets(builder: Builder, requested: Sequence[str]) -> tuple[list[str], str | None]:
    """(compute capabilities, device name or None) the engines are built for."""
    if not builder.rtx:
        if requested:
            raise StarflowError(
                "--compute-capability applies to TensorRT-RTX only; full TensorRT builds for the GPU present"
            )
        capability, device = current_gpu()
        return [capability], device
    known = rtx_compute_capabilities(builder)
    wanted = [c.upper() for c in requested] or default_rtx_targets(builder)
    unknown = [c for c in wanted if c not in known]
    if unknown:
        raise StarflowError(
            f"--compute-capability {unknown}: TensorRT-RTX {builder.version} builds for {known}"
        )
    return list(dict.fromkeys(wanted)), None


# ---- profiles --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EngineProfile:
    """One TensorRT optimization profile: min/opt/max of the symbolic dims it names."""

    name: str
    dims: dict[str, Range]

    def restrict(self, names: Sequence[str]) -> EngineProfile:
        return EngineProfile(self.name, {d: self.dims[d] for d in names})

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dims": {d: dict(zip(("min", "opt", "max"), r, strict=True)) for d, r in self.dims.items()},
        }

    @classmethod
    def from_dict(cls, entry: dict[str, Any]) -> EngineProfile:
        return cls(entry["name"], {d: (r["min"], r["opt"], r["max"]) for d, r in entry["dims"].items()})


def parse_range(text: str, option: str) -> Range:
    """'N' (1..N, opt N) or 'MIN:OPT:MAX' -> (min, opt, max)."""
    try:
        values = [int(v) for v in text.split(":")]
    except ValueError:
        values = []
    if len(values) == 1:
        values = [1, values[0], values[0]]
    if len(values) != 3 or not 0 < values[0] <= values[1] <= values[2]:
        raise StarflowError(f"{option}: expected N or MIN:OPT:MAX with 0 < MIN <= OPT <= MAX, got {text!r}")
    return values[0], values[1], values[2]


def parse_grid(text: str) -> tuple[int, int]:
    """'HxW' token grid -> (h, w)."""
    return parse_hw(text, "--grid", "tokens (latent size / patch size)", "8x12")


def _within(inner: Range, outer: Range) -> bool:
    return outer[0] <= inner[0] and inner[2] <= outer[2]


def derive_profiles(
    manifest: dict[str, Any],
    kinds: Sequence[str] = ("default",),
    grids: Sequence[tuple[int, int]] = (),
    batch: Range | None = None,
    jacobi_chunk: int | None = None,
) -> list[EngineProfile]:
    """Directory-wide profiles from the manifest's dims: named kinds, then one per token grid.

    default: the exported ranges; sequential: chunk 1; jacobi: chunks up to the Jacobi block
    (1..c, tuned for c); grid HxW: one resolution bucket, tokens = H*W and chunk/past sized for
    it. `batch` replaces every profile's batch range and must lie inside the exported one.
    """
    dims: dict[str, Range] = {d: (r["min"], r["opt"], r["max"]) for d, r in manifest["dims"].items()}
    unknown = [k for k in kinds if k not in PROFILE_KINDS]
    if unknown:
        raise StarflowError(f"--profile {unknown}: choose from {list(PROFILE_KINDS)} (and --grid HxW)")
    if batch is not None:
        if not _within(batch, dims["batch"]):
            lo, _, hi = dims["batch"]
            raise StarflowError(f"--batch {batch[0]}:{batch[1]}:{batch[2]}: the graphs allow rows {lo}..{hi}")
        dims["batch"] = batch
    chunk_max = dims["chunk"][2]
    c = min(jacobi_chunk or manifest["jacobi"]["block_size"], chunk_max)
    if c < 1:
        raise StarflowError(f"--jacobi-chunk: must be >= 1, got {jacobi_chunk}")
    profiles = []
    for kind in dict.fromkeys(kinds):
        chunk = {"default": dims["chunk"], "sequential": (1, 1, 1), "jacobi": (1, c, c)}[kind]
        profiles.append(EngineProfile(kind, {**dims, "chunk": chunk}))
    latent = manifest["latent"]
    p = latent["patch_size"]
    lo, hi = (latent["min"][0] // p, latent["min"][1] // p), (latent["max"][0] // p, latent["max"][1] // p)
    text = dims["text"][2] if "text" in dims else 0
    for h, w in dict.fromkeys(grids):
        if not (lo[0] <= h <= hi[0] and lo[1] <= w <= hi[1]):
            raise StarflowError(
                f"--grid {h}x{w}: this export covers token grids {lo[0]}x{lo[1]} .. {hi[0]}x{hi[1]} "
                f"(latent {latent['min'][0]}x{latent['min'][1]} .. {latent['max'][0]}x{latent['max'][1]} "
                f"at patch size {p})"
            )
        t = h * w
        grid_dims = {
            **dims,
            "tokens": (t, t, t),
            "chunk": (1, min(c, t), t),
            "past": (dims["past"][0], text + t // 2, text + t - 1),
        }
        profiles.append(EngineProfile(f"grid {h}x{w}", grid_dims))
    if not profiles:
        raise StarflowError("no profiles: pass --profile and/or --grid")
    return profiles


def graph_profiles(graph: dict[str, Any], profiles: Sequence[EngineProfile]) -> list[EngineProfile]:
    """The profiles restricted to one graph's dims, duplicates dropped (first name kept)."""
    out: list[EngineProfile] = []
    for profile in profiles:
        mine = profile.restrict(list(graph["profile"]))
        if all(mine.dims != seen.dims for seen in out):
            out.append(mine)
    return out


def input_shapes(graph: dict[str, Any], profile: EngineProfile) -> dict[str, tuple[list[int], ...]]:
    """Input name -> (min, opt, max) shapes, the symbolic dims replaced by the profile's."""
    return {
        t["name"]: tuple(
            [profile.dims[d][i] if isinstance(d, str) else d for d in t["shape"]] for i in range(3)
        )
        for t in graph["inputs"]
    }


# ---- cache keys ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BuildSettings:
    """Everything besides the graph and profiles that an engine depends on."""

    builder: str
    version: str
    compute_capabilities: tuple[str, ...]
    device: str | None
    optimization_level: int
    workspace_bytes: int | None


def cache_key(graph: dict[str, Any], profiles: Sequence[EngineProfile], settings: BuildSettings) -> str:
    """sha256 over the engine's inputs; any change to them makes a new key."""
    material = {
        "onnx": [graph["sha256"], *(e["sha256"] for e in graph["external_data"])],
        "precision": graph["precision"],
        "profiles": [p.to_dict() for p in profiles],
        "settings": dataclasses.asdict(settings),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


# ---- one engine ------------------------------------------------------------------------------
def _logger(trt: ModuleType) -> Any:
    """A TensorRT logger that keeps error messages, so failures can quote TensorRT itself."""

    class Log(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(msg)

    return Log()


def _monitor(trt: ModuleType, phases: Progress) -> Any:
    """A TensorRT progress monitor reporting (phase, steps done, steps) to `phases`."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.steps: dict[str, int] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self.steps[phase_name] = num_steps
            phases(phase_name, 0, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            phases(phase_name, step + 1, self.steps.get(phase_name, step + 1))
            return True  # keep building

        def phase_finish(self, phase_name: str) -> None:
            total = self.steps.pop(phase_name, 1)
            phases(phase_name, total, total)

    return Monitor()


def build_engine(
    builder: Builder,
    onnx_path: Path,
    graph: dict[str, Any],
    profiles: Sequence[EngineProfile],
    settings: BuildSettings,
    timing_cache: Path | None = None,
    phases: Progress | None = None,
) -> bytes:
    """Parse the ONNX file and build a serialized engine; TensorRT's errors become StarflowError."""
    trt = builder.module
    log = _logger(trt)
    trt_builder = trt.Builder(log)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = trt_builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] + log.errors
        raise StarflowError(f"engine {graph['name']}: TensorRT cannot parse {onnx_path.name}: {errors}")
    config = trt_builder.create_builder_config()
    config.builder_optimization_level = settings.optimization_level
    if settings.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    if phases is not None:
        config.progress_monitor = _monitor(trt, phases)
    if builder.rtx:
        config.num_compute_capabilities = len(settings.compute_capabilities)
        for i, capability in enumerate(settings.compute_capabilities):
            config.set_compute_capability(getattr(trt.ComputeCapability, capability), i)
    elif timing_cache is not None:
        blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
        config.set_timing_cache(config.create_timing_cache(blob), ignore_mismatch=True)
    for profile in profiles:
        trt_profile = trt_builder.create_optimization_profile()
        try:
            for name, (low, opt, high) in input_shapes(graph, profile).items():
                trt_profile.set_shape(name, low, opt, high)
        except (RuntimeError, TypeError, ValueError) as err:
            raise StarflowError(
                f"engine {graph['name']}: profile {profile.name!r} rejected by TensorRT: {err} {log.errors}"
            ) from None
        if config.add_optimization_profile(trt_profile) < 0:
            raise StarflowError(
                f"engine {graph['name']}: profile {profile.name!r} {profile.to_dict()['dims']} rejected "
                f"by TensorRT: {log.errors}"
            )
    serialized = trt_builder.build_serialized_network(network, config)
    if serialized is None:
        raise StarflowError(
            f"engine {graph['name']}: {builder.name} {builder.version} failed to build (profiles "
            f"{[p.name for p in profiles]}, targets {list(settings.compute_capabilities)}): "
            + ("; ".join(log.errors) or "TensorRT gave no error text")
        )
    if timing_cache is not None and not builder.rtx:
        with atomic_path(timing_cache) as tmp:
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


# ---- a directory -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EngineResult:
    """What happened to one graph's engine."""

    graph: str
    file: str
    built: bool  # False: the cached engine's key matched
    seconds: float
    bytes: int


def engine_file(graph: dict[str, Any]) -> str:
    return f"{graph['name']}.engine"


def _cached(directory: Path, entry: dict[str, Any] | None, key: str) -> bool:
    if entry is None or entry["cache_key"] != key:
        return False
    path = directory / entry["file"]
    return path.is_file() and sha256(path) == entry["sha256"]


def build_engines(
    directory: str | Path,
    *,
    builder: str = "auto",
    precisions: Sequence[str] = (),
    profiles: Sequence[str] = ("default",),
    grids: Sequence[tuple[int, int]] = (),
    batch: Range | None = None,
    jacobi_chunk: int | None = None,
    optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL,
    workspace_bytes: int | None = None,
    compute_capabilities: Sequence[str] = (),
    progress: Progress | None = None,
    phases: Progress | None = None,
) -> list[EngineResult]:
    """Build (or keep, when its key is unchanged) an engine for every graph of the precisions.

    `precisions` empty means all in the manifest. `progress` hears per engine, `phases` per
    TensorRT build phase. Every argument is checked before the first build starts.
    """
    directory = Path(directory)
    manifest = load_manifest(directory)
    available = sorted(manifest["precisions"])
    missing = [p for p in precisions if p not in available]
    if missing:
        raise StarflowError(f"--precision {missing}: {directory} has graphs in {available}")
    if not 0 <= optimization_level <= 5:
        raise StarflowError(f"--optimization-level: expected 0..5, got {optimization_level}")
    if workspace_bytes is not None and workspace_bytes <= 0:
        raise StarflowError(f"--workspace: must be positive, got {workspace_bytes} bytes")
    chosen = derive_profiles(manifest, profiles, grids, batch, jacobi_chunk)
    trt = choose_builder(builder)
    targets, device = resolve_targets(trt, compute_capabilities)
    settings = BuildSettings(
        trt.name, trt.version, tuple(targets), device, optimization_level, workspace_bytes
    )
    # Flow-block graphs only: the components (text encoder, decoder, denoise) run once per image
    # and stay on ONNX Runtime; engines for them are not built yet.
    graphs = [
        g
        for g in manifest["graphs"]
        if g["block"] is not None and g["precision"] in (precisions or available)
    ]
    entries = {e["graph"]: e for e in manifest.get("engines", [])}
    timing_cache = None if trt.rtx else directory / TIMING_CACHE
    results = []
    for done, graph in enumerate(graphs):
        mine = graph_profiles(graph, chosen)
        key = cache_key(graph, mine, settings)
        file = engine_file(graph)
        if _cached(directory, entries.get(graph["name"]), key):
            results.append(EngineResult(graph["name"], file, False, 0.0, (directory / file).stat().st_size))
            continue
        if progress:
            progress(f"build {file}", done, len(graphs))
        began = time.perf_counter()
        blob = build_engine(trt, directory / graph["file"], graph, mine, settings, timing_cache, phases)
        seconds = time.perf_counter() - began
        with atomic_path(directory / file) as tmp:
            tmp.write_bytes(blob)
        entries[graph["name"]] = {
            "graph": graph["name"],
            "file": file,
            "sha256": hashlib.sha256(blob).hexdigest(),
            "bytes": len(blob),
            "builder": {"name": trt.name, "version": trt.version},
            "precision": graph["precision"],
            "strongly_typed": hasattr(trt.module.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"),
            "profiles": [p.to_dict() for p in mine],
            "compute_capabilities": targets,
            "device": device,
            "optimization_level": optimization_level,
            "workspace_bytes": workspace_bytes,
            "cache_key": key,
        }
        manifest["engines"] = [entries[g["name"]] for g in manifest["graphs"] if g["name"] in entries]
        write_manifest(directory, manifest)
        results.append(EngineResult(graph["name"], file, True, seconds, len(blob)))
    if progress:
        progress("done", len(graphs), len(graphs))
    return results


def trt_command(
    *,
    directory: Path,
    builder: str,
    precision: str,
    profiles: list[str],
    grids: list[str],
    batch: str | None,
    jacobi_chunk: int | None,
    optimization_level: int,
    workspace_mib: int | None,
    compute_capabilities: list[str],
    progress: Progress | None,
    phases: Progress | None,
) -> str:
    """`starflow export trt`: parse the CLI's strings, build, and describe what happened."""
    results = build_engines(
        directory,
        builder=builder,
        precisions=() if precision == "all" else (precision,),
        profiles=profiles or (() if grids else ("default",)),
        grids=[parse_grid(g) for g in grids],
        batch=None if batch is None else parse_range(batch, "--batch"),
        jacobi_chunk=jacobi_chunk,
        optimization_level=optimization_level,
        workspace_bytes=None if workspace_mib is None else workspace_mib << 20,
        compute_capabilities=compute_capabilities,
        progress=progress,
        phases=phases,
    )
    manifest = load_manifest(directory, verify_files=False)
    entry = manifest["engines"][0] if manifest.get("engines") else None
    built = [r for r in results if r.built]
    lines = [
        f"  {r.file:36} {r.bytes / 2**20:8.2f} MiB  "
        + (f"built in {r.seconds:.1f} s" if r.built else "cached (key unchanged)")
        for r in results
    ]
    if not built:
        lines.append(f"all {len(results)} engines are up to date in {directory}; nothing built")
    else:
        lines.append(f"built {len(built)} of {len(results)} engines in {directory}")
    if entry is not None:
        lines.append(
            f"builder {entry['builder']['name']} {entry['builder']['version']}, targets "
            f"{', '.join(entry['compute_capabilities'])}"
            + ("" if entry["builder"]["name"] == "tensorrt" else " (TensorRT-RTX: no timing cache)")
        )
    return "\n".join(lines)
