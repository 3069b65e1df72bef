"""Hostile JSON and YAML (issue 29): deep nesting, 5,000-digit numbers, non-UTF-8 bytes, NaN and
numbers a C++ reader cannot hold, in every document starflow reads. Each ends in one StarflowError
naming the file and what is wrong (before: RecursionError, ValueError, or accepted)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from starflow.contract.manifest import MANIFEST_NAME, RECORD_NAME, Manifest
from starflow.core.bounded import MAX_DEPTH, MAX_NUMBER_DIGITS, MAX_STRING_CHARS
from starflow.core.config import load_config
from starflow.core.errors import StarflowError
from starflow.core.sampler import JacobiSettings, SampleOptions
from starflow.core.sampling_presets import check_presets, load_presets, presets_to_json
from starflow.export.onnx import ExportOptions
from starflow.model.checkpoint import CONFIG_METADATA_KEY, read_state_dict
from starflow.model.label_encoder import CLASSES_METADATA_KEY, load_label_encoder

DEEP = 100_000  # Python's json and PyYAML's composer recurse once per level
HOSTILE_JSON = {
    "deep nesting": (b"[" * DEEP + b"]" * DEEP, f"nested more than {MAX_DEPTH} deep"),
    "a 5000-digit integer": (b'{"a": 1' + b"0" * 5000 + b"}", "a number of 5001 digits"),
    "a 5000-digit fraction": (b'{"a": 0.' + b"1" * 5000 + b"}", "a number of 5001 digits"),
    "NaN": (b'{"a": NaN}', "at a: nan is not a finite number"),
    "Infinity": (b'{"a": [1, -Infinity]}', "at a/1: -inf is not a finite number"),
    "2^63": (b'{"a": 9223372036854775808}', "at a: 9223372036854775808 is an integer outside int64"),
    "over float32": (b'{"a": 1e39}', "at a: 1e\\+39 is not a finite number within float32's range"),
    "a lone surrogate": (b'{"a": "\\udcff"}', "at a: '\\\\udcff' is not UTF-8 text"),
    "a long string": (b'{"a": "' + b"x" * (MAX_STRING_CHARS + 1) + b'"}', "a string of 65537 characters"),
    "non-UTF-8 bytes": (b'{"a": "\xff"}', "not UTF-8 text \\(byte 0xff at offset 7\\)"),
}


def manifest_json(tmp_path: Path, document: bytes) -> str:
    path = tmp_path / MANIFEST_NAME
    Manifest.parse(document, None, str(path))
    return str(path)


def sampling_presets(tmp_path: Path, document: bytes) -> str:
    path = tmp_path / "presets.json"
    path.write_bytes(document)
    load_presets(path)
    return str(path)


def checkpoint_config(tmp_path: Path, document: bytes) -> str:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(1)}, path, metadata={CONFIG_METADATA_KEY: document.decode()})
    read_state_dict(path)
    return f"checkpoint {path}: embedded config"


def label_table(tmp_path: Path, document: bytes) -> str:
    path = tmp_path / "m.labels.safetensors"
    save_file(
        {"embedding.weight": torch.zeros(2, 1)}, path, metadata={CLASSES_METADATA_KEY: document.decode()}
    )
    load_label_encoder(path, 1, 1)
    return f"label encoder {path}"


def vae_config(tmp_path: Path, document: bytes) -> str:
    from starflow.model.vae import load_vae

    (tmp_path / "config.json").write_bytes(document)
    load_vae(tmp_path)
    return f"VAE config {tmp_path}"


def bulk_record(tmp_path: Path, document: bytes) -> str:
    from starflow.core.request import GenerateRequest
    from starflow.serving.bulk import RECORD, BulkRun

    (tmp_path / RECORD).write_bytes(document)
    BulkRun(tmp_path, GenerateRequest(prompts=[""]), [], "png", {}).check_record()
    return f"out {tmp_path}"


READERS: dict[str, Callable[[Path, bytes], str]] = {
    "manifest.json": manifest_json,
    "sampling presets": sampling_presets,
    "checkpoint config": checkpoint_config,
    "label table": label_table,
    "VAE config": vae_config,
    "bulk run record": bulk_record,
}


@pytest.mark.parametrize("case", HOSTILE_JSON)
@pytest.mark.parametrize("reader", READERS)
def test_hostile_json_is_refused_naming_the_file(tmp_path, reader, case):
    document, message = HOSTILE_JSON[case]
    if case == "non-UTF-8 bytes" and reader in ("checkpoint config", "label table"):
        pytest.skip("safetensors metadata is UTF-8 text by its format")
    with pytest.raises(StarflowError) as err:
        READERS[reader](tmp_path, document)
    assert "\n" not in str(err.value)
    assert str(err.value).startswith((str(tmp_path), "checkpoint", "label", "VAE config", "out"))
    assert re.search(message, str(err.value)), str(err.value)


@pytest.mark.parametrize("case", ["deep nesting", "a 5000-digit integer", "NaN", "non-UTF-8 bytes"])
def test_a_hostile_record_json_is_refused_naming_it(demo_export, tmp_path, case):
    document, message = HOSTILE_JSON[case]
    source = str(tmp_path / MANIFEST_NAME)
    with pytest.raises(StarflowError, match=f"^{tmp_path / RECORD_NAME}: .*{message}"):
        Manifest.parse((demo_export / MANIFEST_NAME).read_bytes(), document, source)


def test_real_documents_are_within_the_limits(demo_export, demo_video_export):
    """The limits leave room: the embedded models' manifests and records, the presets, configs."""
    for directory in (demo_export, demo_video_export):
        Manifest.load(directory, verify_files=False)
    assert load_presets(Path(__file__).parents[2] / "starflow" / "assets" / "digits-presets.json")


