"""Untrusted checkpoints and exports, silent wrong results, errors before work (issue 16).

Every attack file is made here: a distributed checkpoint whose `.metadata` would run code,
manifests that point outside their directory or were edited, NaN inputs, bad configs,
unwritable outputs. Each case ends in exit code 2 and one line (or a StarflowError from the
API), with no traceback, no file written outside the output and no marker file created.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

import starflow
from starflow.cli.main import app
from starflow.contract.manifest import MANIFEST_NAME, RECORD_NAME, Manifest
from starflow.core.config import config_from_dict, load_config
from starflow.core.errors import StarflowError
from starflow.runtime import Pipeline, SampleOptions
from starflow.training.train import TrainOptions, train
from tests.conftest import T2I

runner = CliRunner()
TINY = dict(
    channel_size=1, img_size=8, patch_size=1, channels=32, layers_per_block=[1, 1], head_dim=32,
    rope=True, sos=True, txt_size=1, txt_dim=8, cond_top_only=True, use_softplus=True,
    use_final_norm=True, soft_clip=4.0, seq_order="L2R", noise_std=0.1,
)  # fmt: skip
needs_fixture = pytest.mark.skipif(not T2I.is_dir(), reason=f"shared fixtures not found at {T2I}")


def one_line_error(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output


# ---- 1. distributed checkpoints that would run code ----------------------------------------------
class _Marker:
    """Unpickling this calls os.system: what a crafted .metadata does."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("hardening-train")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump({"model": TINY}))
    out = root / "run"
    options = TrainOptions(
        config=str(config), data="digits", out=str(out), steps=2, batch_size=8, checkpoint_every=2,
        sample_every=0, log_every=1, threads=1, progress=False, device="cpu",
    )  # fmt: skip
    train(options)
    return config, out


def poisoned_copy(run: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of a run whose latest checkpoint's .metadata is a pickle that creates a marker."""
    copy, marker = tmp_path / "run", tmp_path / "pwned"
    shutil.copytree(run, copy)
    checkpoint = sorted((copy / "checkpoints").iterdir())[-1]
    (checkpoint / ".metadata").write_bytes(pickle.dumps(_Marker(marker)))
    return copy, marker


def test_consolidate_refuses_a_metadata_pickle_that_runs_code(tiny_run, tmp_path):
    copy, marker = poisoned_copy(tiny_run[1], tmp_path)
    checkpoint = sorted((copy / "checkpoints").iterdir())[-1]
    out = tmp_path / "model.safetensors"
    result = runner.invoke(app, ["checkpoint", "consolidate", str(checkpoint), "--out", str(out)])
    one_line_error(result, "refused its .metadata (posix.system is not part of a checkpoint's metadata)")
    assert not marker.exists() and not out.exists()


def test_resume_refuses_a_metadata_pickle_that_runs_code(tiny_run, tmp_path):
    config, run = tiny_run
    copy, marker = poisoned_copy(run, tmp_path)
    args = ["train", "--config", str(config), "--out", str(copy), "--steps", "4", "--batch-size", "8"]
    args += ["--checkpoint-every", "2", "--sample-every", "0", "--threads", "1", "--no-progress", "--resume"]
    result = runner.invoke(app, [*args, "--device", "cpu"])
    one_line_error(result, "refused its .metadata")
    assert not marker.exists()


def test_resume_with_other_settings_names_them(tiny_run, tmp_path):
    config, run = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    wider = tmp_path / "wider.yaml"
    wider.write_text(yaml.safe_dump({"model": {**TINY, "channels": 64}}))
    base = dict(data="digits", out=str(copy), steps=4, checkpoint_every=2, sample_every=0, threads=1)
    base |= dict(progress=False, device="cpu", resume=True)
    with pytest.raises(StarflowError, match=r"batch_size 8 -> 16"):
        train(TrainOptions(config=str(config), batch_size=16, **base))
    with pytest.raises(StarflowError, match=r"config channels 32 -> 64"):
        train(TrainOptions(config=str(wider), batch_size=8, **base))


# ---- 2, 3, 11. manifests that point outside their directory -----------------------------------------
@pytest.fixture
def export_copy(fixture_artifacts: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "artifacts"
    shutil.copytree(fixture_artifacts, copy)
    return copy


def rewrite(directory: Path, edit) -> None:
    """Edit manifest.json's JSON, keeping record.json's digest: what a careless or hostile edit does."""
    path = directory / MANIFEST_NAME
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@needs_fixture
@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["graphs"][0].update(file="/etc/passwd"),
        lambda d: d["graphs"][0].update(name="../../outside/x"),
        lambda d: d["graphs"][0].update(
            external_data=[{"file": "../x.data", "sha256": "0" * 64, "bytes": 1}]
        ),
        lambda d: d["files"].append({"file": "/tmp/tokenizer.json", "sha256": "0" * 64, "bytes": 1}),
    ],
    ids=["absolute-file", "traversal-name", "external-data", "other-file"],
)
def test_paths_leaving_the_directory_are_refused_before_reading(export_copy, tmp_path, edit):
    rewrite(export_copy, edit)
    with pytest.raises(StarflowError, match="does not match its schema"):
        Pipeline.load(export_copy)
    result = runner.invoke(app, ["export", "trt", str(export_copy), "--builder", "tensorrt-rtx"])
    one_line_error(result, "does not match its schema")
    assert not (tmp_path / "outside").exists() and not list(tmp_path.glob("*.engine"))


