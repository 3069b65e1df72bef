"""The `starflow` command-line interface (typer app in `starflow.cli.main`)."""
