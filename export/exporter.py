"""One exporter setup for every graph, blocks and components alike: torch.onnx (dynamo) with
symbolic dims, external data for big weights, `onnx.checker`, and the declared-signature check."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import torch

from starflow.errors import StarflowError
from starflow.export.graphs import BlockGraph, GraphSpec, Precision
from starflow.model import FlowBlock

DEFAULT_OPSET = 20
SUPPORTED_OPSETS = range(18, 24)  # torch's exporter starts at 18; 23 is the newest it emits
# Graphs whose weights exceed this go to ONNX external data (protobuf's hard limit is 2 GiB).
EXTERNAL_DATA_BYTES = 1 << 30


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


def dynamic_shapes_of(spec: GraphSpec) -> tuple[dict[int, torch.export.Dim] | None, ...]:
    """torch.export dims for every symbolic input axis (`past` may be 0, the others >= 1)."""
    dims: dict[str, torch.export.Dim] = {}
    out = []
    for tensor in spec.inputs:
        axes = {}
        for axis, d in enumerate(tensor.shape):
            if isinstance(d, str):
                axes[axis] = dims.setdefault(d, torch.export.Dim(d, min=0 if d == "past" else 1))
        out.append(axes or None)
    return tuple(out)


def example_args(spec: GraphSpec, precision: Precision) -> tuple[torch.Tensor, ...]:
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


def export_block_graph(
    spec: GraphSpec, block: FlowBlock, precision: Precision, path: Path, opset: int
) -> None:
    """Export one block method (step, prefill or density) to `path`."""
    module = BlockGraph(block, spec.kind, precision)
    # BlockGraph.forward takes *args: torch.export sees one positional group holding them all
    export_module(module, example_args(spec, precision), (dynamic_shapes_of(spec),), spec, path, opset)


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
