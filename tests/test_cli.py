"""CLI smoke tests and the runtime's no-torch guarantee."""

import subprocess
import sys
import textwrap

from typer.testing import CliRunner

from starflow.cli.main import app

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
