"""Named sampling presets: settings calibrated for one model, carried by its export's manifest.

A preset is a `SampleOptions` (guidance, method, Jacobi settings for the deep and the shallow
blocks) stored as JSON by `presets_to_json`. The official settings stay every model's default;
a preset is opt-in (`starflow generate --sampler fast`). `scripts/calibrate_sampling.py`
measures and writes the embedded digits model's presets (`assets/digits-presets.json`) on
sample quality.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pydantic import ConfigDict, TypeAdapter, ValidationError

from starflow.core.bounded import check_values, parse_json, read_bytes
from starflow.core.errors import StarflowError
from starflow.core.sampler import SampleOptions

DIGITS_PRESETS = Path(__file__).resolve().parent.parent / "assets" / "digits-presets.json"
MAX_PRESETS_BYTES = 1 << 20  # the digits model's presets file is 300 bytes
OFFICIAL = "official"  # the name of the default: the export's own guidance and Jacobi settings
# The sampler's own type, read and written by pydantic: unknown keys refused, no "1" for 1; a
# setting left out takes the sampler's default.
PRESETS = TypeAdapter(dict[str, SampleOptions], config=ConfigDict(extra="forbid", strict=True))


def check_preset_name(name: str, where: str) -> None:
    """A preset is named by a plain word; "official" names the export's own defaults."""
    if name == OFFICIAL or not name.isidentifier():
        raise StarflowError(f"{where}: sampling preset name {name!r} is reserved or not a plain word")


def choose(
    name: str, official: SampleOptions, presets: dict[str, SampleOptions], owner: str
) -> SampleOptions:
    """`official` for "official", else the named preset; the error lists what `owner` has."""
    if name == OFFICIAL:
        return official
    if name not in presets:
        raise StarflowError(f"sampler {name!r}: {owner} has the presets {[OFFICIAL, *presets]}")
    return presets[name]


def presets_to_json(presets: dict[str, SampleOptions]) -> str:
    """The one serialiser of presets (a manifest's `sampling_presets` is the same pydantic
    serialisation of the same type)."""
    return PRESETS.dump_json(presets, indent=2).decode() + "\n"


def presets_from_json(text: str | bytes, where: str) -> dict[str, SampleOptions]:
    """name -> options from presets JSON ({"fast": {...}, ...}), checked; errors name `where`.
    Read within `starflow.core.bounded`'s limits first: no NaN or inf, no integer outside int64 and
    no number outside float32 (a manifest carries the presets, and libstarflow reads them)."""
    parse_json(text, where)
    try:
        presets = PRESETS.validate_json(text)
    except ValidationError as err:
        first = err.errors()[0]
        at = "/".join(str(p) for p in first["loc"]) or "(top level)"
        raise StarflowError(f"{where}: not sampling presets: at {at}: {first['msg']}") from None
    check_presets(presets, where)
    return presets


def check_presets(presets: dict[str, SampleOptions], where: str) -> None:
    """Each preset's name and settings, its numbers within what a manifest carries (integers in
    int64, finite float32): read from a file, given to an export, or read from a manifest."""
    for name, options in presets.items():
        check_preset_name(name, where)
        try:
            options.check()
        except StarflowError as err:
            raise StarflowError(f"{where}: preset {name!r}: {err}") from None
        check_values(dataclasses.asdict(options), f"{where}: preset {name!r}")


def load_presets(path: Path) -> dict[str, SampleOptions]:
    """name -> options from a presets JSON file (at most MAX_PRESETS_BYTES)."""
    return presets_from_json(read_bytes(Path(path), MAX_PRESETS_BYTES, "sampling presets"), str(path))
