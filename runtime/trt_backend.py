"""The TensorRT backend: one engine per graph, run on numpy feeds through cuda-python.

`starflow export trt` records each engine in the manifest beside its graph; this runner finds
the entry for its graph, checks the engine's sha256 before TensorRT reads a byte of it, and
imports the module that built it (`tensorrt` or `tensorrt_rtx`). Device buffers are allocated
once per tensor at the largest shape of any profile and reused by every call; each call picks
the narrowest optimization profile whose ranges hold its shapes and refuses shapes outside every
profile, naming the ranges that would work. CUDA comes from `cuda.bindings`, never torch.

Lifetimes: the runner owns its engine, context, stream and device buffers until it is garbage
collected; the arrays `run` returns are new host arrays owned by the caller. Not thread-safe.
"""

from __future__ import annotations

import importlib
import math
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from starflow.contract.manifest import Engine, Graph, Range, TensorSpec, inside, sha256
from starflow.core.errors import StarflowError

INSTALL = {
    "tensorrt": "pip install tensorrt",
    "tensorrt_rtx": "pip install 'starflow[tensorrt-rtx]'",
}


# ---- shapes and profiles (pure: tested without a GPU) --------------------------------------------
def call_dims(inputs: tuple[TensorSpec, ...], feeds: dict[str, np.ndarray]) -> dict[str, int]:
    """The symbolic dims' sizes in this call; names, ranks, static sizes and dtypes are checked."""
    missing = [t.name for t in inputs if t.name not in feeds]
    if missing:
        raise StarflowError(f"missing input(s) {missing}; the graph takes {[t.name for t in inputs]}")
    sizes: dict[str, int] = {}
    for t in inputs:
        array = feeds[t.name]
        if array.dtype != np.dtype(t.dtype) or array.ndim != len(t.shape):
            raise StarflowError(
                f"input {t.name}: expected {t.dtype} of shape {list(t.shape)}, "
                f"got {array.dtype} {array.shape}"
            )
        for axis, (declared, size) in enumerate(zip(t.shape, array.shape, strict=True)):
            if isinstance(declared, int):
                if declared != size:
                    raise StarflowError(f"input {t.name}: axis {axis} must be {declared}, got {size}")
            elif sizes.setdefault(declared, size) != size:
                raise StarflowError(
                    f"input {t.name}: {declared} = {size} disagrees with {sizes[declared]} elsewhere"
                )
    return sizes


def select_profile(profiles: list[dict[str, Range]], sizes: dict[str, int]) -> int:
    """Index of the narrowest profile containing `sizes`; StarflowError lists them otherwise."""
    fits = [i for i, dims in enumerate(profiles) if all(r.holds(sizes[d]) for d, r in dims.items())]
    if not fits:
        ranges = "; ".join(", ".join(f"{d} {r.min}..{r.max}" for d, r in dims.items()) for dims in profiles)
        got = ", ".join(f"{d} {v}" for d, v in sizes.items())
        raise StarflowError(
            f"shapes ({got}) are outside every optimization profile of this engine; it runs {ranges} "
            "(rebuild with `starflow export trt --grid/--batch/--profile` to cover them)"
        )
    return min(fits, key=lambda i: math.prod(r.max - r.min + 1 for r in profiles[i].values()))


# ---- CUDA through cuda-python --------------------------------------------------------------------
def _cudart() -> Any:
    try:
        from cuda.bindings import runtime
    except ImportError:
        raise StarflowError(
            "backend 'tensorrt' needs cuda-python for device memory: pip install cuda-python"
        ) from None
    return runtime


def _check(cudart: Any, result: tuple[Any, ...], what: str) -> Any:
    err, *values = result
    if err != cudart.cudaError_t.cudaSuccess:
        raise StarflowError(f"CUDA {what} failed: {err}")
    return values[0] if len(values) == 1 else values


