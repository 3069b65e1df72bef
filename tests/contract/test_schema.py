"""The contract's JSON Schemas are generated from its types (starflow.contract.schema)."""

from __future__ import annotations

import json
import re

import pytest

from starflow.contract.manifest import MANIFEST_NAME, RECORD_NAME, SCHEMA_VERSION, schema
from starflow.contract.schema import path, render
from tests.conftest import ROOT


@pytest.mark.parametrize("name", [MANIFEST_NAME, RECORD_NAME])
def test_committed_schema_is_the_generated_one(name: str) -> None:
    assert path(name).read_text() == render(name), "run: python -m starflow.contract.schema"


def test_the_schema_version_is_written_once() -> None:
    """The schemas carry the Python constant; libstarflow reads it from the schema file, not a literal."""
    assert schema(MANIFEST_NAME)["properties"]["schema_version"]["const"] == SCHEMA_VERSION
    assert schema(RECORD_NAME)["properties"]["schema_version"]["const"] == SCHEMA_VERSION
    cmake = ROOT / "runtime" / "cpp" / "cmake" / "StarflowSchemaVersion.cmake"  # both projects include it
    assert "properties schema_version const" in cmake.read_text()
    assert cmake.name in (ROOT / "runtime" / "cpp" / "CMakeLists.txt").read_text()
    header = (ROOT / "runtime" / "cpp" / "src" / "manifest.hpp").read_text()
    assert re.search(r"kSchemaVersion = STARFLOW_SCHEMA_VERSION;", header)


def test_every_field_is_required_and_unknown_keys_are_refused() -> None:
    """Writers write every field and other languages read every one: no Python default leaks in."""

    def objects(node):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                yield node
            for value in node.values():
                yield from objects(value)
        elif isinstance(node, list):
            for value in node:
                yield from objects(value)

    found = list(objects(json.loads(path(MANIFEST_NAME).read_text())))
    assert len(found) > 15
    for node in found:
        assert set(node["required"]) == set(node["properties"]), node.get("title")
        assert node["additionalProperties"] is False, node.get("title")
        assert not [key for key, value in node["properties"].items() if "default" in value], node.get("title")
