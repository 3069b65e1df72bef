"""Export write safety: bad input fails before any file is written; `--out` is swapped atomically."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

import starflow
from starflow.cli.main import app
from starflow.contract.manifest import Manifest
from starflow.core.config import config_from_dict
from starflow.export import trace
from starflow.export import validate as validate_module
from starflow.export.onnx import ExportOptions, check_out, export_onnx, replace_dir
from starflow.model.testing import random_model
from tests.conftest import T2I

# Shared fixtures live beside the repo, as in conftest.py (bare `pytest` cannot import `tests.`).
runner = CliRunner()
# One text-free block of one layer: two graphs per precision, the cheapest export there is.
ONE_BLOCK = dict(
    channel_size=4, img_size=4, patch_size=1, channels=32, blocks=1, layers_per_block=[1], head_dim=16,
    rope=True, sos=True, use_softplus=True, use_final_norm=True, soft_clip=4.0,
)  # fmt: skip

needs_fixture = pytest.mark.skipif(not T2I.is_dir(), reason=f"shared fixtures not found at {T2I}")


def export_cli(*extra: str, checkpoint: Path = T2I / "checkpoint.pth", config: str | None = None):
    config = config or str(T2I / "config.yaml")
    args = ["export", "onnx", "--checkpoint", str(checkpoint), "--config", config, "--no-validate", *extra]
    return runner.invoke(app, args)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@needs_fixture
def test_truncated_checkpoint_fails_before_writing(tmp_path):
    broken = tmp_path / "broken.pth"
    broken.write_bytes((T2I / "checkpoint.pth").read_bytes()[:100_000])
    result = export_cli("--out", str(tmp_path / "out"), checkpoint=broken)
    assert result.exit_code != 0
    assert "corrupt or truncated" in result.output
    assert leftovers(tmp_path) == ["broken.pth"]


@needs_fixture
def test_config_checkpoint_mismatch_fails_before_writing(tmp_path):
    result = export_cli("--out", str(tmp_path / "out"), config="bench-256")
    assert result.exit_code != 0
    assert "does not match the config" in result.output
    assert leftovers(tmp_path) == []


@needs_fixture
def test_out_pointing_at_a_file_is_refused(tmp_path):
    target = tmp_path / "artifacts"
    target.write_text("keep me")
    result = export_cli("--out", str(target), "--force")
    assert result.exit_code != 0
    assert "is a file" in result.output
    assert target.read_text() == "keep me" and leftovers(tmp_path) == ["artifacts"]


@needs_fixture
def test_non_empty_unrelated_out_needs_force(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = export_cli("--out", str(tmp_path))
    assert result.exit_code != 0
    assert "force=True (--force)" in result.output
    assert leftovers(tmp_path) == ["notes.txt"]


@needs_fixture
def test_unwritable_directory_is_a_clear_error(tmp_path):
    if os.geteuid() == 0:  # root ignores permission bits; sysfs refuses everyone
        out = Path("/sys/starflow-export-test/out")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        out = locked / "out"
    result = export_cli("--out", str(out))
    assert result.exit_code != 0
    assert "cannot write in" in result.output
    assert not out.exists()


@needs_fixture
@pytest.mark.parametrize("opset", ["9", "99"])
def test_unsupported_opset_is_refused(tmp_path, opset):
    result = export_cli("--out", str(tmp_path / "out"), "--opset", opset)
    assert result.exit_code != 0
    assert f"opset {opset}: unsupported" in result.output
    assert leftovers(tmp_path) == []


@needs_fixture
def test_opset_23_with_fp16_is_refused_before_any_work(tmp_path):
    result = export_cli("--out", str(tmp_path / "out"), "--opset", "23")  # default precision: both
    assert result.exit_code != 0
    assert "opset 23 with fp16 graphs" in result.output and "fp32 graphs only" in result.output
    assert leftovers(tmp_path) == []


@needs_fixture
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--precision", "bf16"], "precisions: got ['bf16']"),
        (["--max-latent", "8x9x"], "--max-latent: expected HxW"),
        (["--min-latent", "12x12", "--max-latent", "10x10"], "exceeds"),
        (["--max-latent", "4x4"], "must include the model's training latent"),
        (["--max-batch", "0"], "max_batch: must be an integer >= 1"),
    ],
)
def test_bad_options_are_refused(tmp_path, options, message):
    result = export_cli("--out", str(tmp_path / "out"), *options)
    assert result.exit_code != 0
    assert message in result.output
    assert leftovers(tmp_path) == []


def test_cli_stays_light():
    """`starflow --help` must stay instant: the export commands import torch/onnx lazily."""
    code = textwrap.dedent(
        """
        import sys
        from starflow.cli.main import app
        assert not {"torch", "onnx", "onnxruntime"} & set(sys.modules), sorted(sys.modules)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = runner.invoke(app, ["export", "--help"])
    assert result.exit_code == 0 and "onnx" in result.output