def _check_device(cudart: Any) -> None:
    """A clear error on a machine without an NVIDIA GPU or driver, before TensorRT reads anything."""
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or not count:
        found = f"cudaGetDeviceCount: {err.name}" if err != cudart.cudaError_t.cudaSuccess else "0 devices"
        raise StarflowError(
            f"backend 'tensorrt': no CUDA device or driver found ({found}); TensorRT engines run on an "
            "NVIDIA GPU: use backend 'onnxruntime' on this machine"
        )


def _release(cudart: Any, stream: Any, pointers: list[int]) -> None:
    for pointer in pointers:
        cudart.cudaFree(pointer)
    cudart.cudaStreamDestroy(stream)


class TrtRunner:
    """A deserialised engine with one execution context, a stream and preallocated buffers."""

    def __init__(self, directory: Path, graph: Graph, engine: Engine):
        path = inside(directory, engine.file)
        if not path.is_file():
            raise StarflowError(
                f"engine {graph.name}: file {path} is missing; rerun `starflow export trt {directory}`"
            )
        if sha256(path) != engine.sha256:
            raise StarflowError(
                f"engine {graph.name}: {path} does not match its sha256 in the manifest "
                "(corrupted or replaced); "
                f"rerun `starflow export trt {directory}`"
            )
        builder = engine.builder
        try:
            trt = importlib.import_module(builder.name)
        except (ImportError, OSError):
            raise StarflowError(
                f"engine {graph.name} was built by {builder.name} {builder.version}; "
                f"running it needs that module: {INSTALL[builder.name]}"
            ) from None
        cudart = _cudart()
        _check_device(cudart)
        self.name = graph.name
        self.input_names = [t.name for t in graph.inputs]
        self.output_names = [t.name for t in graph.outputs]
        self._inputs = graph.inputs
        self._profiles = [p.dims for p in engine.profiles]
        self._trt, self._cudart = trt, cudart
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self._engine is None:
            raise StarflowError(
                f"engine {graph.name}: {builder.name} {trt.__version__} cannot deserialise {path.name} "
                f"(built by {builder.name} {builder.version} for {list(engine.compute_capabilities)})"
            )
        self._context = self._engine.create_execution_context()
        self._stream = _check(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._profile = -1
        self._buffers: dict[str, int] = {}
        self._dtypes: dict[str, np.dtype] = {}
        for t in graph.inputs + graph.outputs:
            dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(t.name)))
            largest = max(
                math.prod(p[d].max if isinstance(d, str) else d for d in t.shape) for p in self._profiles
            )
            pointer = _check(cudart, cudart.cudaMalloc(max(largest * dtype.itemsize, 1)), "cudaMalloc")
            self._buffers[t.name], self._dtypes[t.name] = int(pointer), dtype
            self._context.set_tensor_address(t.name, int(pointer))
        weakref.finalize(self, _release, cudart, self._stream, list(self._buffers.values()))

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart, stream = self._cudart, self._stream
        index = select_profile(self._profiles, call_dims(self._inputs, feeds))
        if index != self._profile:
            if not self._context.set_optimization_profile_async(index, int(stream)):
                raise StarflowError(f"engine {self.name}: TensorRT refused optimization profile {index}")
            self._profile = index
        host = [np.ascontiguousarray(feeds[n]) for n in self.input_names]
        for name, array in zip(self.input_names, host, strict=True):
            self._context.set_input_shape(name, array.shape)
            if array.nbytes:
                _check(cudart, cudart.cudaMemcpyAsync(
                    self._buffers[name], array.ctypes.data, array.nbytes,
                    cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream,
                ), "copy to device")  # fmt: skip
        if not self._context.execute_async_v3(int(stream)):
            raise StarflowError(f"engine {self.name}: TensorRT execution failed")
        outputs = {}
        for name in self.output_names:
            out = np.empty(tuple(self._context.get_tensor_shape(name)), self._dtypes[name])
            if out.nbytes:
                _check(cudart, cudart.cudaMemcpyAsync(
                    out.ctypes.data, self._buffers[name], out.nbytes,
                    cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream,
                ), "copy to host")  # fmt: skip
            outputs[name] = out
        _check(cudart, cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        return outputs
