"""Timing two engines fairly on a shared machine; torch-free, so the demo's runtime-only run
does not load torch to time itself."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 0
) -> dict[str, tuple[float, Any]]:
    """Median seconds and last result of each fn, run in alternating rounds (a, b, a, b, ...)
    after `warmup` untimed rounds.

    On a shared, noisy machine a slow spell then hits every engine alike, so their ratio holds
    where back-to-back blocks of runs measured 1.04x and 1.77x for the same code.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {key: [] for key in fns}
    results: dict[str, Any] = {}
    for _ in range(repeats):
        for key, fn in fns.items():
            began = time.perf_counter()
            results[key] = fn()
            times[key].append(time.perf_counter() - began)
    return {key: (statistics.median(times[key]), results[key]) for key in fns}
