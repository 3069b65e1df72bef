"""Allow `python -m starflow.cli`."""

from starflow.cli.main import app

if __name__ == "__main__":
    app(prog_name="starflow")
