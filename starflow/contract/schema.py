"""`manifest.schema.json` and `record.schema.json`, generated from the contract's types.

Regenerate after changing a type in `entries.py` or `manifest.py`:

    python -m starflow.contract.schema

tests/contract/test_schema.py fails while a committed schema differs from the generated one. The schemas
are what another language implements (libstarflow reads the schema version from here), and what
`check_schema` holds every file to, so every field is required in them: writers write every
field, and a field's Python default is for Python callers only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter
from pydantic.json_schema import GenerateJsonSchema

from starflow.contract.manifest import CONTRACT, MANIFEST_NAME, RECORD, RECORD_NAME
from starflow.core.sampler import JACOBI_INITS, METHODS, STOP_RULES

HERE = Path(__file__).resolve().parent
DOCUMENTS: dict[str, tuple[TypeAdapter, str]] = {
    MANIFEST_NAME: (CONTRACT, "starflow export manifest"),
    RECORD_NAME: (RECORD, "starflow export record"),
}
# The sampler's settings types carry no constraints of their own (their `check` methods hold the
# rules, and loading runs them); these are those rules in JSON Schema, for other languages.
SAMPLER_RULES: dict[str, dict[str, dict[str, Any]]] = {
    "JacobiSettings": {
        "block_size": {"minimum": 1},
        "max_iter": {"minimum": 1},
        "threshold": {"minimum": 0},
        "init": {"enum": list(JACOBI_INITS)},
    },
    "SampleOptions": {
        "guidance": {"minimum": 0},
        "method": {"enum": list(METHODS)},
        "stop": {"enum": list(STOP_RULES)},
        "window": {"minimum": 1},
        "context": {"minimum": 1},
    },
}


class _Generator(GenerateJsonSchema):
    """pydantic's generator with every field required, no defaults and no field titles."""

    def field_is_required(self, field: Any, total: bool) -> bool:
        return True

    def default_schema(self, schema: Any) -> Any:
        return self.generate_inner(schema["schema"])

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False


def generate(name: str) -> dict[str, Any]:
    """The JSON Schema of `name` (manifest.json or record.json)."""
    adapter, title = DOCUMENTS[name]
    generated = adapter.json_schema(schema_generator=_Generator)
    for type_name, rules in SAMPLER_RULES.items():
        for field, rule in rules.items():
            generated.get("$defs", {}).get(type_name, {}).get("properties", {}).get(field, {}).update(rule)
    schema_file = name.replace(".json", ".schema.json")
    _one_line(generated)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://starflow.invalid/export/{schema_file}",
        **generated,
        "title": title,
    }


def _one_line(node: Any) -> None:
    """Descriptions taken from docstrings, on one line each."""
    if isinstance(node, dict):
        if isinstance(node.get("description"), str):
            node["description"] = " ".join(node["description"].split())
        for value in node.values():
            _one_line(value)
    elif isinstance(node, list):
        for value in node:
            _one_line(value)


def render(name: str) -> str:
    """The schema file's text, as committed."""
    return json.dumps(generate(name), indent=2) + "\n"


def path(name: str) -> Path:
    return HERE / name.replace(".json", ".schema.json")


def main() -> None:
    for name in DOCUMENTS:
        path(name).write_text(render(name))
        print(f"wrote {path(name)}", file=sys.stderr)


if __name__ == "__main__":
    main()