@needs_fixture
def test_a_symlink_out_of_the_directory_is_refused(export_copy, tmp_path):
    outside = tmp_path / "outside.onnx"
    shutil.move(export_copy / "block2.step.fp32.onnx", outside)
    (export_copy / "block2.step.fp32.onnx").symlink_to(outside)  # same bytes, same sha256
    with pytest.raises(StarflowError, match="leads outside the export directory"):
        Pipeline.load(export_copy)
    result = runner.invoke(app, ["inspect", str(export_copy)])
    assert result.exit_code == 2 and "leads outside the export directory" in result.output


@needs_fixture
def test_inspect_fails_on_a_tampered_or_missing_graph(export_copy):
    graph = export_copy / "block1.step.fp16.onnx"
    graph.write_bytes(graph.read_bytes()[:-1] + b"\0")
    result = runner.invoke(app, ["inspect", str(export_copy)])
    assert result.exit_code == 2 and "does not match its sha256" in result.output
    graph.unlink()
    result = runner.invoke(app, ["inspect", str(export_copy)])
    assert result.exit_code == 2 and "is missing" in result.output


# ---- 4. edited manifests -----------------------------------------------------------------------
@needs_fixture
@pytest.mark.parametrize(
    "edit",
    [lambda d: d["blocks"].reverse(), lambda d: d["blocks"][0]["sos_embed"].__setitem__(0, 0.5)],
    ids=["blocks-reversed", "sos-changed"],
)
def test_an_edited_manifest_is_refused(export_copy, tmp_path, edit):
    rewrite(export_copy, edit)
    with pytest.raises(StarflowError, match="changed since the export"):
        Pipeline.load(export_copy)
    result = runner.invoke(app, ["validate", str(export_copy), "--checkpoint", str(T2I / "checkpoint.pth")])
    one_line_error(result, "changed since the export (digest mismatch)")


@needs_fixture
def test_validate_compares_a_rewritten_manifest_with_the_checkpoint(export_copy):
    """A writer that also recomputes the digest passes loading, but not `starflow validate`."""
    manifest = Manifest.load(export_copy)
    first = manifest.blocks[0]
    sos = (first.sos_embed[0] + 0.5, *first.sos_embed[1:])
    dataclasses.replace(
        manifest, blocks=(dataclasses.replace(first, sos_embed=sos), *manifest.blocks[1:])
    ).write(export_copy)
    result = runner.invoke(app, ["validate", str(export_copy), "--checkpoint", str(T2I / "checkpoint.pth")])
    one_line_error(result, "block 0 in sampling order: sos_embed differs from the checkpoint's")


