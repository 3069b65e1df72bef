"""What the commands show while they work: one line per step, and progress bars per flow block."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def step_lines(prefix: str = "") -> Callable[[str, int, int], None]:
    """A (what, done, total) callback printing one line per new step, with the seconds elapsed
    since its first step, to stderr: visible in logs and pipes, where a transient progress bar
    shows nothing. The clock starts at the first step, not at creation: a command that makes
    several callbacks up front (the demo's two exports) times each export from its own start."""
    began: float | None = None
    seen: set[str] = set()

    def report(what: str, done: int, total: int) -> None:
        nonlocal began
        if began is None:
            began = time.perf_counter()
        if what not in seen and what != "done":
            seen.add(what)
            typer.echo(f"{prefix}[{done + 1}/{total}] {what} ({time.perf_counter() - began:.1f} s)", err=True)

    return report


@contextmanager
def block_bars(batches: int, frame_tokens: int | None = None) -> Iterator[Callable[[int, int, int], None]]:
    """One bar per flow block (tokens done, over every batch); yields the sampler's callback.

    Blocks report in sampling order, so the first is the deep block. The bars appear with the
    first report: an error before any sampling prints only itself. With `frame_tokens` (clips),
    a block whose sequences hold several frames counts frames instead (a frame-local block's
    sequences are single frames, sampled side by side: it counts tokens).
    """
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    bar = _transient_bar(*columns)
    tasks: dict[int, Any] = {}
    finished: dict[int, int] = {}  # tokens of the batches already done, per block

    def report(block: int, done: int, tokens: int) -> None:
        unit = frame_tokens if frame_tokens and tokens > frame_tokens else 1
        if not tasks:
            bar.start()
        if block not in tasks:
            role = "shallow" if tasks else "deep"
            what = ", frames" if unit > 1 else ""
            tasks[block] = bar.add_task(f"block {block} ({role}{what})", total=tokens // unit * batches)
            finished[block] = 0
        bar.update(tasks[block], completed=finished[block] + done // unit)
        if done == tokens:
            finished[block] += tokens // unit

    try:
        yield report
    finally:
        if tasks:
            bar.stop()


@contextmanager
def phase_bar() -> Iterator[Callable[[str, int, int], None]]:
    """One transient bar for the phases of the build in progress (TensorRT's progress monitor),
    shown from the first report on."""
    bar = _transient_bar()
    task = bar.add_task("", total=None)

    def report(what: str, done: int, total: int) -> None:
        if not bar.live.is_started:
            bar.start()
        bar.update(task, description=f"  {what}", completed=done, total=total or None)

    try:
        yield report
    finally:
        if bar.live.is_started:
            bar.stop()


def _transient_bar(*columns: Any) -> Progress:
    """Bars on stderr, shown only on a terminal (in a log or a pipe they would be noise)."""
    console = Console(stderr=True)
    return Progress(*columns, console=console, transient=True, disable=not console.is_terminal)
