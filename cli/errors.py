"""The one place where a library error, or Ctrl-C, becomes what a command-line user sees."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer

from starflow.core.errors import StarflowError

NOTHING_WRITTEN = "interrupted: nothing was written"
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what shells report for Ctrl-C


@contextlib.contextmanager
def user_errors(interrupted: str = NOTHING_WRITTEN) -> Iterator[None]:
    """A StarflowError becomes a red one-line message and exit code 2 (no traceback); Ctrl-C
    (KeyboardInterrupt) the one line `interrupted` (what it left behind) and exit code 130."""
    try:
        yield
    except StarflowError as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(code=2) from None
    except KeyboardInterrupt:
        typer.secho(interrupted, fg="red", err=True)
        raise typer.Exit(code=INTERRUPTED_EXIT_CODE) from None
