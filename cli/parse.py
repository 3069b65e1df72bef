"""Command-line strings -> values: `HxW` sizes and `MIN:OPT:MAX` ranges, errors naming the flag."""

from __future__ import annotations

from starflow.contract.manifest import Range
from starflow.core.errors import StarflowError


def parse_hw(text: str, option: str, unit: str, example: str, square: bool = False) -> tuple[int, int]:
    """'HxW' (or 'N' for N x N when `square`) -> (H, W), both positive; the error names `option`."""
    try:
        sides = [int(p) for p in text.lower().split("x")]
    except ValueError:
        sides = []
    if square and len(sides) == 1:
        sides *= 2
    if len(sides) != 2 or min(sides) <= 0:
        raise StarflowError(f"{option}: expected HxW in {unit} (for example {example}), got {text!r}")
    return sides[0], sides[1]


def parse_range(text: str, option: str) -> Range:
    """'N' (1..N, opt N) or 'MIN:OPT:MAX' -> Range."""
    try:
        values = [int(v) for v in text.split(":")]
    except ValueError:
        values = []
    if len(values) == 1:
        values = [1, values[0], values[0]]
    if len(values) != 3 or not 0 < values[0] <= values[1] <= values[2]:
        raise StarflowError(f"{option}: expected N or MIN:OPT:MAX with 0 < MIN <= OPT <= MAX, got {text!r}")
    return Range(*values)


def parse_threads(text: str) -> tuple[int, ...]:
    """'1,2' -> (1, 2), for `bench --threads` (the library checks the counts)."""
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise StarflowError(
            f"threads: expected counts >= 1 separated by commas (e.g. 1,2), got {text!r}"
        ) from None
