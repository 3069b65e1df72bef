"""TensorRT engines: profiles, cache keys, builder choice, and real TensorRT-RTX builds on CPU.

Builds need `tensorrt_rtx` (it builds without a GPU); running engines needs a GPU and lives in
test_trt_gpu.py. Builds here use optimization level 0 and one target (SM86) to stay fast.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from starflow.cli.main import app
from starflow.cli.parse import parse_hw, parse_range
from starflow.contract.manifest import (
    MANIFEST_NAME,
    EngineProfile,
    Graph,
    Latent,
    Manifest,
    Range,
    TensorSpec,
    sha256,
)
from starflow.core.errors import StarflowError
from starflow.export import trt
from starflow.export.trt import EngineOptions
from starflow.export.trt_profiles import (
    BuildSettings,
    cache_key,
    derive_profiles,
    graph_profiles,
    input_shapes,
)
from starflow.runtime import Pipeline
from starflow.runtime.trt_backend import call_dims, select_profile
from tests.conftest import FIXTURES

T2I = FIXTURES / "official-t2i-tiny"
HAS_RTX = trt.import_module("tensorrt_rtx") is not None
BUILD = EngineOptions(
    builder="tensorrt-rtx",
    profiles=(),
    grids=((8, 8), (8, 12)),
    batch=Range(1, 2, 4),
    optimization_level=0,
    compute_capabilities=("SM86",),
)

# A manifest's dims as the fixture's export writes them (text-conditioned, 8x8 token grid trained).
DIMS = {
    "batch": Range(1, 2, 16),
    "tokens": Range(16, 64, 256),
    "chunk": Range(1, 16, 256),
    "past": Range(0, 38, 261),
    "text": Range(1, 6, 6),
}
LATENT = Latent(
    channels=1, patch_size=2, token_dim=4, train=(16, 16), min=(8, 8), max=(32, 32), multiple_of=2
)
STEP = Graph(
    name="block2.step.fp32", block=2, kind="step", precision="fp32", file="block2.step.fp32.onnx",
    sha256="a" * 64, bytes=1, external_data=(),
    inputs=(
        TensorSpec("x", "float32", ("batch", "chunk", 4)),
        TensorSpec("past_keys", "float32", (2, "batch", 4, "past", 16)),
        TensorSpec("grid", "int64", (2,)),
    ),
    outputs=(), profile={"batch": DIMS["batch"], "chunk": DIMS["chunk"], "past": DIMS["past"]},
)  # fmt: skip


def profiles(kinds=("default",), grids=(), batch=None, chunk=16):
    return derive_profiles(DIMS, LATENT, chunk, kinds, grids, batch)


# ---- units (no TensorRT needed) ----------------------------------------------------------------
def test_profiles_derive_from_the_manifest_dims():
    default, sequential, jacobi, grid = profiles(
        ("default", "sequential", "jacobi"), grids=[(8, 12)], chunk=32
    )
    assert default.dims == DIMS
    assert sequential.dims == {**DIMS, "chunk": Range(1, 1, 1)}
    assert jacobi.dims["chunk"] == Range(1, 32, 32)
    assert grid.name == "grid 8x12"
    assert grid.dims["tokens"] == Range(96, 96, 96)
    assert grid.dims["chunk"] == Range(1, 32, 96)  # tuned for the Jacobi chunk
    assert grid.dims["past"] == Range(0, 6 + 48, 6 + 95)  # text, then up to every token but the last
    narrow = profiles(batch=Range(1, 2, 4))
    assert narrow[0].dims["batch"] == Range(1, 2, 4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kinds=("fast",)), "choose from"),
        (dict(grids=[(2, 8)]), "covers token grids 4x4 .. 16x16"),
        (dict(batch=Range(1, 2, 32)), "allow rows 1..16"),
        (dict(kinds=()), "no profiles"),
        (dict(chunk=0), "jacobi_chunk: must be an integer >= 1"),
    ],
)
def test_profile_options_out_of_range_are_refused(kwargs, message):
    with pytest.raises(StarflowError, match=message):
        profiles(**kwargs)


def test_graph_profiles_keep_only_the_graphs_dims_and_drop_duplicates():
    chosen = profiles(("default", "sequential"), grids=[(8, 8)])
    prefill = dataclasses.replace(STEP, profile={"batch": DIMS["batch"], "text": DIMS["text"]})
    assert [p.name for p in graph_profiles(prefill, chosen)] == ["default"]
    step = graph_profiles(STEP, chosen)
    assert [p.name for p in step] == ["default", "sequential", "grid 8x8"]
    assert set(step[2].dims) == {"batch", "chunk", "past"}
    shapes = input_shapes(STEP, step[1])
    assert shapes["x"] == ([1, 1, 4], [2, 1, 4], [16, 1, 4])
    assert shapes["past_keys"][2] == [2, 16, 4, 261, 16]
    assert shapes["grid"] == ([2], [2], [2])


@pytest.mark.parametrize("text, expected", [("4", (1, 4, 4)), ("1:2:8", (1, 2, 8))])
def test_parse_range(text, expected):
    assert parse_range(text, "--batch") == Range(*expected)


@pytest.mark.parametrize("text", ["0", "4:2:8", "a", "1:2"])
def test_parse_range_refuses(text):
    with pytest.raises(StarflowError, match="--batch"):
        parse_range(text, "--batch")


def test_parse_grid():
    assert parse_hw("8x12", "--grid", "tokens", "8x12") == (8, 12)
    with pytest.raises(StarflowError, match="--grid: expected HxW in tokens"):
        parse_hw("8", "--grid", "tokens", "8x12")


def test_cache_key_changes_with_everything_an_engine_depends_on():
    settings = BuildSettings("tensorrt_rtx", "1.7.1", ("SM86",), None, 3, None)
    default = graph_profiles(STEP, profiles())
    key = cache_key(STEP, default, settings)
    assert key == cache_key(dataclasses.replace(STEP), default, settings)  # deterministic
    variants = [
        cache_key(dataclasses.replace(STEP, sha256="b" * 64), default, settings),
        cache_key(dataclasses.replace(STEP, precision="fp16"), default, settings),
        cache_key(STEP, graph_profiles(STEP, profiles(("sequential",))), settings),
        cache_key(STEP, default, BuildSettings("tensorrt", "1.7.1", ("SM86",), None, 3, None)),
        cache_key(STEP, default, BuildSettings("tensorrt_rtx", "1.8.0", ("SM86",), None, 3, None)),
        cache_key(STEP, default, BuildSettings("tensorrt_rtx", "1.7.1", ("SM89",), None, 3, None)),
        cache_key(STEP, default, BuildSettings("tensorrt_rtx", "1.7.1", ("SM86",), "H100", 3, None)),
        cache_key(STEP, default, BuildSettings("tensorrt_rtx", "1.7.1", ("SM86",), None, 5, None)),
    ]
    assert len({key, *variants}) == len(variants) + 1


def _fake_modules(monkeypatch, available: dict[str, object]) -> None:
    monkeypatch.setattr(trt, "import_module", lambda name: available.get(name))


def test_builder_choice_prefers_full_tensorrt(monkeypatch):
    full, rtx = SimpleNamespace(__version__="10.13"), SimpleNamespace(__version__="1.7")
    _fake_modules(monkeypatch, {"tensorrt": full, "tensorrt_rtx": rtx})
    assert trt.choose_builder().name == "tensorrt"
    assert trt.choose_builder("tensorrt-rtx").module is rtx
    _fake_modules(monkeypatch, {"tensorrt_rtx": rtx})
    chosen = trt.choose_builder("auto")
    assert (chosen.name, chosen.version, chosen.rtx) == ("tensorrt_rtx", "1.7", True)
    with pytest.raises(StarflowError, match="the tensorrt module is not installed"):
        trt.choose_builder("tensorrt")
    with pytest.raises(StarflowError, match="builder: expected auto or one of"):
        trt.choose_builder("onnx")


def test_no_tensorrt_of_either_kind_names_the_package(monkeypatch):
    _fake_modules(monkeypatch, {})
    with pytest.raises(StarflowError, match=r"starflow\[tensorrt-rtx\].*tensorrt-rtx-cu13"):
        trt.choose_builder()


@pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx not installed")
def test_rtx_targets_default_to_ampere_and_newer():
    rtx = trt.choose_builder("tensorrt-rtx")
    targets, device = trt.resolve_targets(rtx, [])
    assert "SM75" not in targets and "SM86" in targets and device is None
    assert trt.resolve_targets(rtx, ["sm89", "SM89"]) == (["SM89"], None)
    with pytest.raises(StarflowError, match="builds for"):
        trt.resolve_targets(rtx, ["SM90"])  # Hopper: not a TensorRT-RTX target


def test_runtime_picks_the_narrowest_profile_and_refuses_others():
    engine_profiles = [
        {"batch": Range(1, 2, 16), "chunk": Range(1, 16, 256), "past": Range(0, 38, 261)},
        {"batch": Range(1, 2, 16), "chunk": Range(1, 1, 1), "past": Range(0, 38, 261)},
    ]
    assert select_profile(engine_profiles, {"batch": 2, "chunk": 1, "past": 10}) == 1
    assert select_profile(engine_profiles, {"batch": 2, "chunk": 16, "past": 10}) == 0
    with pytest.raises(StarflowError, match=r"batch 32.*runs batch 1..16, chunk 1..256"):
        select_profile(engine_profiles, {"batch": 32, "chunk": 1, "past": 0})


def test_runtime_reads_dims_from_the_feeds():
    feeds = {
        "x": np.zeros((2, 3, 4), np.float32),
        "past_keys": np.zeros((2, 2, 4, 7, 16), np.float32),
        "grid": np.array([4, 4]),
    }
    assert call_dims(STEP.inputs, feeds) == {"batch": 2, "chunk": 3, "past": 7}
    with pytest.raises(StarflowError, match="batch = 3 disagrees"):
        call_dims(STEP.inputs, {**feeds, "past_keys": np.zeros((2, 3, 4, 7, 16), np.float32)})
    with pytest.raises(StarflowError, match="expected float32"):
        call_dims(STEP.inputs, {**feeds, "x": np.zeros((2, 3, 4), np.float16)})
    with pytest.raises(StarflowError, match="missing input"):
        call_dims(STEP.inputs, {"x": feeds["x"]})


# ---- real builds with TensorRT-RTX -------------------------------------------------------------
@pytest.fixture(scope="session")
def artifacts(fixture_artifacts: Path) -> Path:
    """The session's shared fixture export (tests/conftest.py); builds work on copies of it."""
    return fixture_artifacts


