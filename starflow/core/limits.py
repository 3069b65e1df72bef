"""Sizes refused before any work: a request that would need more memory than the machine has
fails with the estimate, instead of a MemoryError (or the OOM killer) minutes later."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
from collections.abc import Callable

from starflow.core.checks import check_count
from starflow.core.errors import StarflowError


def machine_memory() -> int:
    """Physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(needed: int, what: str) -> None:
    """Refuse `what` when it needs more bytes than the machine's physical memory."""
    available = machine_memory()
    if needed > available:
        raise StarflowError(
            f"{what} needs about {needed / 2**30:.1f} GiB, "
            f"more than this machine's {available / 2**30:.1f} GiB"
        )


def check_threads(threads: int | None) -> None:
    """None (all cores) or a positive count."""
    if threads is not None:
        check_count(threads, "threads", note="or unset for all cores")


# Below this, freeing is left to Python and glibc: a full `gc.collect` after each traced graph
# costs ~0.4 s (the tracer's objects), a sixth of the digits model's export.
RELEASE_MIN_BYTES = 64 << 20


def release_freed_memory(freed_bytes: int) -> None:
    """After freeing `freed_bytes` (at least RELEASE_MIN_BYTES), collect garbage and hand freed
    heap pages back to the OS (glibc's `malloc_trim`).

    Between multi-GB steps (one block graph, one validation session) glibc keeps freed blocks in
    its arenas, so the process's RSS only grows; trimming returns them. A no-op off glibc."""
    if freed_bytes < RELEASE_MIN_BYTES:
        return
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, looked up once (find_library runs `ldconfig -p` on every call)."""
    name = ctypes.util.find_library("c")
    return None if name is None else getattr(ctypes.CDLL(name), "malloc_trim", None)