def test_failed_validation_leaves_the_previous_export_intact(tmp_path, monkeypatch):
    """A validation miss is an error naming graph/tensor/shape, and `out` keeps what it had."""
    checkpoint = tmp_path / "one-block.safetensors"
    starflow.save_model(random_model(config_from_dict(ONE_BLOCK)), checkpoint)
    out = tmp_path / "artifacts"
    monkeypatch.setattr(trace, "EXTERNAL_DATA_BYTES", 0)  # the > 2 GB paths, on a small model
    monkeypatch.setattr(trace, "SHARED_WEIGHTS_BYTES", 0)
    options = ExportOptions(precisions=("fp32",), denoise=False)
    export_onnx(checkpoint, out, options)
    before = (out / "manifest.json").read_bytes()
    manifest = Manifest.load(out)  # checks the sha256 of every .onnx and external data file
    assert all(g.external_data for g in manifest.graphs)
    # a block's graphs share its one weights file
    assert {g.external_data[0].file for g in manifest.graphs if g.block is not None} == {
        "block0.fp32.weights"
    }
    assert all(v.passed for v in manifest.validation)

    monkeypatch.setitem(validate_module.TOLERANCES, "fp32", validate_module.Tolerance(atol=0.0, rtol=0.0))
    with pytest.raises(
        starflow.StarflowError, match=r"(?s)validation failed .*graph block0\.\w+\.fp32, tensor \w+, shape \["
    ):
        export_onnx(checkpoint, out, options)
    assert (out / "manifest.json").read_bytes() == before
    assert leftovers(tmp_path) == ["artifacts", "one-block.safetensors"]  # no temp directory left


def test_a_previous_export_is_replaced_whole_without_force(tmp_path):
    out, new = tmp_path / "artifacts", tmp_path / "new"
    out.mkdir()
    (out / "manifest.json").write_text('{"schema_version": 1, "producer": {"name": "starflow"}}')
    (out / "stale.onnx").write_bytes(b"old")
    check_out(out, force=False)  # ours to replace: no --force needed
    new.mkdir()
    (new / "manifest.json").write_text("{}")
    replace_dir(new, out)
    assert leftovers(out) == ["manifest.json"] and leftovers(tmp_path) == ["artifacts"]


def test_export_prints_one_line_per_step_when_not_a_terminal(tmp_path):
    """CliRunner's output is no terminal: every step still gets a line with the seconds elapsed."""
    checkpoint = tmp_path / "one-block.safetensors"
    starflow.save_model(random_model(config_from_dict(ONE_BLOCK)), checkpoint)
    args = ["export", "onnx", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")]
    result = runner.invoke(app, [*args, "--precision", "fp32", "--no-denoise", "--no-validate"])
    assert result.exit_code == 0, result.output
    steps = [line for line in result.stderr.splitlines() if line.startswith("[")]
    assert [s.split(" (")[0] for s in steps] == [
        "[1/3] trace 2 block graph structures",
        "[2/3] export block0.step.fp32",
        "[3/3] export block0.forward.fp32",
    ]
    assert all(s.endswith(" s)") for s in steps)
    assert "wrote 2 graphs" in result.stdout