@pytest.fixture(scope="session")
def built(artifacts, tmp_path_factory) -> tuple[Path, list[trt.EngineResult]]:
    if not HAS_RTX:
        pytest.skip("tensorrt_rtx not installed")
    work = tmp_path_factory.mktemp("built") / "artifacts"
    shutil.copytree(artifacts, work)
    return work, trt.build_engines(work, BUILD)


def _copy(directory: Path, tmp_path: Path) -> Path:
    shutil.copytree(directory, tmp_path / "copy")
    return tmp_path / "copy"


@pytest.mark.slow
def test_engines_for_every_graph_at_fp32_and_fp16(built):
    directory, results = built
    manifest = Manifest.load(directory)  # schema-checked, engines section included
    assert all(r.built for r in results)
    block_graphs = {g.name for g in manifest.graphs if g.block is not None}
    assert {e.graph for e in manifest.engines} == block_graphs  # components stay on ORT
    assert {e.precision for e in manifest.engines} == {"fp32", "fp16"}
    import tensorrt_rtx

    for entry in manifest.engines:
        path = directory / entry.file
        assert path.stat().st_size == entry.bytes > 0
        assert sha256(path) == entry.sha256
        assert (entry.builder.name, entry.builder.version) == ("tensorrt_rtx", tensorrt_rtx.__version__)
        assert entry.compute_capabilities == ("SM86",) and entry.device is None
        assert entry.strongly_typed and entry.optimization_level == 0
        assert all(p.dims["batch"] == Range(1, 2, 4) for p in entry.profiles)
    step = manifest.engine("block2.step.fp16")
    assert [p.name for p in step.profiles] == ["grid 8x8", "grid 8x12"]
    assert step.profiles[1].dims["chunk"] == Range(1, 16, 96)
    assert not list(directory.glob(".*.partial-*")), "temporary files left behind"


