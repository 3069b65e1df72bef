"""Named sampling presets: settings calibrated for one model, carried by its export's manifest.

A preset is a `SampleOptions` (guidance, method, Jacobi settings for the deep and the shallow
blocks) stored as JSON. The official settings stay every model's default; a preset is opt-in
(`starflow generate --sampler fast`). `scripts/calibrate_sampling.py` measures and writes the
embedded digits model's presets (`assets/digits-presets.json`) on sample quality.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from starflow.core.errors import StarflowError
from starflow.core.sampler import JacobiSettings, SampleOptions

DIGITS_PRESETS = Path(__file__).resolve().parent.parent / "assets" / "digits-presets.json"
OFFICIAL = "official"  # the name of the default: the export's own guidance and Jacobi settings


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


def preset_to_json(options: SampleOptions) -> dict[str, Any]:
    return dataclasses.asdict(options)


def preset_from_json(data: Any, where: str) -> SampleOptions:
    """A preset's JSON -> SampleOptions, checked; errors name `where`."""
    try:
        jacobi = JacobiSettings(**data["jacobi"])
        shallow = data.get("shallow_jacobi")
        options = SampleOptions(
            guidance=data["guidance"],
            method=data["method"],
            jacobi=jacobi,
            shallow_jacobi=None if shallow is None else JacobiSettings(**shallow),
        )
    except (TypeError, KeyError) as err:
        raise StarflowError(f"{where}: not a sampling preset ({type(err).__name__}: {err})") from None
    try:
        options.check()
    except StarflowError as err:
        raise StarflowError(f"{where}: {err}") from None
    return options


def load_presets(path: Path) -> dict[str, SampleOptions]:
    """name -> options from a presets JSON file ({"fast": {...}, ...})."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise StarflowError(f"{path}: cannot read sampling presets ({err})") from None
    if not isinstance(data, dict):
        raise StarflowError(f"{path}: expected an object of named presets")
    for name in data:
        check_preset_name(name, str(path))
    return {name: preset_from_json(value, f"{path}: preset {name!r}") for name, value in data.items()}
