"""How graphs are traced and written. Block graphs: traced once per block structure without their
weights (make_fx over fake tensors, then torch.onnx's translator), then written per block with
its weights streamed in. Components: torch.onnx.export (dynamo) with symbolic dims. Both:
external data for big weights, `onnx.checker`, and the declared-signature check."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import select
import signal
import struct
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import onnx
import onnx.numpy_helper
import onnx_ir as ir
import onnxscript.optimizer
import onnxscript.rewriter
import torch
import torch._dynamo
from onnxscript.rewriter.rules import common as rewrite_rules
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
from torch.onnx._internal._lazy_import import onnxscript_apis
from torch.onnx._internal.exporter import _constants, _core, _decomp, _fx_passes, _ir_passes, _registration
from torch.onnx._internal.fx.passes import type_promotion

from starflow.core.errors import StarflowError
from starflow.core.limits import release_freed_memory
from starflow.export.defaults import DEFAULT_OPSET as DEFAULT_OPSET
from starflow.export.graphs import BlockMethod, GraphSpec, Precision, joint_spec
from starflow.model.flow import FlowBlock

# A component graph whose weights exceed this goes to ONNX external data (protobuf's hard limit is 2 GiB).
EXTERNAL_DATA_BYTES = 1 << 30
# A block whose weights (in one precision) exceed this keeps them in one external file its graphs
# of that precision share, so they are written (and stored) once, not once per graph: 0.9 GB per
# graph for the 3B model's shallow blocks.
SHARED_WEIGHTS_BYTES = 64 << 20
# The forked tracer gets at least this long, and twice the exporter's own share's time, after
# the exporter is done before it is taken for hung, killed, and its share traced here.
CHILD_MIN_WAIT_S = 60.0
ALIGNMENT = 4096  # external data offsets: page-aligned, so a runtime can map a weight in place
TORCH_DTYPES = {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.FLOAT16: torch.float16}


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
    tensors = tuple((name, tuple(t.shape), t.dtype) for name, t in named_tensors(module).items())
    return (spec.kind, spec.precision, spec.inputs, spec.outputs, attributes, tensors)


def named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers (non-persistent ones too) by their qualified names."""
    return dict(module.named_parameters()) | dict(module.named_buffers())


class BlockGraphExporter:
    """Exports block graphs, tracing each distinct block structure once, without their weights.

    A trace (`trace_block`) gives a template: the graph with every weight as an input named after
    it, traced over fake weights (their values are never read). Each block of that
    `structure_key` gets a copy with its own weights written in as initializers, one tensor at a
    time (`write_block_graph`), so a graph's file never has to exist in memory whole. The tests
    check a reused template gives the file a trace of that block gives.
    """

    def __init__(self, opset: int):
        self.opset = opset
        self._templates: dict[tuple, onnx.ModelProto] = {}
        # a block's shared weights file -> what is in it: tensor -> (offset, length)
        self._shared: dict[Path, dict[str, tuple[int, int]]] = {}

    def untraced(self, jobs: list[GraphJob]) -> list[GraphJob]:
        """The jobs whose traces give every template `jobs` need that is not traced yet."""
        covered, todo = set(self._templates), []
        for job in jobs:
            if job.keys[0] not in covered:
                covered.update(job.keys)
                todo.append(job)
        return todo

    def trace_all(self, jobs: list[GraphJob], parallel: bool = True) -> None:
        """Trace `jobs` (see `untraced`) before any is exported; `parallel`: split between this
        process and a forked child tracing at the same time (`_fork_tracer`), unless this process
        runs other threads (a server's: a child forked from it could inherit a lock one of them
        holds) or cannot fork. A child that fails or hangs costs time, not the export: its share
        is traced here."""
        mine, theirs = _share_out(jobs)
        _stop_tqdm_monitor()
        if parallel and theirs and hasattr(os, "fork") and threading.active_count() == 1:
            _onnx_registry(self.opset)  # built once, before the fork, for both processes
            began = time.monotonic()
            child = _fork_tracer(theirs, self.opset)
            try:
                self._trace(mine)
            except BaseException:
                child.kill()
                raise
            # a share costs about the other's: a child far past that is taken for hung
            traced = child.join(timeout=max(CHILD_MIN_WAIT_S, 2 * (time.monotonic() - began)))
            if traced is None:  # the child failed (a trace's error, a hang, a kill): trace here
                self._trace(theirs)
            else:
                for job, protos in zip(theirs, traced, strict=True):
                    self._templates.update(zip(job.keys, protos, strict=True))
        else:
            self._trace(mine + theirs)

    def _trace(self, jobs: list[GraphJob]) -> None:
        for job in jobs:
            self._templates.update(zip(job.keys, job.trace(self.opset), strict=True))

    def export(self, job: GraphJob, path: Path, weights: Mapping[str, torch.Tensor] | None = None) -> bool:
        """Export `job`'s graph to `path`; True when its template was traced before (by
        `trace_all`, or for another block). `weights`: the block's tensors by name, when the
        block holds none of its own (meta device)."""
        spec, key = job.spec, job.keys[0]
        reused = key in self._templates
        if not reused:
            self._trace([job])
        weights = named_tensors(job.block) if weights is None else weights
        # a block's graphs of one precision all go to one shared weights file, or none does
        # (`GraphSpec.entry`): the module holds the whole block, whatever the method
        shared = None
        size = weight_bytes(job.module)
        if size > SHARED_WEIGHTS_BYTES:
            shared = self._shared.setdefault(path.parent / spec.data_file, {})
        write_block_graph(self._templates[key], weights, spec, path, shared)
        release_freed_memory(size)
        return reused