@pytest.mark.slow
def test_second_run_builds_nothing(built, tmp_path):
    directory, _ = built
    before = {p.name: p.stat().st_mtime_ns for p in directory.glob("*.engine")}
    assert not any(r.built for r in trt.build_engines(directory, BUILD))
    assert {p.name: p.stat().st_mtime_ns for p in directory.glob("*.engine")} == before
    args = ["export", "trt", str(directory), "--builder", "tensorrt-rtx"]
    args += ["--grid", "8x8", "--grid", "8x12", "--batch", "1:2:4", "--optimization-level", "0"]
    result = CliRunner().invoke(app, [*args, "--compute-capability", "SM86"])
    assert result.exit_code == 0, result.output
    assert "nothing built" in result.output


@pytest.mark.slow
def test_only_changed_engines_are_rebuilt(built, tmp_path):
    directory = _copy(built[0], tmp_path)
    (directory / "block2.prefill.fp32.engine").unlink()
    (directory / "block0.forward.fp16.engine").write_bytes(b"tampered")
    results = trt.build_engines(directory, BUILD)
    assert sorted(r.graph for r in results if r.built) == ["block0.forward.fp16", "block2.prefill.fp32"]
    Manifest.load(directory)


@pytest.mark.slow
def test_corrupted_engine_is_detected_by_sha256_at_load(built, tmp_path):
    directory = _copy(built[0], tmp_path)
    path = directory / "block2.step.fp32.engine"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StarflowError, match=r"block2.step.fp32.engine does not match its sha256"):
        Pipeline.load(directory, backend="tensorrt")


