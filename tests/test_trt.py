"""TensorRT engines: profiles, cache keys, builder choice, and real TensorRT-RTX builds on CPU.

Builds need `tensorrt_rtx` (it builds without a GPU); running engines needs a GPU and lives in
test_trt_gpu.py. Builds here use optimization level 0 and one target (SM86) to stay fast.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from starflow.cli.main import app
from starflow.errors import StarflowError
from starflow.export import trt
from starflow.export.manifest import MANIFEST_NAME, load_manifest, sha256
from starflow.runtime import Pipeline
from starflow.runtime.trt_backend import call_dims, select_profile
from tests.conftest import FIXTURES

T2I = FIXTURES / "official-t2i-tiny"
HAS_RTX = trt.import_module("tensorrt_rtx") is not None
BUILD = dict(
    builder="tensorrt-rtx",
    profiles=(),
    grids=[(8, 8), (8, 12)],
    batch=(1, 2, 4),
    optimization_level=0,
    compute_capabilities=["SM86"],
)

# A manifest's dims as the fixture's export writes them (text-conditioned, 8x8 token grid trained).
DIMS = {
    "batch": (1, 2, 16),
    "tokens": (16, 64, 256),
    "chunk": (1, 16, 256),
    "past": (0, 38, 261),
    "text": (1, 6, 6),
}
MANIFEST = {
    "dims": {d: dict(zip(("min", "opt", "max"), r, strict=True)) for d, r in DIMS.items()},
    "jacobi": {"block_size": 16},
    "latent": {"patch_size": 2, "min": [8, 8], "max": [32, 32]},
}
STEP = {
    "name": "block2.step.fp32",
    "precision": "fp32",
    "sha256": "a" * 64,
    "external_data": [],
    "profile": {"batch": {}, "chunk": {}, "past": {}},
    "inputs": [
        {"name": "x", "dtype": "float32", "shape": ["batch", "chunk", 4]},
        {"name": "past_keys", "dtype": "float32", "shape": [2, "batch", 4, "past", 16]},
        {"name": "grid", "dtype": "int64", "shape": [2]},
    ],
}


# ---- units (no TensorRT needed) ----------------------------------------------------------------
def test_profiles_derive_from_the_manifest_dims():
    default, sequential, jacobi, grid = trt.derive_profiles(
        MANIFEST, ("default", "sequential", "jacobi"), grids=[(8, 12)], jacobi_chunk=32
    )
    assert default.dims == DIMS
    assert sequential.dims == {**DIMS, "chunk": (1, 1, 1)}
    assert jacobi.dims["chunk"] == (1, 32, 32)
    assert grid.name == "grid 8x12"
    assert grid.dims["tokens"] == (96, 96, 96)
    assert grid.dims["chunk"] == (1, 32, 96)  # tuned for the Jacobi chunk
    assert grid.dims["past"] == (0, 6 + 48, 6 + 95)  # text, then up to every token but the last
    narrow = trt.derive_profiles(MANIFEST, ("default",), batch=(1, 2, 4))
    assert narrow[0].dims["batch"] == (1, 2, 4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kinds=("fast",)), "choose from"),
        (dict(grids=[(2, 8)]), "covers token grids 4x4 .. 16x16"),
        (dict(batch=(1, 2, 32)), "allow rows 1..16"),
        (dict(kinds=()), "no profiles"),
    ],
)
def test_profile_options_out_of_range_are_refused(kwargs, message):
    with pytest.raises(StarflowError, match=message):
        trt.derive_profiles(MANIFEST, **kwargs)


def test_graph_profiles_keep_only_the_graphs_dims_and_drop_duplicates():
    profiles = trt.derive_profiles(MANIFEST, ("default", "sequential"), grids=[(8, 8)])
    prefill = {"profile": {"batch": {}, "text": {}}}
    assert [p.name for p in trt.graph_profiles(prefill, profiles)] == ["default"]
    step = trt.graph_profiles(STEP, profiles)
    assert [p.name for p in step] == ["default", "sequential", "grid 8x8"]
    assert set(step[2].dims) == {"batch", "chunk", "past"}
    shapes = trt.input_shapes(STEP, step[1])
    assert shapes["x"] == ([1, 1, 4], [2, 1, 4], [16, 1, 4])
    assert shapes["past_keys"][2] == [2, 16, 4, 261, 16]
    assert shapes["grid"] == ([2], [2], [2])


@pytest.mark.parametrize("text, expected", [("4", (1, 4, 4)), ("1:2:8", (1, 2, 8))])
def test_parse_range(text, expected):
    assert trt.parse_range(text, "--batch") == expected


@pytest.mark.parametrize("text", ["0", "4:2:8", "a", "1:2"])
def test_parse_range_refuses(text):
    with pytest.raises(StarflowError, match="--batch"):
        trt.parse_range(text, "--batch")


def test_parse_grid():
    assert trt.parse_grid("8x12") == (8, 12)
    with pytest.raises(StarflowError, match="expected HxW in tokens"):
        trt.parse_grid("8")


def test_cache_key_changes_with_everything_an_engine_depends_on():
    settings = trt.BuildSettings("tensorrt_rtx", "1.7.1", ("SM86",), None, 3, None)
    profiles = trt.graph_profiles(STEP, trt.derive_profiles(MANIFEST))
    key = trt.cache_key(STEP, profiles, settings)
    assert key == trt.cache_key(json.loads(json.dumps(STEP)), profiles, settings)  # deterministic
    variants = [
        trt.cache_key({**STEP, "sha256": "b" * 64}, profiles, settings),
        trt.cache_key({**STEP, "precision": "fp16"}, profiles, settings),
        trt.cache_key(
            STEP, trt.graph_profiles(STEP, trt.derive_profiles(MANIFEST, ("sequential",))), settings
        ),
        trt.cache_key(STEP, profiles, trt.BuildSettings("tensorrt", "1.7.1", ("SM86",), None, 3, None)),
        trt.cache_key(STEP, profiles, trt.BuildSettings("tensorrt_rtx", "1.8.0", ("SM86",), None, 3, None)),
        trt.cache_key(STEP, profiles, trt.BuildSettings("tensorrt_rtx", "1.7.1", ("SM89",), None, 3, None)),
        trt.cache_key(STEP, profiles, trt.BuildSettings("tensorrt_rtx", "1.7.1", ("SM86",), "H100", 3, None)),
        trt.cache_key(STEP, profiles, trt.BuildSettings("tensorrt_rtx", "1.7.1", ("SM86",), None, 5, None)),
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
    with pytest.raises(StarflowError, match="--builder"):
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
    profiles = [
        {"batch": (1, 2, 16), "chunk": (1, 16, 256), "past": (0, 38, 261)},
        {"batch": (1, 2, 16), "chunk": (1, 1, 1), "past": (0, 38, 261)},
    ]
    assert select_profile(profiles, {"batch": 2, "chunk": 1, "past": 10}) == 1
    assert select_profile(profiles, {"batch": 2, "chunk": 16, "past": 10}) == 0
    with pytest.raises(StarflowError, match=r"batch 32.*runs batch 1..16, chunk 1..256"):
        select_profile(profiles, {"batch": 32, "chunk": 1, "past": 0})


def test_runtime_reads_dims_from_the_feeds():
    feeds = {
        "x": np.zeros((2, 3, 4), np.float32),
        "past_keys": np.zeros((2, 2, 4, 7, 16), np.float32),
        "grid": np.array([4, 4]),
    }
    assert call_dims(STEP["inputs"], feeds) == {"batch": 2, "chunk": 3, "past": 7}
    with pytest.raises(StarflowError, match="batch = 3 disagrees"):
        call_dims(STEP["inputs"], {**feeds, "past_keys": np.zeros((2, 3, 4, 7, 16), np.float32)})
    with pytest.raises(StarflowError, match="expected float32"):
        call_dims(STEP["inputs"], {**feeds, "x": np.zeros((2, 3, 4), np.float16)})
    with pytest.raises(StarflowError, match="missing input"):
        call_dims(STEP["inputs"], {"x": feeds["x"]})


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
    return work, trt.build_engines(work, **BUILD)


def _copy(directory: Path, tmp_path: Path) -> Path:
    shutil.copytree(directory, tmp_path / "copy")
    return tmp_path / "copy"


@pytest.mark.slow
def test_engines_for_every_graph_at_fp32_and_fp16(built):
    directory, results = built
    manifest = load_manifest(directory)  # schema-checked, engines section included
    assert all(r.built for r in results)
    block_graphs = {g["name"] for g in manifest["graphs"] if g["block"] is not None}
    assert {e["graph"] for e in manifest["engines"]} == block_graphs  # components stay on ORT
    assert {e["precision"] for e in manifest["engines"]} == {"fp32", "fp16"}
    import tensorrt_rtx

    for entry in manifest["engines"]:
        path = directory / entry["file"]
        assert path.stat().st_size == entry["bytes"] > 0
        assert sha256(path) == entry["sha256"]
        assert entry["builder"] == {"name": "tensorrt_rtx", "version": tensorrt_rtx.__version__}
        assert entry["compute_capabilities"] == ["SM86"] and entry["device"] is None
        assert entry["strongly_typed"] and entry["optimization_level"] == 0
        assert all(p["dims"]["batch"] == {"min": 1, "opt": 2, "max": 4} for p in entry["profiles"])
    step = next(e for e in manifest["engines"] if e["graph"] == "block2.step.fp16")
    assert [p["name"] for p in step["profiles"]] == ["grid 8x8", "grid 8x12"]
    assert step["profiles"][1]["dims"]["chunk"] == {"min": 1, "opt": 16, "max": 96}
    assert not list(directory.glob(".*.tmp")), "temporary files left behind"


@pytest.mark.slow
def test_second_run_builds_nothing(built, tmp_path):
    directory, _ = built
    before = {p.name: p.stat().st_mtime_ns for p in directory.glob("*.engine")}
    assert not any(r.built for r in trt.build_engines(directory, **BUILD))
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
    results = trt.build_engines(directory, **BUILD)
    assert sorted(r.graph for r in results if r.built) == ["block0.forward.fp16", "block2.prefill.fp32"]
    load_manifest(directory)


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
def test_directory_without_engines_says_how_to_build_them(artifacts):
    with pytest.raises(StarflowError, match="no TensorRT engine for graph block2.step.fp32.*export trt"):
        Pipeline.load(artifacts, backend="tensorrt")


@pytest.mark.slow
@pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx not installed")
def test_tensorrt_errors_are_surfaced(artifacts):
    manifest = load_manifest(artifacts, verify_files=False)
    graph = next(g for g in manifest["graphs"] if g["name"] == "block2.step.fp32")
    rtx = trt.choose_builder("tensorrt-rtx")
    settings = trt.BuildSettings(rtx.name, rtx.version, ("SM75",), None, 0, None)
    profiles = trt.graph_profiles(graph, trt.derive_profiles(manifest))
    with pytest.raises(StarflowError, match=r"failed to build .*SM75.*Error Code"):  # no FP32 GEMM on Turing
        trt.build_engine(rtx, artifacts / graph["file"], graph, profiles, settings)
    inverted = [trt.EngineProfile("inverted", {**profiles[0].dims, "batch": (4, 2, 1)})]
    settings = trt.BuildSettings(rtx.name, rtx.version, ("SM86",), None, 0, None)
    with pytest.raises(StarflowError, match=r"profile 'inverted'.*MIN<=OPT<=MAX"):
        trt.build_engine(rtx, artifacts / graph["file"], graph, inverted, settings)


def test_directory_without_a_manifest(tmp_path):
    with pytest.raises(StarflowError, match="no manifest.json"):
        trt.build_engines(tmp_path, builder="tensorrt-rtx")
    result = CliRunner().invoke(app, ["export", "trt", str(tmp_path)])
    assert result.exit_code == 2 and "no manifest.json" in result.output


@pytest.mark.slow
def test_manifest_from_a_newer_schema(artifacts, tmp_path):
    directory = _copy(artifacts, tmp_path)
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    (directory / MANIFEST_NAME).write_text(json.dumps({**manifest, "schema_version": 99}))
    with pytest.raises(StarflowError, match="schema_version 99"):
        trt.build_engines(directory, builder="tensorrt-rtx")


@pytest.mark.slow
def test_missing_onnx_file(artifacts, tmp_path):
    directory = _copy(artifacts, tmp_path)
    (directory / "block1.step.fp16.onnx").unlink()
    with pytest.raises(StarflowError, match=r"block1.step.fp16.onnx is missing"):
        trt.build_engines(directory, builder="tensorrt-rtx")


@pytest.mark.slow
def test_options_are_checked_before_any_build(artifacts, monkeypatch):
    with pytest.raises(StarflowError, match=r"--precision \['bf16'\]"):
        trt.build_engines(artifacts, precisions=("bf16",))
    with pytest.raises(StarflowError, match="--optimization-level"):
        trt.build_engines(artifacts, optimization_level=7)
    _fake_modules(monkeypatch, {})
    with pytest.raises(StarflowError, match="tensorrt-rtx-cu13"):
        trt.build_engines(artifacts)
    assert not list(artifacts.glob("*.engine"))