@dataclasses.dataclass(eq=False)
class GraphJob:
    """A block graph to export. `traced_with`: the block's vjp graph, for its forward graph: both
    come from one trace (`joint_spec`), whose vjp template the vjp graph's own job then reuses."""

    spec: GraphSpec
    block: FlowBlock
    precision: Precision
    traced_with: GraphSpec | None = None

    @functools.cached_property
    def module(self) -> BlockMethod:
        return BlockMethod(self.block, self.spec.kind, self.precision)  # the block in `precision`

    @functools.cached_property
    def keys(self) -> list[tuple]:
        """The structure keys of the templates its trace gives."""
        keys = [structure_key(self.spec, self.module)]
        if self.traced_with is not None:
            other = BlockMethod(self.block, self.traced_with.kind, self.precision)
            keys.append(structure_key(self.traced_with, other))
        return keys

    def trace(self, opset: int) -> list[onnx.ModelProto]:
        """Its templates, in the order of `keys`."""
        if self.traced_with is None:
            return trace_block(self.module, example_args(self.spec, self.precision), self.spec, opset)
        joint = joint_spec(self.spec, self.traced_with)
        module = BlockMethod(self.block, joint.kind, self.precision)
        args = example_args(joint, self.precision)
        return trace_block(module, args, joint, opset, parts=(self.spec, self.traced_with))

    def cost(self) -> float:
        """Its trace's relative time, as measured on the digits model: linear in layers plus half
        a layer, and 2.75x with a vjp's backward."""
        backward = self.traced_with is not None or self.spec.kind == "vjp"
        return (len(self.block.attn_blocks) + 0.5) * (2.75 if backward else 1)


def _stop_tqdm_monitor() -> None:
    """Stop tqdm's monitor thread, which a trace leaves behind (torch.fx's interpreter opens a
    progress bar per run, and tqdm starts the thread with the first), so that a later export in
    this process can still fork its tracer. tqdm starts it again with its next bar."""
    from torch.hub import tqdm  # the class torch.fx uses: tqdm's, or without tqdm a stand-in

    monitor = getattr(tqdm, "monitor", None)
    if monitor is not None:
        monitor.exit()


def _share_out(jobs: list[GraphJob]) -> tuple[list[GraphJob], list[GraphJob]]:
    """`jobs` in two shares of about equal cost (longest first, each to the lighter share)."""
    shares: tuple[list[GraphJob], list[GraphJob]] = ([], [])
    loads = [0.0, 0.0]
    for job in sorted(jobs, key=GraphJob.cost, reverse=True):
        lighter = loads.index(min(loads))
        shares[lighter].append(job)
        loads[lighter] += job.cost()
    return shares


