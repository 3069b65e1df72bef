"""ONNX export of the official tiny T2I fixture: checker, symbolic dims, manifest, validation.

That the graphs alone reproduce the official samples (fp32 and fp16, a non-square grid) is
tested through the runtime, which drives only the graphs: tests/runtime/test_pipeline.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

import starflow
from starflow.cli.main import app
from starflow.contract.manifest import (
    MANIFEST_NAME,
    RECORD_NAME,
    SCHEMA_VERSION,
    Manifest,
    check_schema,
    sha256,
)
from starflow.model.testing import perturb_
from tests.conftest import T2I

pytestmark = pytest.mark.skipif(not T2I.is_dir(), reason=f"shared fixtures not found at {T2I}")
runner = CliRunner()


# ---- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model() -> starflow.StarFlow:
    return starflow.load_model(T2I / "config.yaml", T2I / "checkpoint.pth")


def test_fp16_graphs_keep_io_and_head_in_fp32(fixture_artifacts):
    manifest = Manifest.load(fixture_artifacts)
    for graph in (g for g in manifest.graphs if g.precision == "fp16"):
        dtypes = {t.name: t.dtype for t in graph.inputs + graph.outputs}
        assert all(dtypes[n] == "float32" for n in ("x", "mu", "sigma", "z", "logdet", "text") if n in dtypes)
        assert all(dtypes[n] == "float16" for n in ("past_keys", "new_keys", "keys") if n in dtypes)
    assert "softmax" in manifest.precisions["fp16"].fp32_ops


# ---- the artifacts -------------------------------------------------------------------------------
def test_every_graph_passes_the_checker_and_keeps_symbolic_dims(fixture_artifacts):
    manifest = Manifest.load(fixture_artifacts)
    names = [g.name for g in manifest.graphs]
    # fp32 + fp16: step + forward per block, prefill for the deep one (exported with --no-denoise)
    assert len(names) == 14 and manifest.denoise is None
    for graph in manifest.graphs:
        path = fixture_artifacts / graph.file
        onnx.checker.check_model(str(path), full_check=True)
        inferred = onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True)
        for declared, value in zip(graph.outputs, inferred.graph.output, strict=True):
            dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            assert dims == list(declared.shape), (graph.name, declared.name, dims)
            assert any(isinstance(d, str) for d in dims)


def test_step_graph_runs_at_shapes_other_than_the_example(fixture_artifacts):
    """Batch 1 and 5, chunk 1 and 7, empty and long cache: nothing was specialised."""
    graph = Manifest.load(fixture_artifacts).graph("block1.step.fp32")
    session = ort.InferenceSession(str(fixture_artifacts / graph.file), providers=["CPUExecutionProvider"])
    for batch, chunk, past, grid in [(1, 1, 0, (4, 4)), (5, 7, 40, (8, 12)), (3, 16, 100, (16, 8))]:
        feeds = {
            "x": np.zeros((batch, chunk, 4), np.float32),
            "past_keys": np.zeros((1, batch, 4, past, 16), np.float32),
            "past_values": np.zeros((1, batch, 4, past, 16), np.float32),
            "grid": np.array(grid, np.int64),
            "start": np.array(past, np.int64),
        }
        mu, sigma, keys, _ = session.run(None, feeds)
        assert mu.shape == sigma.shape == (batch, chunk, 4)
        assert keys.shape == (1, batch, 4, chunk, 16)


def test_manifest_validates_and_sha256s_match(fixture_artifacts):
    manifest = json.loads((fixture_artifacts / MANIFEST_NAME).read_text())
    record = json.loads((fixture_artifacts / RECORD_NAME).read_text())
    check_schema(manifest, "test")
    check_schema(record, "test", RECORD_NAME)
    assert manifest["schema_version"] == record["schema_version"] == SCHEMA_VERSION
    assert record["manifest_sha256"] == sha256(fixture_artifacts / MANIFEST_NAME)
    assert [b["index"] for b in manifest["blocks"]] == [2, 1, 0]  # sampling order
    for graph in manifest["graphs"]:
        assert sha256(fixture_artifacts / graph["file"]) == graph["sha256"]
    assert record["validation"] and all(v["passed"] for v in record["validation"])
    cases = {v["case"] for v in record["validation"]}
    assert len(cases) >= 3
    manifest["unexpected"] = 1
    with pytest.raises(starflow.StarflowError, match="schema"):
        check_schema(manifest, "test")


def test_permutations_follow_the_official_rule(fixture_artifacts, model):
    manifest = Manifest.load(fixture_artifacts)
    for block in manifest.blocks:
        assert block.permutation == ("flip" if model.blocks[block.index].flip else "identity")


def test_inspect_and_validate_commands(fixture_artifacts):
    result = runner.invoke(app, ["inspect", str(fixture_artifacts)])
    assert result.exit_code == 0, result.output
    assert "block2.step.fp32.onnx" in result.output and "sampling order" in result.output
    assert "text: 32-wide embeddings, up to 6 tokens" in result.output
    assert "{" not in result.output  # readable lines, not a Python dict
    result = runner.invoke(
        app, ["validate", str(fixture_artifacts), "--checkpoint", str(T2I / "checkpoint.pth")]
    )
    assert result.exit_code == 0, result.output
    assert "passed" in result.output


def test_validate_fails_loudly_naming_graph_tensor_and_shape(fixture_artifacts, model, tmp_path):
    other = starflow.load_model(T2I / "config.yaml", T2I / "checkpoint.pth")
    perturb_(other, seed=1, std=0.02)
    for mine, theirs in zip(other.blocks, model.blocks, strict=True):  # the manifest still fits
        mine.sos_embed.data.copy_(theirs.sos_embed)
    checkpoint = tmp_path / "other.safetensors"
    starflow.save_model(other, checkpoint)
    result = runner.invoke(app, ["validate", str(fixture_artifacts), "--checkpoint", str(checkpoint)])
    assert result.exit_code != 0
    assert "graph block" in result.output and "tensor " in result.output and "shape [" in result.output


def test_validate_detects_a_modified_graph(fixture_artifacts, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(fixture_artifacts, copy)
    with open(copy / "block0.step.fp32.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(starflow.StarflowError, match="sha256"):
        Manifest.load(copy)


def test_typed_manifest_round_trips_its_json(fixture_artifacts):
    """The dataclasses are the JSON one to one: nothing dropped, renamed or added on a rewrite."""
    data = json.loads((fixture_artifacts / MANIFEST_NAME).read_text())
    manifest = Manifest.load(fixture_artifacts)
    assert manifest.to_dict() == data
    assert manifest.graph("block2.step.fp32").input("past_keys").shape == (
        2,
        "batch",
        4,
        "past",
        16,
    )  # 2 layers
    with pytest.raises(starflow.StarflowError, match="no graph named 'block9.step.fp32'"):
        manifest.graph("block9.step.fp32")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_recorded_type_promotion_gives_torch_onnx_graphs(tmp_path, monkeypatch, precision):
    """The promotion pass that reuses the trace's values writes the graphs torch.onnx's own pass
    writes, byte for byte (every kind, the backward of vjp included), and no graph keeps a
    sequence op (TensorRT cannot parse SplitToSequence)."""
    import functools

    import onnx

    from starflow.core.config import StarFlowConfig
    from starflow.export import trace
    from starflow.export.graphs import Precision, block_specs
    from starflow.model.testing import random_model

    shapes = dict(channel_size=2, img_size=4, patch_size=1, channels=32, head_dim=16, txt_size=2, txt_dim=8)
    model = random_model(StarFlowConfig(**shapes, layers_per_block=[1, 2], rope=True, sos=True))
    deep = model.sampling_blocks()[0]
    specs = block_specs(model.config, deep, precision, density=True, vjp=precision == "fp32")
    assert {s.kind for s in specs} == {"step", "prefill", "forward"} | (
        {"vjp"} if precision == "fp32" else set()
    )
    for name, recorded in (("recorded", True), ("torch", False)):
        monkeypatch.setattr(
            trace, "insert_type_promotion", functools.partial(trace.insert_type_promotion, recorded=recorded)
        )
        for spec in specs:
            job = trace.GraphJob(spec, deep, Precision(precision, fp32_norms=precision == "fp16"))
            trace.BlockGraphExporter(20).export(job, tmp_path / f"{name}.{spec.file}")
    for spec in specs:
        written = (tmp_path / f"recorded.{spec.file}").read_bytes()
        assert written == (tmp_path / f"torch.{spec.file}").read_bytes(), spec.name
        ops = {n.op_type for n in onnx.load_from_string(written).graph.node}
        assert not {op for op in ops if "Sequence" in op}, spec.name


def test_forward_and_vjp_traced_together_compute_what_each_traced_alone_does(tmp_path):
    """A forward graph exported with its vjp (one trace, `joint_spec`) is the forward graph alone:
    the same signature and outputs, and its vjp reuses the trace."""
    from starflow.core.config import StarFlowConfig
    from starflow.export.graphs import Precision, block_specs
    from starflow.export.trace import BlockGraphExporter, GraphJob
    from starflow.model.testing import random_model

    shapes = dict(channel_size=2, img_size=4, patch_size=1, channels=32, head_dim=16, txt_size=2, txt_dim=8)
    model = random_model(StarFlowConfig(**shapes, layers_per_block=[1, 2], rope=True, sos=True))
    deep = model.sampling_blocks()[0]
    _, _, forward, vjp = block_specs(model.config, deep, "fp32", density=True, vjp=True)
    fp32 = Precision("fp32")
    together, alone = BlockGraphExporter(20), BlockGraphExporter(20)
    assert not together.export(GraphJob(forward, deep, fp32, vjp), tmp_path / forward.file)
    assert together.export(GraphJob(vjp, deep, fp32), tmp_path / vjp.file)  # from the same trace
    for spec in (forward, vjp):
        assert not alone.export(GraphJob(spec, deep, fp32), tmp_path / f"alone.{spec.file}")
    rng = np.random.default_rng(0)
    feeds = {
        "x": rng.standard_normal((2, 16, 2), dtype=np.float32),
        "grid": np.array([4, 4]),
        "grad_z": rng.standard_normal((2, 16, 2), dtype=np.float32),
        "text": rng.standard_normal((2, 2, 8), dtype=np.float32),
    }
    for spec in (forward, vjp):
        runs = [ort.InferenceSession(str(tmp_path / f"{prefix}{spec.file}")) for prefix in ("", "alone.")]
        names = [i.name for i in runs[0].get_inputs()]
        assert names == [i.name for i in runs[1].get_inputs()] == [t.name for t in spec.inputs]
        mine, theirs = (r.run(None, {n: feeds[n] for n in names}) for r in runs)
        for a, b in zip(mine, theirs, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _small_model_jobs():
    """The plan of a 2-block model with text: GraphJobs for every graph, fp32 with vjp graphs."""
    from starflow.core.config import StarFlowConfig
    from starflow.export.onnx import ExportOptions, plan_graphs
    from starflow.model.testing import random_model

    shapes = dict(channel_size=2, img_size=4, patch_size=1, channels=32, head_dim=16, txt_size=2, txt_dim=8)
    model = random_model(StarFlowConfig(**shapes, layers_per_block=[1, 2], rope=True, sos=True))
    return plan_graphs(model, ExportOptions(precisions=("fp32",), density=True))


def test_traces_shared_with_a_forked_child_give_the_files_of_one_process(tmp_path):
    """trace_all splits the traces between this process and a forked child; every file written
    from them is the file a trace in this process alone gives."""
    from starflow.export.trace import BlockGraphExporter

    jobs = _small_model_jobs()
    assert any(job.traced_with is not None for job in jobs)
    files = {}
    for name, parallel in (("forked", True), ("alone", False)):
        exporter = BlockGraphExporter(20)
        traces = exporter.untraced(jobs)
        assert len(traces) < len(jobs)  # the vjp graphs come with their forward graphs
        exporter.trace_all(traces, parallel=parallel)
        for job in jobs:
            path = tmp_path / f"{name}.{job.spec.file}"
            assert exporter.export(job, path)
            files.setdefault(job.spec.file, []).append(path.read_bytes())
    assert all(forked == alone for forked, alone in files.values())


def test_the_forked_tracer_works_after_this_process_ran_openmp(monkeypatch):
    """After this process has run OpenMP regions, the forked child's own parallel copies (a big
    block's example inputs) still run: the child traces its share on one thread, where it once
    waited forever for the parent's OpenMP workers, which do not exist in a child."""
    import torch

    from starflow.export import trace
    from starflow.export.trace import BlockGraphExporter

    torch.ones(20_000_000).add_(1).to(torch.float16)  # OpenMP regions here, before the fork
    example_args = trace.example_args

    def big_example_args(spec, precision):  # a copy big enough to go parallel
        torch.randn(4_000_000).to(precision.dtype)
        return example_args(spec, precision)

    monkeypatch.setattr(trace, "example_args", big_example_args)
    exporter = BlockGraphExporter(20)
    traced_here = []
    trace_here = exporter._trace
    monkeypatch.setattr(exporter, "_trace", lambda jobs: (traced_here.extend(jobs), trace_here(jobs)))
    jobs = exporter.untraced(_small_model_jobs())
    exporter.trace_all(jobs)
    assert 0 < len(traced_here) < len(jobs)  # the child's share came from the child
    assert exporter.untraced(jobs) == []


