"""Backends behind one small interface: a Runner runs one graph on numpy feeds.

Only numpy and the backend library are imported (lazily), never torch. A Runner owns its
session; the arrays it returns are owned by the caller and stay valid after the next call.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from starflow.contract.manifest import Engine, Graph, inside
from starflow.core.errors import StarflowError
from starflow.core.limits import check_threads

BACKENDS = ("onnxruntime", "tensorrt")


class Runner(Protocol):
    """One graph, ready to run. `run` is not thread-safe across calls on the same runner."""

    name: str
    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise StarflowError(
            "backend 'onnxruntime' needs the onnxruntime package: pip install 'starflow[onnx]' "
            "(CPU) or 'starflow[gpu]' (CUDA; not both in one environment)"
        ) from None
    return onnxruntime


class OrtRunner:
    """An ONNX Runtime session created once, with the thread settings chosen at load.

    `few_runs` (validation): without weight prepacking (a second, packed copy of every MatMul
    weight) or the memory arena, which pay off only over many runs and would hold a 3B-sized
    graph's memory twice.
    """

    def __init__(
        self,
        name: str,
        path: Path,
        providers: list[Any] | None = None,
        threads: int | None = None,
        few_runs: bool = False,
    ):
        check_threads(threads)
        ort = _import_onnxruntime()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        # Spinning workers keep both cores busy between runs, starving the numpy orchestration
        # (and PyTorch in the same process): measured on bench-256, runtime Jacobi 0.56 s -> 0.38 s
        # and the forward pass 0.128 s -> 0.048 s with spinning off.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        if few_runs:
            options.enable_cpu_mem_arena = False
            options.add_session_config_entry("session.disable_prepacking", "1")
        available = ort.get_available_providers()
        requested = providers or ["CPUExecutionProvider"]
        missing = [p for p in requested if (p[0] if isinstance(p, tuple) else p) not in available]
        if missing:
            raise StarflowError(
                f"execution provider(s) {missing} are not available in this onnxruntime "
                f"(available: {available}); for CUDA/TensorRT install 'starflow[gpu]'"
            )
        self.name = name
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=requested)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, outputs, strict=True))


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise StarflowError(f"backend {backend!r} is not available; choose one of {list(BACKENDS)}")


def open_runner(
    backend: str,
    directory: Path,
    graph: Graph,
    engine: Engine | None,
    providers: list[Any] | None = None,
    threads: int | None = None,
) -> Runner:
    """A runner for `graph` of the export in `directory`: its ONNX file, or its TensorRT engine."""
    check_backend(backend)
    if backend == "onnxruntime":
        return OrtRunner(graph.name, inside(directory, graph.file), providers, threads)
    if providers is not None:
        raise StarflowError("providers apply to backend 'onnxruntime' only, not 'tensorrt'")
    if engine is None:
        raise StarflowError(
            f"{directory}: no TensorRT engine for graph {graph.name}; "
            f"build one: starflow export trt {directory}"
        )
    from starflow.runtime.trt_backend import TrtRunner  # threads do not apply

    return TrtRunner(directory, graph, engine)