@pytest.mark.slow
def test_tensorrt_backend_without_a_gpu_says_so(built, tmp_path):
    pytest.importorskip("cuda.bindings")
    from cuda.bindings import runtime as cudart

    if cudart.cudaGetDeviceCount()[0] == cudart.cudaError_t.cudaSuccess:
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(StarflowError, match="no CUDA device or driver found.*use backend 'onnxruntime'"):
        Pipeline.load(built[0], backend="tensorrt")
    out = tmp_path / "x.png"
    args = [
        "generate",
        "--artifacts",
        str(built[0]),
        "--backend",
        "tensorrt",
        "--prompt",
        "",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "no CUDA device or driver found" in result.output and not out.exists()


@pytest.mark.slow
def test_directory_without_engines_says_how_to_build_them(artifacts):
    with pytest.raises(StarflowError, match="no TensorRT engine for graph block2.step.fp32.*export trt"):
        Pipeline.load(artifacts, backend="tensorrt")


@pytest.mark.slow
@pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx not installed")
def test_tensorrt_errors_are_surfaced(artifacts):
    manifest = Manifest.load(artifacts, verify_files=False)
    graph = manifest.graph("block2.step.fp32")
    rtx = trt.choose_builder("tensorrt-rtx")
    settings = BuildSettings(rtx.name, rtx.version, ("SM75",), None, 0, None)
    chosen = graph_profiles(graph, derive_profiles(manifest.dims, manifest.latent, 16))
    with pytest.raises(StarflowError, match=r"failed to build .*SM75.*Error Code"):  # no FP32 GEMM on Turing
        trt.build_engine(rtx, artifacts / graph.file, graph, chosen, settings)
    inverted = [EngineProfile("inverted", {**chosen[0].dims, "batch": Range(4, 2, 1)})]
    settings = BuildSettings(rtx.name, rtx.version, ("SM86",), None, 0, None)
    with pytest.raises(StarflowError, match=r"profile 'inverted'.*MIN<=OPT<=MAX"):
        trt.build_engine(rtx, artifacts / graph.file, graph, inverted, settings)


def test_directory_without_a_manifest(tmp_path):
    with pytest.raises(StarflowError, match="no manifest.json"):
        trt.build_engines(tmp_path, EngineOptions(builder="tensorrt-rtx"))
    result = CliRunner().invoke(app, ["export", "trt", str(tmp_path)])
    assert result.exit_code == 2 and "no manifest.json" in result.output


@pytest.mark.slow
def test_manifest_from_a_newer_schema(artifacts, tmp_path):
    directory = _copy(artifacts, tmp_path)
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    (directory / MANIFEST_NAME).write_text(json.dumps({**manifest, "schema_version": 99}))
    with pytest.raises(StarflowError, match="schema_version 99"):
        trt.build_engines(directory, EngineOptions(builder="tensorrt-rtx"))


@pytest.mark.slow
def test_missing_onnx_file(artifacts, tmp_path):
    directory = _copy(artifacts, tmp_path)
    (directory / "block1.step.fp16.onnx").unlink()
    with pytest.raises(StarflowError, match=r"block1.step.fp16.onnx is missing"):
        trt.build_engines(directory, EngineOptions(builder="tensorrt-rtx"))


@pytest.mark.slow
def test_options_are_checked_before_any_build(artifacts, monkeypatch):
    with pytest.raises(StarflowError, match=r"precisions \['bf16'\]"):
        trt.build_engines(artifacts, EngineOptions(precisions=("bf16",)))
    with pytest.raises(StarflowError, match="optimization_level: expected 0..5"):
        trt.build_engines(artifacts, EngineOptions(optimization_level=7))
    _fake_modules(monkeypatch, {})
    with pytest.raises(StarflowError, match="tensorrt-rtx-cu13"):
        trt.build_engines(artifacts)
    assert not list(artifacts.glob("*.engine"))