@needs_fixture
@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["blocks"][0]["graphs"]["fp32"].update(step="block9.step.fp32"), "no step graph here"),
        (lambda d: d["blocks"][0].update(kv_heads=3), "does not fit graph block2.step.fp32"),
        (lambda d: d["blocks"][0].update(sos_embed=[0.0]), "sos_embed has 1 values, not 4"),
    ],
    ids=["unknown-graph", "kv-heads", "sos-length"],
)
def test_inconsistent_manifests_are_refused_at_load(export_copy, edit, message):
    """Even with a recomputed digest (a buggy writer): names must resolve and shapes agree."""
    path = export_copy / MANIFEST_NAME
    data = json.loads(path.read_text())
    edit(data)
    text = json.dumps(data).encode()
    record = json.loads((export_copy / RECORD_NAME).read_text())
    record["manifest_sha256"] = hashlib.sha256(text).hexdigest()  # what a buggy writer would store
    with pytest.raises(StarflowError, match=message):
        Manifest.parse(text, json.dumps(record).encode(), str(path))


def test_a_manifest_without_its_record_is_refused(export_copy):
    (export_copy / RECORD_NAME).unlink()
    with pytest.raises(StarflowError, match=r"no record.json beside it .*; re-export$"):
        Manifest.load(export_copy)


# ---- 5, 6. non-finite inputs and settings ----------------------------------------------------------
@needs_fixture
@pytest.mark.parametrize("which", ["noise", "y", "y_uncond"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_inputs_are_refused(fixture_artifacts, which, value):
    pipe = Pipeline.load(fixture_artifacts)
    arrays = {
        "noise": np.zeros((1, 4, 8, 8), np.float32),
        "y": np.zeros((1, 6, 32), np.float32),
        "y_uncond": np.zeros((1, 6, 32), np.float32),
    }
    arrays[which].flat[3] = value
    with pytest.raises(StarflowError, match=f"{which}: contains NaN or inf"):
        pipe.sample(arrays["noise"], arrays["y"], arrays["y_uncond"], SampleOptions(guidance=1.0))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--guidance", "inf"], "guidance: input should be a finite number, got inf"),
        (["--guidance", "nan"], "guidance: input should be a finite number, got nan"),
        (
            ["--jacobi-block-size", "0"],
            "jacobi_block_size: input should be greater than or equal to 1, got 0",
        ),
        (["--jacobi-max-iter", "0"], "jacobi_max_iter: input should be greater than or equal to 1, got 0"),
        (["--jacobi-threshold", "nan"], "jacobi_threshold: input should be a finite number, got nan"),
        (["--threads", "-1"], "threads: must be an integer >= 1"),
        (["--num-images", "100000000"], "needs about"),
    ],
)
def test_generate_refuses_bad_settings(demo_export, tmp_path, args, message):
    out = tmp_path / "x.png"
    result = runner.invoke(app, ["generate", "--prompt", "3", "--out", str(out), *args])
    one_line_error(result, message)
    assert not out.exists()