@dataclasses.dataclass
class _ForkedTracer:
    """A forked child tracing jobs; its templates come back through a pipe, each as a length
    (8 bytes, little-endian) and its serialised bytes."""

    pid: int
    pipe: int
    counts: list[int]  # templates per job

    def join(self, timeout: float) -> list[list[onnx.ModelProto]] | None:
        """Its templates per job, or None if it failed or has not finished within `timeout`
        seconds (then it is killed)."""
        chunks, deadline = [], time.monotonic() + timeout
        with os.fdopen(self.pipe, "rb", buffering=0) as pipe:
            while chunk := self._read(pipe, deadline):
                chunks.append(chunk)
        if chunk is None:
            os.kill(self.pid, signal.SIGKILL)
        _, status = os.waitpid(self.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            return None
        out, offset, data = [], 0, b"".join(chunks)
        for count in self.counts:
            protos = []
            for _ in range(count):
                (length,) = struct.unpack_from("<Q", data, offset)
                protos.append(onnx.ModelProto.FromString(data[offset + 8 : offset + 8 + length]))
                offset += 8 + length
            out.append(protos)
        return out

    @staticmethod
    def _read(pipe: Any, deadline: float) -> bytes | None:
        """The next bytes from the child (b"" at its end), None past `deadline`."""
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([pipe], [], [], left)[0]:
            return None
        return pipe.read(1 << 20)

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        os.close(self.pipe)
        os.waitpid(self.pid, 0)


def _fork_tracer(jobs: list[GraphJob], opset: int) -> _ForkedTracer:
    """Fork a child that traces `jobs` and writes their templates to a pipe, then exits at once
    (`os._exit`: none of the parent's exit handlers or buffers run twice)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            # one thread: the parent's OpenMP workers do not exist here, and a parallel region
            # (a big tensor's copy: example inputs, a cast) would wait for them forever
            torch.set_num_threads(1)
            os.close(read)
            # all traced before the first write: the parent reads only once done with its own
            # share, and a write past the pipe's buffer would wait for it
            traced = [proto.SerializeToString() for job in jobs for proto in job.trace(opset)]
            with os.fdopen(write, "wb") as pipe:
                for data in traced:
                    pipe.write(struct.pack("<Q", len(data)) + data)
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    return _ForkedTracer(pid, read, [len(job.keys) for job in jobs])


@functools.cache
def _onnx_registry(opset: int) -> tuple[Any, dict]:
    """torch.onnx's ATen-to-ONNX translations at `opset` (torchlib's own opset at least), and the
    decompositions of the ATen ops it has none for."""
    with _quiet_exporter():
        registry = _registration.ONNXRegistry.from_torchlib(max(opset, _constants.TORCHLIB_OPSET))
    implemented = set(_decomp.get_onnx_implemented_overloads(registry))
    return registry, _decomp.create_onnx_friendly_decomposition_table(implemented)


def trace_block(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    spec: GraphSpec,
    opset: int,
    parts: tuple[GraphSpec, ...] = (),
) -> list[onnx.ModelProto]:
    """`module` (a block's method, or a component) traced once to ATen ops (a vjp graph's backward
    included) over fake inputs and fake weights by make_fx, then translated op by op into ONNX by
    torch.onnx's translator, with the module's weights as inputs named as the block (or the
    component) names them: the graph, not yet its weights. One graph per `parts` (each some of
    `spec`'s inputs and outputs, and what computes them), or `spec`'s own.

    torch.onnx.export traces three times (torch.export, its decompositions, then the translation);
    one make_fx trace measured 3-6 s a block graph of the digits model against 6-14 s, and 11 s
    against 31 s for the deep block's vjp graph. torch.onnx.export cannot take the gradient path
    at all: torch 2.13's export of `torch.autograd.grad` with symbolic shapes fails inside the
    autograd engine. The translation uses torch.onnx internals (`_core._translate_fx_graph`),
    pinned with torch.
    """
    registry, decompositions = _onnx_registry(opset)
    tensors = named_tensors(module)
    weights = list(tensors)  # BlockMethod's names, for functional_call
    names = [w.removeprefix("block.") for w in weights]  # the graph's: the block's own

    def call(*flat: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(
            module, dict(zip(weights, flat, strict=False)), flat[len(weights) :]
        )

    # without FakeTensorMode's op cache: rebuilding a cached output's symbolic sizes and strides
    # costs more than the meta kernel it saves (the digits model's graphs: 27 s against 43 s)
    with torch._dynamo.config.patch(fake_tensor_cache_enabled=False):
        mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    dim_names: dict[str, str] = {}  # symbol -> declared dim (equal example sizes share a symbol)
    fakes = []
    for arg, tensor in zip(args, spec.inputs, strict=True):
        dynamic = [DimDynamic.DYNAMIC if isinstance(d, str) else DimDynamic.STATIC for d in tensor.shape]
        fake = mode.from_tensor(arg, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dynamic))
        dim_names |= {str(s): d for d, s in zip(tensor.shape, fake.shape, strict=True) if isinstance(d, str)}
        fakes.append(fake)
    try:
        with _quiet_exporter():
            with mode:
                # shapes and dtypes alone: the module's weights may be on the meta device
                fake_weights = [
                    torch.empty_strided(t.shape, t.stride(), dtype=t.dtype) for t in tensors.values()
                ]
                graph = make_fx(call, decomposition_table=decompositions)(*fake_weights, *fakes)
            insert_type_promotion(graph)
            graph = _fx_passes.remove_assertion_nodes(graph)
            model = ir.Model(
                ir.Graph([], [], nodes=[], name=spec.name), ir_version=_constants.ONNX_IR_VERSION
            )
            values = _core._translate_fx_graph(
                graph.graph, model, graph_like=model.graph, owned_graphs={}, lower="at_conversion",
                registry=registry,
            )  # fmt: skip
        _set_signature(model, graph, values, names, spec)
        _ir_passes.add_opset_imports(model)
        model = onnxscript_apis.convert_version(model, opset)
        ir.passes.common.InlinePass()(model)  # torchlib's functions
        simplify(model)
        for value in (*model.graph.inputs, *model.graph.outputs):  # the declared names of symbolic dims
            if value.shape is not None:
                value.shape = ir.Shape([_declared_dim(d, dim_names) for d in value.shape])
        protos = [ir.serde.serialize_model(model)]
        if parts:
            protos = [_part(ir.serde.deserialize_model(protos[0]), part, names) for part in parts]
    except Exception as err:  # the tracer, translator and passes raise many types; keep the cause
        raise StarflowError(f"tracing graph {spec.name} failed: {type(err).__name__}: {err}") from err
    for proto in protos:
        # inner shapes name the tracer's symbols (s0, s1...), numbered by trace history: inference
        # from the declared inputs recomputes them, and files stay byte-equal across traces
        del proto.graph.value_info[:]
    return protos


def _part(model: ir.Model, part: GraphSpec, weights: list[str]) -> onnx.ModelProto:
    """`model` cut down to `part`'s outputs, the nodes computing them, and `part`'s inputs (and
    every weight, as a graph traced for `part` alone has)."""
    outputs = {t.name: i for i, t in enumerate(part.outputs)}
    inputs = {name: i for i, name in enumerate([t.name for t in part.inputs] + weights)}
    kept = sorted((v for v in model.graph.outputs if v.name in outputs), key=lambda v: outputs[v.name])
    model.graph.outputs.clear()
    model.graph.outputs.extend(kept)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    kept = sorted((v for v in model.graph.inputs if v.name in inputs), key=lambda v: inputs[v.name])
    model.graph.inputs.clear()
    model.graph.inputs.extend(kept)
    model.graph.name = part.name
    return ir.serde.serialize_model(model)


# The rewrites of onnxscript's default set that shorten these graphs: shape arithmetic feeding a
# Reshape made constant where the shapes allow, and chained Reshapes and Slices merged
REWRITE_RULES = [
    rewrite_rules.materialize_reshape_shape_rule,
    rewrite_rules.collapse_slice_rule,
    rewrite_rules.collapse_slice2_rule,
    rewrite_rules.reshape_reshape_rule,
]


class _RecordedValuesInterpreter(type_promotion._TypePromotionInterpreter):
    """torch.onnx's type-promotion interpreter taking each node's value from the trace's record
    (`meta["val"]`) instead of running the op again on fake tensors; a node the promotion changes
    (and each cast it inserts) still runs. The graph is the same (a test compares them); the
    digits model's fp32 graphs take 0.3 s instead of 7 s."""

    def run_node(self, n: fx.Node) -> Any:
        if n.op != "call_function" or "val" not in n.meta:
            return super().run_node(n)
        before = (n.args, n.kwargs)
        with self._set_current_node(n):
            if rule := type_promotion.get_type_promotion_rule(n, self.type_promotion_table):
                self._maybe_promote_node(n, rule)
        if (n.args, n.kwargs) != before:  # promoted: its value changed
            return fx.Interpreter.run_node(self, n)
        return n.meta["val"]


def insert_type_promotion(graph: fx.GraphModule, recorded: bool = True) -> None:
    """torch.onnx's explicit type promotion (casts where ATen promotes implicitly, which ONNX ops
    do not), in place; `recorded`: reusing the trace's values (`_RecordedValuesInterpreter`),
    else torch.onnx's own pass."""
    transform = type_promotion.InsertTypePromotion(graph)
    if recorded:
        transform.interpreter = _RecordedValuesInterpreter(graph, type_promotion.TypePromotionTable())
    transform.run()


def simplify(model: ir.Model) -> None:
    """The part of onnxscript's optimizer these graphs need, in place: constant folding (which
    also turns `SplitToSequence`, which TensorRT cannot parse, into `Split`), REWRITE_RULES, and
    common subexpressions. The digits model's deep step graph: 1291 nodes to 584 in 0.1 s, where
    the whole optimizer (`optimize_ir`, what torch.onnx runs) takes 1.1 s to reach 555 (25 of the
    difference are constants it lifts to initializers), and both step at the same speed in ONNX
    Runtime; onnxscript's other default rules remove 3 more nodes here at 10x the cost."""
    onnxscript.optimizer.fold_constants_ir(model, onnx_shape_inference=False)
    onnxscript.rewriter.RewritePass(REWRITE_RULES)(model)
    ir.passes.common.CommonSubexpressionEliminationPass()(model)
    ir.passes.common.RemoveUnusedNodesPass()(model)


def _set_signature(
    model: ir.Model,
    graph: fx.GraphModule,
    values: dict[str, Any],
    weights: list[str],
    spec: GraphSpec,
) -> None:
    """The translated graph's inputs (the declared ones, then the weights) and outputs, named as
    declared."""
    model.graph.inputs.clear()  # the translator's, from the placeholders in trace order
    model.graph.outputs.clear()
    declared = [t.name for t in spec.inputs + spec.outputs] + weights
    for node in model.graph:  # an inner value may carry a name the signature needs
        for value in node.outputs:
            if value.name in declared:
                value.name = f"{value.name}_inner"
    placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
    named = dict(zip(placeholders, weights + [t.name for t in spec.inputs], strict=True))
    inputs = sorted(placeholders, key=lambda n: named[n] in weights)  # declared inputs first
    for node in inputs:
        values[node.name].name = named[node]
        model.graph.inputs.append(values[node.name])
    (results,) = [n.args[0] for n in graph.graph.nodes if n.op == "output"]
    results = results if isinstance(results, (list, tuple)) else [results]
    for node, tensor in zip(results, spec.outputs, strict=True):
        values[node.name].name = tensor.name
        model.graph.outputs.append(values[node.name])


def _declared_dim(dim: Any, dim_names: dict[str, str]) -> Any:
    """A traced dim as declared: a symbol's declared name, a constant the tracer kept symbolic as
    its int."""
    if not isinstance(dim, ir.SymbolicDim):
        return dim
    text = str(dim.value)
    return int(text) if text.isdigit() else dim_names.get(text, dim)


def write_block_graph(
    template: onnx.ModelProto,
    tensors: Mapping[str, torch.Tensor],
    spec: GraphSpec,
    path: Path,
    shared: dict[str, tuple[int, int]] | None = None,
) -> None:
    """`template` with the weights among its inputs turned into initializers holding `tensors`
    (cast to the dtype the template declares), written one tensor at a time: into the protobuf,
    or (`shared`, a block past SHARED_WEIGHTS_BYTES) into its weights file `spec.data_file` at
    page-aligned offsets (so ONNX Runtime can map them), where `shared` lists what the block's
    earlier graphs wrote there (reused, not written twice). Then `onnx.checker` and the
    declared-signature check."""
    model = onnx.ModelProto()
    model.CopyFrom(template)
    model.graph.name = spec.name  # the template's is the first traced block's
    inputs = list(model.graph.input)
    del model.graph.input[:]
    model.graph.input.extend(v for v in inputs if v.name not in tensors)
    data = path.with_name(spec.data_file)
    try:
        _write_initializers(model, inputs, tensors, data, shared)
    except OSError as err:
        raise StarflowError(
            f"export of graph {spec.name} failed: cannot write {data}: {err.strerror}"
        ) from None
    try:
        onnx.save(model, str(path))
    except (OSError, ValueError) as err:
        raise StarflowError(f"export of graph {spec.name} failed: cannot write {path}: {err}") from None
    check_graph_file(path, spec)


def _write_initializers(
    model: onnx.ModelProto,
    inputs: list[onnx.ValueInfoProto],
    tensors: Mapping[str, torch.Tensor],
    data: Path,
    shared: dict[str, tuple[int, int]] | None,
) -> None:
    """`write_block_graph`'s initializers: the weights among `inputs`, one tensor at a time."""
    with open(data, "ab") if shared is not None else contextlib.nullcontext() as out:
        for value in (v for v in inputs if v.name in tensors):
            dtype = TORCH_DTYPES[value.type.tensor_type.elem_type]
            if out is None:
                array = tensors[value.name].detach().to(dtype).contiguous().numpy()
                model.graph.initializer.append(onnx.numpy_helper.from_array(array, value.name))
                continue
            key = f"{value.name}:{dtype}"  # the block's tensor in this graph's dtype
            if key not in shared:
                array = tensors[value.name].detach().to(dtype).contiguous().numpy()
                out.write(bytes(-out.tell() % ALIGNMENT))
                shared[key] = (out.tell(), array.nbytes)
                out.write(memoryview(array).cast("B"))
                del array
            offset, length = shared[key]
            dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
            initializer = onnx.TensorProto(
                name=value.name, dims=dims, data_type=value.type.tensor_type.elem_type
            )
            initializer.data_location = onnx.TensorProto.EXTERNAL
            for field, entry in (("location", data.name), ("offset", offset), ("length", length)):
                initializer.external_data.add(key=field, value=str(entry))
            model.graph.initializer.append(initializer)


def weight_bytes(module: nn.Module) -> int:
    """The bytes of what a graph of `module` holds as initializers: parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in named_tensors(module).values())


def export_module(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    dynamic_shapes: tuple[Any, ...],
    spec: GraphSpec,
    path: Path,
    opset: int,
) -> None:
    """Export a component's `module` to `path` through torch.export, optimise it, check it, and
    prove its I/O signature kept every symbolic dim."""
    model = trace_module(module, args, dynamic_shapes, spec, opset)
    write_graph(model, spec, path, optimize=True, external_data=weight_bytes(module) > EXTERNAL_DATA_BYTES)


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
    check_graph_file(path, spec)


def check_graph_file(path: Path, spec: GraphSpec) -> None:
    """`onnx.checker` (with shape inference) on the written file, and its declared signature."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise StarflowError(f"graph {spec.name}: onnx.checker failed: {err}") from None
    spec.check_signature(onnx.load(str(path), load_external_data=False))
