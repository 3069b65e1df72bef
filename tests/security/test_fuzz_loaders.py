"""Property-based fuzz of the two loaders that read untrusted files: manifests and configs.

A random mutation of a valid document either loads or fails with a StarflowError, never with
another exception, and a manifest load never opens a file outside its directory.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from starflow.contract.manifest import MANIFEST_NAME, RECORD_NAME, Manifest
from starflow.core.config import PRESETS, config_from_dict, load_config
from starflow.core.errors import StarflowError

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["../../etc/passwd", "/etc/passwd", "..", ".", "block2.step.fp32", "a" * 300, "0" * 64]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def mutate(document: object, data: st.DataObject) -> object:
    """Replace, delete or add one value somewhere in a JSON-like document (a copy)."""
    document = json.loads(json.dumps(document))
    node = document
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            break
        key = data.draw(st.sampled_from(keys))
        child = node[key]
        if not isinstance(child, dict | list) or data.draw(st.booleans()):
            action = data.draw(st.sampled_from(["replace", "delete", "add"]))
            if action == "replace" or (action == "delete" and isinstance(node, list)):
                node[key] = data.draw(VALUES)
            elif action == "delete":
                del node[key]
            elif isinstance(node, dict):
                node[data.draw(st.text(min_size=1, max_size=8))] = data.draw(VALUES)
            else:
                node.append(data.draw(VALUES))
            return document
        node = child
    return data.draw(VALUES)


@contextlib.contextmanager
def opened_files() -> Iterator[list[Path]]:
    """Record every path `open` is asked for."""
    seen: list[Path] = []
    original = builtins.open

    def recording_open(file, *args, **kwargs):
        if isinstance(file, str | os.PathLike):
            seen.append(Path(file))
        return original(file, *args, **kwargs)

    builtins.open = recording_open
    try:
        yield seen
    finally:
        builtins.open = original


@pytest.fixture(scope="module")
def linked_export(fixture_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture export's files hard-linked into a directory of its own (no copy of the bytes)."""
    directory = tmp_path_factory.mktemp("fuzz") / "artifacts"
    directory.mkdir()
    for file in fixture_artifacts.iterdir():
        os.link(file, directory / file.name)
    return directory


@FUZZ
@given(data=st.data())
def test_manifest_mutations_load_or_fail_cleanly_and_stay_inside(linked_export: Path, data) -> None:
    original = json.loads((linked_export / MANIFEST_NAME).read_text())
    mutated = json.dumps(mutate(original, data)).encode()
    record = json.loads((linked_export / RECORD_NAME).read_text())
    record["manifest_sha256"] = hashlib.sha256(mutated).hexdigest()  # past the digest, to the checks
    path = linked_export / "mutated.json"
    inside = linked_export.resolve()
    with opened_files() as seen:
        try:
            Manifest.parse(mutated, json.dumps(record).encode(), str(path)).verify_files(linked_export)
        except StarflowError:
            pass
    outside = [p for p in seen if not p.resolve().is_relative_to(inside)]
    assert not outside, outside


@FUZZ
@given(data=st.data())
def test_config_mutations_load_or_fail_cleanly(data) -> None:
    base = dict(PRESETS[data.draw(st.sampled_from(sorted(PRESETS)))])
    mutated = mutate(base, data)
    strict = data.draw(st.booleans())
    try:
        config_from_dict(mutated, "fuzz", strict=strict)
    except StarflowError:
        pass


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=st.text(max_size=200) | VALUES.map(lambda v: yaml.safe_dump({"model": v})))
def test_config_files_load_or_fail_cleanly(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    path = tmp_path_factory.mktemp("yaml") / "config.yaml"
    path.write_text(text)
    try:
        load_config(path)
    except StarflowError:
        pass