def test_non_finite_samples_end_with_an_error_and_no_file(demo_export, tmp_path, monkeypatch):
    from starflow.runtime.generator import Generator

    original = Generator.sample

    def overflowing(self, *args, **kwargs):
        latent, stats = original(self, *args, **kwargs)
        latent[0, 0, 0, 0] = np.inf
        return latent, stats

    monkeypatch.setattr(Generator, "sample", overflowing)
    out = tmp_path / "x.png"
    result = runner.invoke(app, ["generate", "--prompt", "3", "--out", str(out)])
    one_line_error(result, "NaN or inf")  # the self-denoise refuses them, before the output check
    assert not out.exists()
    # without the self-denoise (which would make the whole sample NaN), the flag writes them
    args = ["generate", "--prompt", "3", "--out", str(out), "--no-check-finite", "--no-denoise"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and out.exists()


def test_float_jacobi_settings_in_the_api_are_refused():
    from starflow.core.sampler import JacobiSettings

    with pytest.raises(StarflowError, match="jacobi.max_iter: must be an integer >= 1, got 2.5"):
        SampleOptions(jacobi=JacobiSettings(max_iter=2.5)).check()


# ---- 7. configs -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key, value, message",
    [
        ("cfg", -3, "config key 'cfg': must be a finite number >= 0, got -3.0"),
        ("noise_std", "nan", "config key 'noise_std': must be a finite number >= 0, got nan"),
        ("noise_std", -0.1, "config key 'noise_std'"),
        ("soft_clip", "inf", "config key 'soft_clip': must be a finite number >= 0, got inf"),
        ("soft_clip", "nan", "config key 'soft_clip'"),
        ("pt_seq_len", -4, "config key 'pt_seq_len': must be a positive integer when set"),
        ("chanels", 64, "unknown config key 'chanels'; did you mean 'channels'"),
        ("channels", "wide", "config key 'channels': expected int, got 'wide'"),
    ],
)
def test_bad_config_values_name_the_file_and_key(tmp_path, key, value, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"model": {**TINY, key: value}}))
    with pytest.raises(StarflowError, match=f"config {path}: .*{message[:40]}"):
        load_config(path)


def test_configs_too_big_for_the_machine_are_refused_before_allocating():
    config = config_from_dict({**TINY, "channels": 1_000_000_000}, "test")
    began = time.perf_counter()
    with pytest.raises(
        StarflowError, match=r"parameters \(fp32\) needs about .* GiB, more than this machine's"
    ):
        starflow.StarFlow(config)
    assert time.perf_counter() - began < 5
    with pytest.raises(StarflowError, match="100000 layers in one block, more than 1024"):
        config_from_dict({**TINY, "layers_per_block": [1, 1, 100_000]}, "test")


def test_a_yaml_alias_bomb_is_refused(tmp_path):
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    lines += [
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}" + f",*{chr(97 + i)}" * 8 + "]" for i in range(8)
    ]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\nmodel: {channels: 32}\n")
    assert path.stat().st_size < 2000
    with pytest.raises(StarflowError, match="YAML aliases"):
        load_config(path)


def test_a_safetensors_config_that_is_not_a_mapping(tmp_path):
    from safetensors.torch import save_file

    from starflow.model.checkpoint import CONFIG_METADATA_KEY, read_state_dict

    path = tmp_path / "m.safetensors"
    import torch

    save_file({"w": torch.zeros(1)}, path, metadata={CONFIG_METADATA_KEY: json.dumps([1, 2])})
    with pytest.raises(StarflowError, match="expected a mapping of config keys, got list"):
        read_state_dict(path)


# ---- 8, 9. outputs and late failures -----------------------------------------------------------------
@pytest.mark.parametrize("command", ["train", "consolidate", "bench"])
def test_unwritable_outputs_fail_before_work(tiny_run, command, tmp_path):
    config, run = tiny_run
    began = time.perf_counter()
    if command == "train":
        args = ["train", "--config", str(config), "--out", "/proc/starflow-run", "--steps", "1"]
        message = "out /proc/starflow-run"
    elif command == "consolidate":
        checkpoint = sorted((run / "checkpoints").iterdir())[-1]
        args = ["checkpoint", "consolidate", str(checkpoint), "--out", "/proc/x.safetensors"]
        message = "out /proc/x.safetensors: cannot write"
    else:
        args = ["bench", "--json", "/nonexistent/x.json"]
        message = "json /nonexistent/x.json: directory /nonexistent does not exist"
    result = runner.invoke(app, args)
    one_line_error(result, message)
    assert time.perf_counter() - began < 30


def test_bench_refuses_a_bad_first_guess_before_any_work():
    began = time.perf_counter()
    result = runner.invoke(app, ["bench", "--jacobi-init", "foo"])
    one_line_error(result, "init: must be one of ['noise', 'chunk-mean'], got 'foo'")
    assert time.perf_counter() - began < 30


