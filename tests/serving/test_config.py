"""`starflow serve`'s settings: the flags and the Ray Serve config file give one `ServeConfig`, the
file round-trips and never holds the key, and a bad setting is one line before Ray is imported."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from starflow.cli.main import app
from starflow.core.errors import StarflowError
from starflow.serving.config import (
    API_KEY_ENV,
    APP_NAME,
    ModelConfig,
    ServeConfig,
    app_args,
    read_config,
    serve_config,
)

runner = CliRunner()


def test_write_config_round_trips_without_the_key(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    flags = ["--artifacts", f"digits={tmp_path}", "--min-replicas", "1", "--max-replicas", "3",
             "--threads", "2", "--max-queued-requests", "9", "--max-images", "4", "--port", "8123",
             "--api-key", "s3cret"]  # fmt: skip
    result = runner.invoke(app, ["serve", "--write-config", str(path), *flags])
    assert result.exit_code == 0, result.output
    text = path.read_text()
    assert "s3cret" not in text and API_KEY_ENV in text
    config = read_config(path)
    assert config == ServeConfig(
        models={"digits": ModelConfig(artifacts=str(tmp_path), min_replicas=1, max_replicas=3, threads=2,
                                      max_queued_requests=9)},
        limits={"max_images": 4}, port=8123, api_key_env=API_KEY_ENV,
    )  # fmt: skip
    (application,) = yaml.safe_load(text)["applications"]
    assert application["name"] == APP_NAME and application["args"] == app_args(config)


def test_the_file_is_ray_serves_and_names_the_builder(tmp_path: Path) -> None:
    """What `serve deploy` and KubeRay read: Ray's own schema, and an import path to a builder
    that takes the file's args."""
    schema = pytest.importorskip("ray.serve.schema")
    path = tmp_path / "serve.yaml"
    autoscaled = ["--min-replicas", "1", "--max-replicas", "4"]
    assert runner.invoke(app, ["serve", "--write-config", str(path), *autoscaled]).exit_code == 0
    document = yaml.safe_load(path.read_text())
    deploy = schema.ServeDeploySchema.model_validate(document)
    (application,) = deploy.applications
    module, _, name = application.import_path.partition(":")
    builder = getattr(importlib.import_module(module), name)
    from ray import serve

    assert isinstance(builder(application.args), serve.Application)
    assert set(application.args["models"]) == {"digits", "digits-video"}  # the embedded models by default


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"models": {}}, "models: serve at least one model"),
        ({"models": {"a b": {"embedded": "digits"}}}, "models: 'a b': a name is letters"),
        ({"models": {"m": {}}}, "models.m: give embedded (digits or digits-video) or artifacts"),
        ({"models": {"m": {"artifacts": "rel/dir"}}}, "models.m.artifacts: expected an absolute path"),
        ({"models": {"m": {"embedded": "digits", "min_replicas": 1}}},
         "models.m: min_replicas, max_replicas"),
        ({"models": {"m": {"embedded": "digits", "replicas": 2, "min_replicas": 1, "max_replicas": 2}}},
         "models.m: replicas: a fixed count or min_replicas/max_replicas, not both"),
        ({"models": {"m": {"embedded": "digits", "replica": 2}}}, "models.m.replica: not a setting"),
        ({"limits": {"max_images": 0}}, "limits.max_images: input should be greater than or equal to 1"),
    ],
)  # fmt: skip
def test_a_bad_setting_is_one_line_naming_it(fields: dict, message: str) -> None:
    with pytest.raises(StarflowError) as caught:
        serve_config(**fields)
    assert str(caught.value).startswith(message), caught.value


def test_a_config_file_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"applications": [{"import_path": "other:app"}]}))
    with pytest.raises(StarflowError, match="expected one application with import_path"):
        read_config(path)
    assert runner.invoke(app, ["serve", "--write-config", str(path), "--port", "9000"]).exit_code == 0
    document = yaml.safe_load(path.read_text())
    document["applications"][0]["args"]["timeout_s"] = -1
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(StarflowError, match=r"serve.yaml: timeout_s: input should be greater than 0"):
        read_config(path)


def test_an_unset_key_variable_never_starts_open(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOME_KEY", raising=False)
    with pytest.raises(StarflowError, match="the environment variable SOME_KEY is not set"):
        serve_config(api_key_env="SOME_KEY").api_key()
    monkeypatch.setenv("SOME_KEY", "k")
    assert serve_config(api_key_env="SOME_KEY").api_key() == "k"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--artifacts", "digits"], "--artifacts: expected NAME=DIR, got 'digits'"),
        (["--artifacts", "m=/nonexistent"], "models.m.artifacts: /nonexistent holds no export"),
        (["--min-replicas", "1"], "models.digits: min_replicas, max_replicas: autoscaling needs both"),
        (["--replicas", "100000"], "replicas: the models need 200000 CPUs"),
        (["--config", "/nonexistent.yaml"], "config /nonexistent.yaml: cannot read"),
        (["--config", "x.yaml", "--replicas", "2"], "--config: the file holds the settings; drop --replicas"),
    ],
)
def test_a_bad_flag_fails_before_ray_is_imported(args: list[str], message: str) -> None:
    """One line, in the time a flag check takes: ray (and torch, onnxruntime) are blocked."""
    code = textwrap.dedent(
        f"""
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("ray", "torch", "onnxruntime", "fastapi"):
                    raise ImportError(f"imported before the error: {{name}}")
                return None

        sys.meta_path.insert(0, Block())
        from starflow.cli.main import app

        app(["serve", *{args!r}])
        """
    )
    began = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: {message}") and proc.stderr.count("\n") == 1, proc.stderr
    assert time.perf_counter() - began < 10
