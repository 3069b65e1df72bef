"""JSON and YAML read without trusting them: the limits are checked before anything walks the
document, so a hostile file ends in one line naming it, not a RecursionError or a ValueError.

Every JSON or YAML file starflow reads (manifest.json, record.json, sampling presets, YAML
configs, a checkpoint's embedded config) goes through here, and libstarflow applies the same
limits to what it reads:

- nesting at most MAX_DEPTH arrays/objects deep, checked by a linear scan (no recursion);
- a string at most MAX_STRING_CHARS characters as written;
- a number at most MAX_NUMBER_DIGITS digits; an integer within int64, any other number finite
  and within float32's range (NaN and Infinity are not numbers here: a C++ reader refuses them);
- the text valid UTF-8, and no string holding a lone surrogate (an escape such as \\udcff: what
  a non-UTF-8 file name becomes in Python).
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import yaml

from starflow.core.errors import StarflowError

MAX_DEPTH = 64  # real manifests nest 6 deep, configs 3
MAX_NUMBER_DIGITS = 32  # a float's repr has at most 17 significant and 3 exponent digits
MAX_STRING_CHARS = 1 << 16  # the longest string of a real manifest has 170 characters
INT64 = (-(2**63), 2**63 - 1)
FLOAT32_MAX = float(np.finfo(np.float32).max)
MAX_YAML_BYTES = 1 << 20  # configs are a few KB
MAX_YAML_ALIASES = 64  # official configs use none; an alias bomb uses thousands

_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # a JSON string literal
_LONG_NUMBER = re.compile(rf"[-+.0-9eE]{{{MAX_NUMBER_DIGITS + 1},}}")  # long enough to be over
# where a lone surrogate could come from: an escape of one, or one in text given as a str (a
# superset: a pair, or an escaped backslash before "ud8..", only costs a walk of the values)
_MAYBE_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]|[\ud800-\udfff]")
_NESTING = np.zeros(256, np.int32)  # byte -> change of depth
_NESTING[list(b"[{")], _NESTING[list(b"]}")] = 1, -1


def decode(data: bytes | str, source: str) -> str:
    """UTF-8 text, or a one-line error naming `source` and the first bad byte."""
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise StarflowError(
            f"{source}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})"
        ) from None


def parse_json(data: bytes | str, source: str, max_string: int = MAX_STRING_CHARS) -> Any:
    """A JSON document within the limits above; errors name `source` (and the line or key).
    `max_string` is larger only for a document whose strings are documents checked on their own
    (a safetensors header's metadata)."""
    text = decode(data, source)
    structure = _STRING.sub('""', text)  # brackets and numbers outside strings; lines kept
    if len(text) - len(structure) > max_string:  # else no string can be over
        longest = max(map(len, _STRING.findall(text))) - 2
        if longest > max_string:
            raise StarflowError(f"{source}: a string of {longest} characters (at most {max_string})")
    _check_depth(structure, source)
    for match in _LONG_NUMBER.finditer(structure):
        digits = sum(c.isdigit() for c in match.group())
        if digits > MAX_NUMBER_DIGITS:
            line = structure.count("\n", 0, match.start()) + 1
            raise StarflowError(
                f"{source}: line {line}: a number of {digits} digits (at most {MAX_NUMBER_DIGITS})"
            )
    out_of_range: list[str] = []  # numbers are checked as they are parsed; the key found after

    def number(kind: type, within: Callable[[Any], bool]) -> Callable[[str], Any]:
        def parse(literal: str) -> Any:
            value = kind(literal)
            if not within(value):
                out_of_range.append(literal)
            return value

        return parse

    try:
        document = json.loads(
            text,
            parse_int=number(int, lambda v: INT64[0] <= v <= INT64[1]),
            parse_float=number(float, lambda v: abs(v) <= FLOAT32_MAX),
            parse_constant=number(float, lambda v: False),
        )
    except json.JSONDecodeError as err:
        raise StarflowError(f"{source}: not valid JSON ({err})") from None
    if out_of_range or _MAYBE_SURROGATE.search(text):  # then find which value
        check_values(document, source)
    if out_of_range:  # a value a later duplicate key replaced: libstarflow reads every literal
        raise StarflowError(
            f"{source}: {out_of_range[0]} is out of range (an integer within int64, any other "
            "number finite and within float32's range)"
        )
    return document


def _check_depth(structure: str, source: str) -> None:
    """Nesting of `structure` (JSON with its strings emptied) at most MAX_DEPTH: one pass, a
    running sum over 1 MiB chunks (memory bounded whatever the file's size)."""
    raw = np.frombuffer(structure.encode(), np.uint8)
    depth = 0
    for first in range(0, raw.size, 1 << 20):
        running = depth + np.cumsum(_NESTING[raw[first : first + (1 << 20)]])
        if running.max() > MAX_DEPTH:
            at = first + int(np.argmax(running > MAX_DEPTH))
            line = int(np.count_nonzero(raw[:at] == ord("\n"))) + 1
            raise StarflowError(f"{source}: line {line}: nested more than {MAX_DEPTH} deep")
        depth = int(running[-1])


def check_values(document: Any, source: str) -> None:
    """Every integer within int64, every other number finite and within float32's range, every
    string UTF-8 text (no lone surrogate, what a non-UTF-8 file name becomes): what a C++ reader
    takes. The key path is named. For a document read, or one about to be written."""
    for path, value in _leaves(document):
        if isinstance(value, str):
            if _utf8(value):
                continue
            why = "not UTF-8 text (a non-UTF-8 file name?)"
        elif isinstance(value, bool) or not isinstance(value, int | float):
            continue
        elif isinstance(value, int) and not INT64[0] <= value <= INT64[1]:
            why = "an integer outside int64"
        elif isinstance(value, float) and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
            why = "not a finite number within float32's range"
        else:
            continue
        at = f"at {'/'.join(path)}: " if path else ""
        raise StarflowError(f"{source}: {at}{ascii(value)} is {why}")


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _leaves(document: Any) -> Iterator[tuple[list[str], Any]]:
    """(key path, value) of every scalar and every key, without recursion."""
    stack: list[tuple[list[str], Any]] = [([], document)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                yield path, key
                stack.append(([*path, str(key)], value))
        elif isinstance(node, list | tuple):
            stack.extend(([*path, str(i)], v) for i, v in enumerate(node))
        else:
            yield path, node


def read_json(path: Path, max_bytes: int, what: str = "") -> Any:
    """`path`'s JSON document (at most `max_bytes`), parsed by `parse_json`."""
    return parse_json(read_bytes(path, max_bytes, what), f"{what} {path}".strip())


def open_regular(path: Path, source: str) -> BinaryIO:
    """`path` opened for reading if it is a regular file, else a one-line error naming `source`.
    Opened without waiting (O_NONBLOCK: a FIFO without a writer would block open() for good),
    checked on the open file (no race with a rename), then made blocking for the reads."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StarflowError(f"{source}: is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: Path, max_bytes: int, what: str = "") -> bytes:
    """At most `max_bytes` of regular file `path`, or a one-line error naming it."""
    source = f"{what} {path}".strip()
    try:
        with open_regular(path, source) as f:
            data = f.read(max_bytes + 1)
    except OSError as err:
        raise StarflowError(f"{source}: cannot read ({err.strerror or err})") from None
    if len(data) > max_bytes:
        raise StarflowError(f"{source}: larger than {max_bytes} bytes")
    return data


def read_yaml(path: Path, what: str) -> Any:
    """A YAML document (at most MAX_YAML_BYTES) through the safe loader, its event stream checked
    first against the limits above and at most MAX_YAML_ALIASES aliases (before anything expands
    or PyYAML's recursive composer runs)."""
    source = f"{what} {path}"
    text = decode(read_bytes(path, MAX_YAML_BYTES, what), source)
    try:
        _check_yaml_events(text, source)
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise StarflowError(f"{source}: not valid YAML ({' '.join(str(err).split())})") from None


def _check_yaml_events(text: str, source: str) -> None:
    loader = yaml.SafeLoader(text)
    depth = aliases = 0
    try:
        while loader.check_event():
            event = loader.get_event()
            where = f"{source}: line {event.start_mark.line + 1}"
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    raise StarflowError(f"{where}: nested more than {MAX_DEPTH} deep")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
            elif isinstance(event, yaml.AliasEvent):
                aliases += 1
                if aliases > MAX_YAML_ALIASES:
                    raise StarflowError(f"{source}: more than {MAX_YAML_ALIASES} YAML aliases")
            elif isinstance(event, yaml.ScalarEvent):
                _check_yaml_scalar(loader, event, where)
    finally:
        loader.dispose()


def _check_yaml_scalar(loader: yaml.SafeLoader, event: yaml.ScalarEvent, where: str) -> None:
    """A scalar's length; a number's digits, then its value (built only once it is short)."""
    if len(event.value) > MAX_STRING_CHARS:
        raise StarflowError(
            f"{where}: a string of {len(event.value)} characters (at most {MAX_STRING_CHARS})"
        )
    tag = (
        event.tag
        if event.tag not in (None, "!")
        else loader.resolve(yaml.ScalarNode, event.value, event.implicit)
    )
    if not tag.endswith((":int", ":float")):
        return
    digits = sum(c.isdigit() for c in event.value)
    if digits > MAX_NUMBER_DIGITS:
        raise StarflowError(f"{where}: a number of {digits} digits (at most {MAX_NUMBER_DIGITS})")
    node = yaml.ScalarNode(tag, event.value)
    try:
        value = loader.construct_yaml_int(node) if tag.endswith(":int") else loader.construct_yaml_float(node)
    except ValueError:
        raise StarflowError(f"{where}: {event.value!r} is not a number") from None
    check_values(value, where)
