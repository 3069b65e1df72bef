"""CLI smoke tests and the runtime's no-torch guarantee."""

import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from starflow.cli.main import app
from starflow.cli.progress import step_lines
from starflow.core.config import DEMO_CHECKPOINT
from starflow.core.errors import StarflowError

runner = CliRunner()


def test_help_exits_zero() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    assert "starflow" in result.output.lower()


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "starflow 0.1.0"


def test_runtime_imports_without_torch() -> None:
    code = textwrap.dedent(
        """
        import sys

        class BlockTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError(f"torch blocked: {name}")
                return None

        sys.meta_path.insert(0, BlockTorch())
        import starflow.runtime

        assert "torch" not in sys.modules
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_commands_write_to_different_default_files() -> None:
    """`generate` must not overwrite the demo's grid (nor the reverse) when --out is left out."""
    import typer

    command = typer.main.get_command(app)
    defaults = {
        name: next(p.default for p in command.commands[name].params if p.name == "out")
        for name in ("generate", "demo")
    }
    assert len({str(d) for d in defaults.values()}) == 2, defaults


# ---- what a new user hit (issue 25, item 6) -----------------------------------------------------
THREADS_MESSAGE = "threads: must be an integer >= 1 (or unset for all cores), got 0"


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["generate", "--artifacts", "/nonexistent", "--prompt", "3"],
            "artifacts /nonexistent: no such directory",
        ),
        (
            ["generate", "--engine", "pytorch", "--checkpoint", "/x.pth", "--prompt", "3"],
            "checkpoint /x.pth: no such file",
        ),
        (
            ["export", "onnx", "--checkpoint", "/x.pth", "--out", "/tmp/never"],
            "checkpoint /x.pth: no such file",
        ),
        (["validate", "/nonexistent", "--checkpoint", "/x.pth"], "artifacts /nonexistent: no such directory"),
        (["train", "--config", "tiny-t2i", "--data", "/nonexistent"], "dataset /nonexistent: no such folder"),
        (
            ["checkpoint", "consolidate", "/nonexistent", "--out", "/tmp/x.safetensors"],
            "checkpoint /nonexistent: no such folder",
        ),
    ],
)
def test_a_wrong_path_fails_before_the_heavy_imports(args: list[str], message: str) -> None:
    """One line in well under the 45-78 s torch/onnx imports took: they are blocked here, so
    importing any of them before the error would fail the command differently."""
    code = textwrap.dedent(
        f"""
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "onnx", "onnxruntime", "onnxscript"):
                    raise ImportError(f"imported before the error: {{name}}")
                return None

        sys.meta_path.insert(0, Block())
        from starflow.cli.main import app

        app({args!r})
        """
    )
    began = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - began
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: {message}") and proc.stderr.count("\n") == 1, proc.stderr
    assert seconds < 10, seconds  # 0.3-0.6 s measured on an idle machine


@pytest.mark.parametrize("exported", [False, True])
def test_generate_says_exported_only_when_it_exported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exported: bool
) -> None:
    import starflow.export.cache
    from starflow.runtime import Generator

    def stop(*args: object, **kwargs: object) -> None:
        raise StarflowError("loaded")

    monkeypatch.setattr(starflow.export.cache, "demo_export", lambda *a, **k: (tmp_path, exported))
    monkeypatch.setattr(Generator, "load", stop)
    result = runner.invoke(app, ["generate", "--prompt", "3", "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "error: loaded" in result.output
    assert ("exported the embedded demo model" in result.output) == exported


def test_one_image_is_singular_with_a_readable_rate(tmp_path: Path) -> None:
    out = tmp_path / "x.png"
    result = runner.invoke(app, ["generate", "--engine", "pytorch", "--prompt", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "generated 1 image 8x8 with the pytorch engine" in result.output
    rate = re.search(r"for 1 image \(([0-9.]+) (images/s|s per image)\)", result.output)
    assert rate is not None and float(rate.group(1)) > 0, result.output


def test_each_export_times_its_steps_from_its_own_first_step(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = iter([100.0, 100.0, 100.5])  # the first step: its start, its line; then the second line
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    first, second = step_lines("export: "), step_lines("export (video): ")  # both made up front
    second("export block0.step.fp32", 0, 2)  # long after the demo began: its clock starts here
    second("validate", 1, 2)
    assert capsys.readouterr().err.splitlines() == [
        "export (video): [1/2] export block0.step.fp32 (0.0 s)",
        "export (video): [2/2] validate (0.5 s)",
    ]
    assert first is not second


def test_an_interrupted_export_says_so_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import starflow.cli.progress

    def interrupt(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(starflow.cli.progress, "step_lines", lambda prefix="": interrupt)
    out = tmp_path / "digits-onnx"
    result = runner.invoke(app, ["export", "onnx", "--checkpoint", str(DEMO_CHECKPOINT), "--out", str(out)])
    assert result.exit_code == 130, result.output
    assert result.output == (
        f"interrupted: nothing was written to {out} (the export is staged in a temporary folder)\n"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "command",
    [
        ["generate", "--prompt", "3", "--threads", "0"],
        ["demo", "--threads", "0"],
        ["train", "--config", "digits", "--threads", "0"],
        ["bench", "--threads", "0"],
        ["bench", "--quality", "--threads", "0"],
    ],
)
def test_threads_zero_is_refused_alike_everywhere(command: list[str]) -> None:
    result = runner.invoke(app, command)
    assert result.exit_code == 2, result.output
    assert result.output == f"error: {THREADS_MESSAGE}\n"


def test_too_many_frames_are_refused_with_the_memory_estimate(tmp_path: Path) -> None:
    """The PyTorch engine has no export frame range: the estimate refuses it before sampling."""
    args = ["generate", "--engine", "pytorch", "--prompt", "3", "--frames", "1000000"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "x.gif")])
    assert result.exit_code == 2, result.output
    assert re.fullmatch(
        r"error: 1 clip of 1000000 frames of \d+x\d+ latent pixels needs about [0-9.]+ GiB, more than this "
        r"machine's [0-9.]+ GiB\n",
        result.output,
    ), result.output
    assert list(tmp_path.iterdir()) == []


def test_bench_explains_its_columns() -> None:
    from starflow.apps.bench import LEGEND, format_table

    help_text = " ".join(runner.invoke(app, ["bench", "--help"], terminal_width=200).output.split())
    assert "fwd units: the row's seconds over one forward pass" in help_text
    assert "compute: the work its block calls did, in forward passes" in help_text
    row = dict(name="forward pass", engine="runtime", seconds=1.0, units=1.0, evaluations=3, compute=1.0,
               max_abs=None, rms=None)  # fmt: skip
    table = format_table(
        dict(rows=[row], runtime_jacobi_speedup_vs_pytorch_jacobi=2.0,
             jacobi=dict(block_size=64, threshold=1e-3), guidance=2.0, batch=1, frames=None, threads=1,
             load_average=[0.0, 0.0], cores=2, options=None, throughput={})
    )  # fmt: skip
    assert " ".join(table.split("\n")[3:]) == LEGEND
