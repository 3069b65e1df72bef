"""`starflow export trt`: one TensorRT engine per exported graph, cached by what it depends on.

Engines come from the directory's own ONNX graphs, so the manifest stays the single contract:
an `engines` entry per graph in the export's record.json (manifest.json is left as it is)
records the file, its sha256, the builder and version, the optimization profiles, precision,
target GPUs and a cache key. The key hashes everything an engine depends on (ONNX sha256s,
profiles, precision, builder name and version, targets, builder level and workspace), so a rerun
on an unchanged directory builds nothing, and a changed input rebuilds exactly the engines it
touches. Engines and the record are written atomically (temp file, then rename), after each
engine, so an interrupted build keeps what it finished.

Two builders share one API: NVIDIA's full `tensorrt` (needs the GPU it builds for) and
`tensorrt_rtx` (TensorRT for RTX; builds ahead of time on a machine with no GPU, for the compute
capabilities named). Running an engine always needs a GPU (`starflow.runtime.trt_backend`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from starflow.contract.manifest import Engine, EngineBuilder, EngineProfile, Graph, Manifest, Range, sha256
from starflow.core.atomic import atomic_path
from starflow.core.errors import StarflowError
from starflow.core.outputs import check_writable
from starflow.core.sampler import Progress
from starflow.export.graphs import ENGINE_KINDS
from starflow.export.trt_profiles import (
    BuildSettings,
    cache_key,
    derive_profiles,
    graph_profiles,
    input_shapes,
)

MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}  # builder option -> module
INSTALL_HINT = (
    "pip install 'starflow[tensorrt-rtx]' (tensorrt-rtx-cu13 + tensorrt-rtx-cu13-bindings: builds "
    "engines without a GPU), or NVIDIA's full TensorRT (pip install tensorrt) on the GPU machine"
)
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
        raise StarflowError(f"builder: expected auto or one of {list(MODULES)}, got {requested!r}")
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
                "compute_capabilities apply to TensorRT-RTX only; full TensorRT builds for the GPU present"
            )
        capability, device = current_gpu()
        return [capability], device
    known = rtx_compute_capabilities(builder)
    wanted = [c.upper() for c in requested] or default_rtx_targets(builder)
    unknown = [c for c in wanted if c not in known]
    if unknown:
        raise StarflowError(
            f"compute_capabilities {unknown}: TensorRT-RTX {builder.version} builds for {known}"
        )
    return list(dict.fromkeys(wanted)), None


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


def _monitor(trt: ModuleType, phases: Progress[str]) -> Any:
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
    graph: Graph,
    profiles: Sequence[EngineProfile],
    settings: BuildSettings,
    timing_cache: Path | None = None,
    phases: Progress[str] | None = None,
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
        raise StarflowError(f"engine {graph.name}: TensorRT cannot parse {onnx_path.name}: {errors}")
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
                f"engine {graph.name}: profile {profile.name!r} rejected by TensorRT: {err} {log.errors}"
            ) from None
        if config.add_optimization_profile(trt_profile) < 0:
            raise StarflowError(
                f"engine {graph.name}: profile {profile.name!r} "
                f"{dataclasses.asdict(profile)['dims']} rejected "
                f"by TensorRT: {log.errors}"
            )
    serialized = trt_builder.build_serialized_network(network, config)
    if serialized is None:
        raise StarflowError(
            f"engine {graph.name}: {builder.name} {builder.version} failed to build (profiles "
            f"{[p.name for p in profiles]}, targets {list(settings.compute_capabilities)}): "
            + ("; ".join(log.errors) or "TensorRT gave no error text")
        )
    if timing_cache is not None and not builder.rtx:
        with atomic_path(timing_cache) as tmp:
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


# ---- a directory -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """Which engines to build, and how; every option is checked before the first build."""

    builder: str = "auto"  # auto (tensorrt when importable, else tensorrt-rtx), tensorrt, tensorrt-rtx
    precisions: tuple[str, ...] = ()  # empty: every precision in the export
    profiles: tuple[str, ...] = ("default",)  # default, sequential, jacobi (trt_profiles)
    grids: tuple[tuple[int, int], ...] = ()  # resolution buckets as token grids (h, w)
    batch: Range | None = None  # rows per call; None: the export's range
    jacobi_chunk: int | None = None  # chunk of the jacobi profile; None: the manifest's block size
    optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL
    workspace_bytes: int | None = None
    compute_capabilities: tuple[str, ...] = ()  # TensorRT-RTX targets; empty: SM80 and newer

    def check(self, manifest: Manifest, directory: Path) -> None:
        missing = [p for p in self.precisions if p not in manifest.precisions]
        if missing:
            raise StarflowError(
                f"precisions {missing}: {directory} has graphs in {sorted(manifest.precisions)}"
            )
        if not 0 <= self.optimization_level <= 5:
            raise StarflowError(f"optimization_level: expected 0..5, got {self.optimization_level}")
        if self.workspace_bytes is not None and self.workspace_bytes <= 0:
            raise StarflowError(f"workspace_bytes: must be positive, got {self.workspace_bytes}")


@dataclasses.dataclass(frozen=True)
class EngineResult:
    """What happened to one graph's engine."""

    graph: str
    file: str
    built: bool  # False: the cached engine's key matched
    seconds: float
    bytes: int


