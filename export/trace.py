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
import onnx_ir as ir
import torch
import torch._dynamo
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from starflow.core.errors import StarflowError
from starflow.core.limits import release_freed_memory
from starflow.export.defaults import DEFAULT_OPSET as DEFAULT_OPSET
from starflow.export.graphs import BlockMethod, GraphSpec, Precision
from starflow.model.flow import FlowBlock

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
    BlockGraphExporter(opset).export(spec, block, precision, path)


# Attributes of a FlowBlock that no exported method reads: its place in the model. The flip is
# applied by the runtime, except to learned positions (rope: 0), which the graphs hold flipped.
GRAPH_NEUTRAL_ATTRIBUTES = frozenset({"index", "deep", "training"})


def structure_key(spec: GraphSpec, module: BlockMethod) -> tuple:
    """What decides the traced graph of `module`: the graph's signature, every submodule's type and
    plain attributes, and every weight's name, shape and dtype (but not its values)."""
    neutral = GRAPH_NEUTRAL_ATTRIBUTES | ({"flip"} if module.block.rope is not None else set())
    attributes = tuple(
        (name, type(sub).__name__, tuple(sorted(
            (k, v) for k, v in vars(sub).items()
            if not k.startswith("_") and k not in neutral
            and isinstance(v, (bool, int, float, str, tuple, type(None)))
        )))
        for name, sub in module.named_modules()
    )  # fmt: skip
    tensors = tuple((name, tuple(t.shape), t.dtype) for name, t in _named_tensors(module).items())
    return (spec.kind, spec.precision, spec.inputs, spec.outputs, attributes, tensors)