# ---- YAML configs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, message",
    [
        (b"model: " + b"[" * DEEP + b"]" * DEEP, f"line 1: nested more than {MAX_DEPTH} deep"),
        (b"model:\n  channels: 1" + b"0" * 5000, "line 2: a number of 5001 digits"),
        (b"model:\n  channels: 9223372036854775808", "9223372036854775808 is an integer outside int64"),
        (b"model:\n  cfg: .nan", "nan is not a finite number"),
        (b"model:\n  cfg: 1.0e+39", "1e\\+39 is not a finite number within float32's range"),
        (b"model:\n  vae: " + b"x" * (MAX_STRING_CHARS + 1), "a string of 65537 characters"),
        (b"model:\n  vae: \xff\n", "not UTF-8 text \\(byte 0xff at offset 14\\)"),
    ],
    ids=["deep", "5000 digits", "2^63", "nan", "over float32", "long string", "non-UTF-8"],
)
def test_hostile_yaml_configs_are_refused_naming_the_file(tmp_path, text, message):
    path = tmp_path / "config.yaml"
    path.write_bytes(text)
    with pytest.raises(StarflowError, match=f"^config {path}: .*{message}"):
        load_config(path)


def test_limits_are_documented_numbers():
    """What the README and libstarflow state (a change here is a change there)."""
    assert (MAX_DEPTH, MAX_NUMBER_DIGITS, MAX_STRING_CHARS) == (64, 32, 65536)
    assert yaml.safe_load("a: " + "[" * MAX_DEPTH + "]" * MAX_DEPTH)  # the limit itself is allowed


# ---- values a manifest cannot carry ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda p: p["jacobi"].update(threshold=math.inf), "fast/jacobi/threshold"),
        (lambda p: p["jacobi"].update(block_size=2**63), "fast/jacobi/block_size"),
        (lambda p: p["shallow_jacobi"].update(max_iter=-(2**63) - 1), "fast/shallow_jacobi/max_iter"),
        (lambda p: p.update(guidance=1e39), "fast/guidance"),
    ],
    ids=["Infinity", "2^63", "-2^63-1", "1e39"],
)
def test_presets_a_manifest_cannot_carry_are_refused_naming_file_and_key(tmp_path, edit, key):
    presets = json.loads(
        presets_to_json(
            {"fast": SampleOptions(1.0, jacobi=JacobiSettings(), shallow_jacobi=JacobiSettings())}
        )
    )
    edit(presets["fast"])
    path = tmp_path / "presets.json"
    path.write_text(json.dumps(presets))
    with pytest.raises(StarflowError, match=f"^{path}: at {key}: "):
        load_presets(path)


def test_an_export_of_such_presets_is_refused_before_writing(demo_export, tmp_path):
    manifest = Manifest.load(demo_export, verify_files=False)
    bad = {"fast": SampleOptions(jacobi=JacobiSettings(threshold=math.inf))}
    with pytest.raises(StarflowError, match="preset 'fast': at jacobi/threshold: inf is not a finite"):
        check_presets(bad, "sampling_presets")
    with pytest.raises(StarflowError, match="^sampling_presets: preset 'fast': at jacobi/threshold"):
        ExportOptions(sampling_presets=bad).check()  # what export_onnx checks before any tracing
    with pytest.raises(StarflowError, match=f"{MANIFEST_NAME}: at sampling_presets/fast/jacobi/threshold"):
        dataclasses.replace(manifest, sampling_presets=bad).write(tmp_path)
    assert not list(tmp_path.iterdir())


def test_an_out_of_range_number_under_a_duplicate_key_is_refused(tmp_path):
    """The later value wins in the parsed document, so only the literal names it (as libstarflow
    refuses it on reading)."""
    path = tmp_path / "presets.json"
    path.write_bytes(b'{"a": 1e400, "a": 1}')
    with pytest.raises(StarflowError, match=f"^{path}: 1e400 is out of range"):
        load_presets(path)


def test_a_manifest_starflow_would_refuse_to_read_is_refused_at_write(demo_export, tmp_path):
    """A string within the limit as characters but not as written: json.dumps escapes each
    non-ASCII character to 6 (\\u00e9); what is written is checked as the reader will read it."""
    manifest = Manifest.load(demo_export, verify_files=False)
    version = "\u00e9" * 20_000
    changed = dataclasses.replace(manifest, producer=dataclasses.replace(manifest.producer, version=version))
    with pytest.raises(StarflowError, match=f"^{tmp_path / MANIFEST_NAME}: a string of 120000 characters"):
        changed.write(tmp_path)
    assert not list(tmp_path.iterdir())


# ---- files that are not regular files ---------------------------------------------------------------------
@contextlib.contextmanager
def hang_guard(seconds: int = 10) -> Iterator[None]:
    """A read that blocks (a FIFO without a writer) fails the test after `seconds` instead of
    hanging the suite."""

    def hung(*_: object) -> None:
        raise TimeoutError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_fifo_as_presets_file_is_refused_without_waiting(tmp_path):
    path = tmp_path / "presets.json"
    os.mkfifo(path)
    with (
        hang_guard(),
        pytest.raises(StarflowError, match=f"^sampling presets {path}: is not a regular file$"),
    ):
        load_presets(path)


def test_a_fifo_as_graph_file_is_refused_without_waiting(demo_export, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(demo_export, export)
    manifest = Manifest.load(export, verify_files=False)
    graph = manifest.graphs[0]
    (export / graph.file).unlink()
    os.mkfifo(export / graph.file)
    with hang_guard(), pytest.raises(StarflowError, match=f"^graph {graph.name}: .*is not a regular file$"):
        manifest.verify_files(export)