def _cached(directory: Path, entry: Engine | None, key: str) -> bool:
    if entry is None or entry.cache_key != key:
        return False
    path = directory / entry.file
    return path.is_file() and sha256(path) == entry.sha256


def build_engines(
    directory: str | Path,
    options: EngineOptions | None = None,
    *,
    progress: Progress[str] | None = None,
    phases: Progress[str] | None = None,
) -> list[EngineResult]:
    """Build (or keep, when its key is unchanged) an engine for every flow-block graph.

    `progress` hears per engine, `phases` per TensorRT build phase. The components (text encoder,
    decoder, denoise) run once per image and stay on ONNX Runtime; no engines are built for them.
    """
    options = options or EngineOptions()
    directory = Path(directory)
    manifest = Manifest.load(directory)
    options.check(manifest, directory)
    check_writable(directory, f"engines in {directory}")
    chunk = options.jacobi_chunk if options.jacobi_chunk is not None else manifest.jacobi.block_size
    chosen = derive_profiles(
        manifest.dims, manifest.latent, chunk, options.profiles, options.grids, options.batch
    )
    trt = choose_builder(options.builder)
    targets, device = resolve_targets(trt, options.compute_capabilities)
    settings = BuildSettings(
        trt.name, trt.version, tuple(targets), device, options.optimization_level, options.workspace_bytes
    )
    wanted = options.precisions or tuple(manifest.precisions)
    # the vjp graphs (the self-denoise's gradient, once per image) run on ONNX Runtime
    graphs = [g for g in manifest.graphs if g.kind in ENGINE_KINDS and g.precision in wanted]
    timing_cache = None if trt.rtx else directory / TIMING_CACHE
    results = []
    for done, graph in enumerate(graphs):
        mine = graph_profiles(graph, chosen)
        key = cache_key(graph, mine, settings)
        file = f"{graph.name}.engine"
        if _cached(directory, manifest.engine(graph.name), key):
            results.append(EngineResult(graph.name, file, False, 0.0, (directory / file).stat().st_size))
            continue
        if progress:
            progress(f"build {file}", done, len(graphs))
        began = time.perf_counter()
        blob = build_engine(trt, directory / graph.file, graph, mine, settings, timing_cache, phases)
        seconds = time.perf_counter() - began
        try:
            with atomic_path(directory / file) as tmp:
                tmp.write_bytes(blob)
        except OSError as err:
            raise StarflowError(f"engine {directory / file}: cannot write ({err.strerror or err})") from None
        strongly_typed = hasattr(trt.module.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
        entry = Engine(
            graph.name, file, hashlib.sha256(blob).hexdigest(), len(blob),
            EngineBuilder(trt.name, trt.version),
            graph.precision, strongly_typed, tuple(mine), tuple(targets), device, options.optimization_level,
            options.workspace_bytes, key,
        )  # fmt: skip
        manifest = _with_engine(manifest, entry)
        manifest = manifest.write_record(directory)  # after each engine: an interrupted build keeps its work
        results.append(EngineResult(graph.name, file, True, seconds, len(blob)))
    if progress:
        progress("done", len(graphs), len(graphs))
    return results


def _with_engine(manifest: Manifest, entry: Engine) -> Manifest:
    """The manifest with `entry` added or replaced, engines in the order of their graphs."""
    engines = {e.graph: e for e in manifest.engines} | {entry.graph: entry}
    ordered = tuple(engines[g.name] for g in manifest.graphs if g.name in engines)
    return dataclasses.replace(manifest, engines=ordered)


def describe_engines(results: list[EngineResult], manifest: Manifest) -> str:
    """What `starflow export trt` prints: each engine, then what was built and by which builder."""
    lines = [
        f"  {r.file:36} {r.bytes / 2**20:8.2f} MiB  "
        + (f"built in {r.seconds:.1f} s" if r.built else "cached (key unchanged)")
        for r in results
    ]
    built = [r for r in results if r.built]
    lines.append(
        f"built {len(built)} of {len(results)} engines"
        if built
        else f"all {len(results)} engines are up to date; nothing built"
    )
    if manifest.engines:
        entry = manifest.engines[0]
        lines.append(
            f"builder {entry.builder.name} {entry.builder.version}, "
            f"targets {', '.join(entry.compute_capabilities)}"
            + ("" if entry.builder.name == "tensorrt" else " (TensorRT-RTX: no timing cache)")
        )
    return "\n".join(lines)
