"""Typer entry point for the `starflow` console script.

Keep module-level imports light (no torch, no starflow model code) so that
`starflow --help` is instant; import heavy modules inside command functions.
"""

from importlib.metadata import version

import typer

app = typer.Typer(
    name="starflow",
    help="Export-and-deploy toolchain for Apple's STARFlow normalizing-flow model.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"starflow {version('starflow')}")
        raise typer.Exit()


@app.callback()
def main(
    version_: bool = typer.Option(
        False,
        "--version",
        callback=_version_callback,
        is_eager=True,
        help="Show the version and exit.",
    ),
) -> None:
    """STARFlow reference model, export and runtime tools."""