def test_a_hung_forked_tracer_is_killed_and_its_share_traced_here(monkeypatch):
    import time

    from starflow.export import trace
    from starflow.export.trace import BlockGraphExporter, GraphJob

    here, trace_job = os.getpid(), GraphJob.trace

    def hang_in_child(job, opset):
        if os.getpid() != here:
            time.sleep(600)
        return trace_job(job, opset)

    monkeypatch.setattr(GraphJob, "trace", hang_in_child)
    monkeypatch.setattr(trace, "CHILD_MIN_WAIT_S", 1.0)
    # every job to the child: with no share here to wait twice the time of, the wait is 1 s
    monkeypatch.setattr(trace, "_share_out", lambda jobs: ([], list(jobs)))
    exporter = BlockGraphExporter(20)
    jobs = [job for job in exporter.untraced(_small_model_jobs()) if job.spec.kind == "step"]
    assert len(jobs) == 2
    began = time.monotonic()
    exporter.trace_all(jobs)
    assert exporter.untraced(jobs) == []
    assert time.monotonic() - began < 120


@pytest.mark.parametrize("failing", ["child", "parent"])
def test_a_failed_trace_is_one_error_wherever_it_ran(failing):
    """A trace that fails in the forked child is traced again here and raises its error; one that
    fails here stops the child."""
    import dataclasses as dc

    from starflow.export.trace import BlockGraphExporter

    jobs = _small_model_jobs()
    deep = next(job for job in jobs if job.spec.kind == "step" and job.block.deep)
    shallow = next(job for job in jobs if job.spec.kind == "step" and not job.block.deep)
    # the bigger job stays here, the smaller goes to the child
    bad, good = (shallow, deep) if failing == "child" else (deep, shallow)
    broken = dc.replace(bad, spec=dc.replace(bad.spec, inputs=bad.spec.inputs[:1]))  # too few inputs
    with pytest.raises(starflow.StarflowError, match=f"tracing graph {bad.spec.name} failed"):
        BlockGraphExporter(20).trace_all([good, broken])


