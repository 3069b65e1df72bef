"""Calibrated sampling presets: stored with the model, carried by the manifest, opt-in at sampling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from starflow.cli.main import app
from starflow.contract.manifest import Manifest
from starflow.core.errors import StarflowError
from starflow.core.sampler import JacobiSettings, SampleOptions
from starflow.core.sampling_presets import DIGITS_PRESETS, load_presets, presets_from_json, presets_to_json
from starflow.export.onnx import ExportOptions
from starflow.model.reference import ReferenceGenerator
from starflow.runtime.generator import Generator

runner = CliRunner()
FAST_LIKE = SampleOptions(
    1.0, "jacobi", JacobiSettings(16, 32, 1e-3), JacobiSettings(64, 2, 1e-3, "chunk-mean")
)


def test_preset_json_round_trip_and_refusals(tmp_path: Path) -> None:
    text = presets_to_json({"fast": FAST_LIKE})
    assert presets_from_json(text, "x") == {"fast": FAST_LIKE}
    broken = json.loads(text)
    broken["fast"]["method"] = "euler"
    with pytest.raises(StarflowError, match="x: preset 'fast': method: expected one of"):
        presets_from_json(json.dumps(broken), "x")
    broken["fast"] |= {"method": "jacobi", "steps": 3}
    with pytest.raises(StarflowError, match="x: not sampling presets: at fast/steps: Unexpected"):
        presets_from_json(json.dumps(broken), "x")
    (tmp_path / "p.json").write_text(presets_to_json({"official": FAST_LIKE}))
    with pytest.raises(StarflowError, match="p.json: sampling preset name 'official' is reserved"):
        load_presets(tmp_path / "p.json")
    with pytest.raises(StarflowError, match="sampling preset name 'no good' is reserved or not a plain word"):
        ExportOptions(sampling_presets={"no good": FAST_LIKE}).check()


def test_the_embedded_model_ships_a_calibrated_fast_preset() -> None:
    fast = load_presets(DIGITS_PRESETS)["fast"]
    official = ReferenceGenerator.load().sampling()
    assert fast.guidance == official.guidance  # calibrated budgets, not a different model setting
    assert ReferenceGenerator.load().sampling("fast") == fast


def test_the_export_carries_the_presets_and_fast_costs_fewer_calls(demo_export: Path) -> None:
    manifest = Manifest.load(demo_export)
    assert manifest.sampling("fast") == load_presets(DIGITS_PRESETS)["fast"]
    with pytest.raises(
        StarflowError, match=r"sampler 'nope': this export has the presets \['official', 'fast'\]"
    ):
        manifest.sampling("nope")
    generator = Generator.load(demo_export)
    calls = {}
    for name in ("official", "fast"):
        result = generator.generate([str(d) for d in range(10)], seed=3, sampling=generator.sampling(name))
        calls[name] = sum(s.evaluations for s in result.stats)
    assert calls["fast"] * 2 <= calls["official"]


def test_generate_sampler_option(demo_export: Path, tmp_path: Path) -> None:
    out = tmp_path / "fast.npy"
    result = runner.invoke(app, ["generate", "--prompt", "3", "--sampler", "fast", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "fast sampler" in result.output and out.is_file()
    result = runner.invoke(app, ["generate", "--prompt", "3", "--sampler", "nope", "--out", str(out)])
    assert result.exit_code == 2 and "sampler 'nope': this export has the presets" in result.output


def test_bench_quality_puts_calls_and_quality_side_by_side(demo_export: Path, tmp_path: Path) -> None:
    out = tmp_path / "quality.json"
    args = ["bench", "--quality", "--per-digit", "3", "--threads", "1", "--json", str(out)]
    result = runner.invoke(app, [*args, "--artifacts", str(demo_export)])
    assert result.exit_code == 0, result.output
    assert "official" in result.output and "fast" in result.output
    settings = {s["name"]: s for s in json.loads(out.read_text())["settings"]}
    assert set(settings) == {"official", "fast"}
    assert settings["fast"]["block_calls"] < settings["official"]["block_calls"]
    for s in settings.values():
        assert s["images"] == 30 and 0.0 <= s["accuracy"] <= 1.0 and s["diversity"] > 0


def test_bench_quality_refuses_a_model_that_is_not_the_digits_one(fixture_artifacts: Path) -> None:
    result = runner.invoke(app, ["bench", "--quality", "--artifacts", str(fixture_artifacts)])
    assert result.exit_code != 0
    assert "scores a digits model (prompts 0-9)" in result.output
    result = runner.invoke(app, ["bench", "--quality", "--per-digit", "1"])
    assert result.exit_code != 0 and "per_digit: must be an integer >= 2" in result.output
