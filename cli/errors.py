"""The one place where a library error becomes what a command-line user sees."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer

from starflow.core.errors import StarflowError


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """A StarflowError becomes a red one-line message and exit code 2 (no traceback)."""
    try:
        yield
    except StarflowError as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(code=2) from None