def test_blocks_of_one_structure_are_traced_once_with_equal_files(tmp_path):
    """Shallow blocks differing only in weights, index and flip share one trace; each file is
    byte-for-byte the one a trace of that block gives, and a differently shaped block is traced."""
    from starflow.core.config import StarFlowConfig
    from starflow.export.graphs import BlockMethod, Precision, block_specs
    from starflow.export.trace import BlockGraphExporter, GraphJob, structure_key
    from starflow.model.testing import random_model

    shapes = dict(channel_size=2, img_size=4, patch_size=1, channels=32, head_dim=16, txt_size=2, txt_dim=8)
    config = StarFlowConfig(**shapes, layers_per_block=[1, 1, 2], rope=True, cond_top_only=True)
    model = random_model(config)
    deep, middle, first = model.sampling_blocks()
    assert middle.flip != first.flip
    shared, reused = BlockGraphExporter(20), {}
    for block in (deep, middle, first):
        for spec in block_specs(config, block, "fp32", density=False):
            reused[spec.name] = shared.export(GraphJob(spec, block, Precision("fp32")), tmp_path / spec.file)
    assert reused == {"block2.step.fp32": False, "block2.prefill.fp32": False,
                      "block1.step.fp32": False, "block0.step.fp32": True}  # fmt: skip
    spec = block_specs(config, first, "fp32", density=False)[0]
    BlockGraphExporter(20).export(GraphJob(spec, first, Precision("fp32")), tmp_path / "traced.onnx")
    assert (tmp_path / spec.file).read_bytes() == (tmp_path / "traced.onnx").read_bytes()
    x = np.random.default_rng(0).standard_normal((1, 3, 2), dtype=np.float32)
    cache = np.zeros((1, 1, middle.num_kv_heads, 0, middle.head_dim), np.float32)
    feeds = {"x": x, "past_keys": cache, "past_values": cache, "grid": np.array([4, 4]), "start": np.array(0)}
    outputs = [
        ort.InferenceSession(str(tmp_path / f"block{i}.step.fp32.onnx")).run(["mu"], feeds)[0] for i in (0, 1)
    ]
    assert not np.allclose(*outputs)  # each file carries its own block's weights
    # learned positions (rope: 0) are held flipped inside the graph: a flip is a new structure
    learned = random_model(dataclasses.replace(config, rope=False))
    keys = {
        structure_key(spec, BlockMethod(b, "step", Precision("fp32"))) for b in learned.sampling_blocks()[1:]
    }
    assert len(keys) == 2