@pytest.mark.parametrize(
    "threads, message",
    [
        ("0", "threads: must be an integer >= 1 (or unset for all cores), got 0"),
        ("1,1", "threads: expected distinct counts, got [1, 1]"),
        ("two", "threads: expected counts >= 1 separated by commas (e.g. 1,2), got 'two'"),
    ],
)
def test_bench_refuses_bad_thread_counts_before_any_work(threads, message):
    result = runner.invoke(app, ["bench", "--threads", threads])
    one_line_error(result, message)


def test_a_full_disk_leaves_nothing_half_written(demo_export, tmp_path, monkeypatch):
    import starflow.core.atomic

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(starflow.core.atomic.os, "replace", full)
    out = tmp_path / "x.png"
    result = runner.invoke(app, ["generate", "--prompt", "3", "--out", str(out)])
    one_line_error(result, f"out {out}: cannot write (No space left on device); nothing was written")
    assert list(tmp_path.iterdir()) == []


@needs_fixture
def test_engine_writes_that_fail_are_one_line(export_copy, monkeypatch):
    from starflow.export import trt

    if trt.import_module("tensorrt_rtx") is None:
        pytest.skip("tensorrt_rtx not installed")
    import starflow.core.atomic

    def read_only(*args):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(trt, "build_engine", lambda *args, **kwargs: b"engine")
    monkeypatch.setattr(starflow.core.atomic.os, "replace", read_only)
    result = runner.invoke(app, ["export", "trt", str(export_copy), "--builder", "tensorrt-rtx"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.splitlines()[-1].endswith(
        "block2.step.fp32.engine: cannot write (Read-only file system)"
    )
    assert not list(export_copy.glob("*.engine")) and not list(export_copy.glob(".*.partial-*"))


# ---- 10. the export cache ------------------------------------------------------------------------------
@pytest.fixture
def counted_exports(demo_export: Path, monkeypatch, tmp_path):
    """demo_artifacts with export_onnx replaced by a slow copy of the real export, counted."""
    from starflow.export import cache

    monkeypatch.setenv("STARFLOW_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_export(checkpoint, out, options=None, **kwargs):
        calls.append(out)
        time.sleep(0.5)
        shutil.copytree(demo_export, out)

    monkeypatch.setattr("starflow.export.onnx.export_onnx", fake_export)
    return cache, calls


def test_concurrent_first_uses_export_once(counted_exports):
    cache, calls = counted_exports
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.demo_artifacts())) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(set(results)) == 1


def test_a_broken_entry_heals_and_stale_partials_go(counted_exports):
    cache, calls = counted_exports
    entry = Path(cache.demo_artifacts())
    shutil.rmtree(entry)
    entry.write_text("not a directory")  # what a crash or a careless tool leaves
    make = f"import pathlib, starflow.core.atomic as a; a.partial_folder(pathlib.Path({str(entry)!r}))"
    subprocess.run([sys.executable, "-c", make], check=True)  # an export's partial, its process gone
    (stale,) = entry.parent.glob(f".{entry.name}.partial-*")
    assert cache.demo_artifacts() == entry and entry.is_dir()
    assert not stale.exists() and len(calls) == 2


def test_two_exports_into_one_place_never_fail_halfway(tmp_path):
    """Both renames of `replace_dir` race with another process's: the last export wins, whole."""
    from starflow.export.onnx import replace_dir

    out = tmp_path / "artifacts"
    for trial in range(40):
        errors: list[BaseException] = []
        news = []
        for side in range(2):
            new = tmp_path / f"new-{trial}-{side}"
            new.mkdir()
            (new / "manifest.json").write_text(str(side))
            news.append(new)

        def move(new: Path, errors: list[BaseException] = errors) -> None:
            try:
                replace_dir(new, out)
            except BaseException as err:  # noqa: BLE001 (collected for the assert)
                errors.append(err)

        threads = [threading.Thread(target=move, args=(new,)) for new in news]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifacts"]