def _named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers (non-persistent ones too) by the names the exporter gives them."""
    return dict(module.named_parameters()) | dict(module.named_buffers())


class BlockGraphExporter:
    """Exports block graphs, tracing each distinct block structure once.

    Tracing dominates export time (about 10 s per graph even for the 64-wide demo model, most of it
    torch.export's symbolic shape arithmetic), while a model's shallow blocks usually share one
    structure. The first block of a structure is traced to an unoptimised ONNX graph, kept as a
    template; a later block with the same `structure_key` gets a copy of it with its own weights
    swapped in by initializer name, before onnxscript's optimizer runs (it folds weights into new
    constants, so the swap must come first). The tests check the result is the file a trace of
    that block gives.
    """

    def __init__(self, opset: int):
        self.opset = opset
        self._templates: dict[tuple, onnx.ModelProto] = {}

    def export(self, spec: GraphSpec, block: FlowBlock, precision: Precision, path: Path) -> bool:
        """Export `spec` of `block` to `path`; True when a template was reused (no trace)."""
        module = BlockMethod(block, spec.kind, precision)
        key = structure_key(spec, module)
        tensors = _named_tensors(module)
        reused = key in self._templates
        if not reused:
            args = example_args(spec, precision)
            traced = trace_module(module, args, (dynamic_shapes_of(spec),), spec, self.opset)
            self._templates[key] = _weightless(ir.serde.serialize_model(traced), tensors)
        # traced and reused graphs take one path (the optimizer names the values it creates after
        # the graph's history, so this keeps their files equal)
        model = ir.serde.deserialize_model(self._templates[key])
        _swap_weights(model, tensors)
        external = weight_bytes(module) > EXTERNAL_DATA_BYTES
        write_graph(model, spec, path, optimize=True, external_data=external)
        # the exporter's programs keep reference cycles around (fp16 copies of) the weights: freed
        # only by a collection, they piled up (0.8 GiB per graph of the 3B-shaped model)
        del model, module, tensors
        release_freed_memory()
        return reused


def _weightless(proto: onnx.ModelProto, tensors: dict[str, torch.Tensor]) -> onnx.ModelProto:
    """The template keeps the weights' names, shapes and dtypes, not their data (a block's worth
    per template would add up on billion-parameter models)."""
    for initializer in proto.graph.initializer:
        if initializer.name in tensors:
            initializer.ClearField("raw_data")
    return proto


def _swap_weights(model: ir.Model, tensors: dict[str, torch.Tensor]) -> None:
    """Give every initializer named after a weight of the block that weight's values (the
    structure key guarantees the shapes); the others are constants of the code, equal for all."""
    for name, value in model.graph.initializers.items():
        if name in tensors:
            value.const_value = ir.Tensor(tensors[name].detach().contiguous().numpy(), name=name)


def weight_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def export_module(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    dynamic_shapes: tuple[Any, ...],
    spec: GraphSpec,
    path: Path,
    opset: int,
    autograd: bool = False,
) -> None:
    """Export `module` to `path`, check it, and prove its I/O signature kept every symbolic dim.

    `autograd`: the module takes gradients (`torch.autograd.grad`), which torch 2.13 cannot
    export with symbolic shapes: non-strict export fails inside the autograd engine (an n-ary
    SymInt product it cannot rebuild, `batch*h*w`), and strict export refuses it unless
    `trace_autograd_ops` is set, and then turns saved activations into constants. So it is traced
    to plain ATen ops (backward included) by `trace_joint` first, and exported from there.
    """
    if autograd:
        # The fake-tensor cache costs more than it saves on such a graph's symbolic shapes:
        # measured about 27 s instead of 35 s (trace and export) for a one-layer denoise graph.
        with torch._dynamo.config.patch(fake_tensor_cache_enabled=False):
            model = trace_module(
                trace_joint(module, args, dynamic_shapes, spec), args, dynamic_shapes, spec, opset
            )
    else:
        model = trace_module(module, args, dynamic_shapes, spec, opset)
    # onnxscript's optimizer pattern-matches every node: minutes on a joint graph (~270 nodes per
    # layer), measured 240 s -> 105 s for the 10-layer demo model's denoise graph without it
    # (ONNX Runtime optimises at load anyway)
    optimize = not autograd
    write_graph(model, spec, path, optimize, external_data=weight_bytes(module) > EXTERNAL_DATA_BYTES)


def trace_joint(
    module: nn.Module, args: tuple[torch.Tensor, ...], dynamic_shapes: tuple[Any, ...], spec: GraphSpec
) -> fx.GraphModule:
    """`module` traced to ATen ops (autograd included) over fake inputs whose axes in
    `dynamic_shapes` are symbolic.

    Parameters stay real tensors; make_fx records them as parameters of the returned module,
    so the exporter sees (and externalises) them like any other weights.
    """
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    fakes = []
    for arg, axes in zip(args, dynamic_shapes, strict=True):
        sizes = [DimDynamic.DYNAMIC if i in (axes or {}) else DimDynamic.STATIC for i in range(arg.dim())]
        fakes.append(mode.from_tensor(arg, symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes)))
    try:
        with mode:
            graph = make_fx(module, tracing_mode="real")(*fakes)
    except Exception as err:  # make_fx raises many types; name the graph and keep the cause
        raise StarflowError(f"tracing graph {spec.name} failed: {type(err).__name__}: {err}") from err
    return graph.eval()


def trace_module(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    dynamic_shapes: tuple[Any, ...],
    spec: GraphSpec,
    opset: int,
) -> ir.Model:
    """`module` traced by torch.onnx (dynamo) with symbolic dims, not yet optimised."""
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
                optimize=False,
                verbose=False,
            )
    except Exception as err:  # the exporter raises many types; name the graph and keep the cause
        raise StarflowError(f"export of graph {spec.name} failed: {type(err).__name__}: {err}") from err
    return program.model


def write_graph(model: ir.Model, spec: GraphSpec, path: Path, optimize: bool, external_data: bool) -> None:
    """Optimise (onnxscript, as torch.onnx's `optimize=True` does) and save `model`, then run
    `onnx.checker` and prove the I/O signature kept every symbolic dim."""
    program = torch.onnx.ONNXProgram(model, None)
    try:
        with _quiet_exporter():
            if optimize:
                program.optimize()
            program.save(str(path), external_data=external_data)
    except Exception as err:  # the optimizer and serializer raise many types
        raise StarflowError(f"export of graph {spec.name} failed: {type(err).__name__}: {err}") from err
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise StarflowError(f"graph {spec.name}: onnx.checker failed: {err}") from None
    spec.check_signature(onnx.load(str(path), load_external_data=False))
