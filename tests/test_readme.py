"""The README runs as written: its Python blocks in order in one namespace (a fresh directory), and
each command of its shell blocks either runs here or is listed in SKIPPED with the reason. The
names and paths it (and docs/benchmarks.md) cites exist.

Commands on `artifacts/` and `checkpoint.pth` (an official checkpoint's export) run on the tiny
official fixture under those names, exported once per session by tests/conftest.py; commands on
the embedded models reuse the session's cached exports, as `starflow generate` itself would.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import re
import shlex
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from starflow.cli.main import app
from tests.conftest import T2I

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = (README, ROOT / "docs" / "benchmarks.md")

# Commands the tests below run, by the start of their text (shlex-joined, comments dropped).
CPP_PROMPTS = "build/cpp/starflow-run --artifacts digits-onnx"
CPP_LATENTS = "build/cpp/starflow-run --artifacts artifacts/"
CPP_CLIP = "build/cpp/starflow-run --artifacts digits-video/ --prompt 3"
CPP_LIKELIHOOD = "build/cpp/starflow-run --artifacts digits-video/ --likelihood"
INSPECT = "starflow inspect artifacts/"
VALIDATE = "starflow validate artifacts/"
GRID = "starflow generate --prompt 7 --num-images 16"
PYTORCH = "starflow generate --prompt 7 --engine pytorch"
GIF = "starflow generate --prompt 3 --frames 8"
MP4 = "starflow generate --prompt 3 --frames 16"
EMBEDDED_EXPORT = "starflow export onnx --checkpoint starflow/assets/digits.safetensors"
CURL = "curl -s http://127.0.0.1:8000/v1/"
RUN = (CPP_PROMPTS, CPP_LATENTS, CPP_CLIP, CPP_LIKELIHOOD, INSPECT, VALIDATE, GRID, PYTORCH, GIF, MP4)
RUN += (EMBEDDED_EXPORT, CURL)

SKIPPED = {
    "make demo": "creates .venv and runs `starflow demo`, which tests/apps/test_generate.py runs "
    "(test_demo_writes_the_grid_and_the_timing)",
    "make test": "is this test suite (with `make cpp`, `make cpp-asan`, ruff and scripts/check_layers.py)",
    "pip install": "needs the network; CI's fresh clone installs this way",
    "make cpp": "builds build/cpp in minutes; `make test` runs it before pytest and the starflow-run "
    "commands here use that build",
    "starflow export onnx --checkpoint checkpoint.pth": "an official checkpoint with flan-t5-xl and "
    "sd-vae-ft-ema; conftest's fixture_artifacts exports the tiny official fixture through the same "
    "command (without the encoder and VAE, which tests/model/test_reference.py exports as tiny random ones)",
    "starflow generate --artifacts artifacts/ --prompt 'a red fox'": "needs an export with a T5 text "
    "encoder (flan-t5-xl); tests/model/test_reference.py generates through a tiny random T5 and VAE",
    "starflow export onnx --checkpoint starflow-v.pth": "an official STARFlow-V checkpoint; "
    "tests/runtime/test_pipeline_video.py exports the official video fixture",
    "starflow generate --artifacts video/": "the official STARFlow-V export of the line above",
    "starflow export trt": "engine builds take minutes; tests/export/test_trt.py builds these grids, batch "
    "range and target on the fixture's export (at optimization level 0)",
    "starflow train --config": "1,800 steps take about an hour here; tests/training/test_train.py trains "
    "through the same code for a few steps",
    "starflow train ...": "not a whole command (`...` stands for the line above's options); "
    "tests/training/test_train.py trains with nproc=2",
    "starflow serve": "serves until Ctrl-C; tests/serving/test_deployment.py runs `starflow serve --config` "
    "(the file `--write-config` writes) on a two-node Ray cluster, and benchmarks/serve_load.py times "
    "`starflow serve` to its first answer",
    "python -c": "the openai package against `starflow serve`: tests/serving/test_deployment.py "
    "(test_openai_client_gets_starflow_generates_image) makes this call on the served embedded model",
    "serve deploy": "Ray's own CLI onto a running Ray cluster with its dashboard; not run here "
    "(`serve run` of the same file was run by hand)",
    "starflow generate --prompts-file": "starts Ray; tests/serving/test_bulk.py runs bulk generation in "
    "this process and over a two-node Ray cluster, killed and resumed",
    "starflow checkpoint consolidate": "needs the 1,800-step run above; tests/training/test_train.py "
    "consolidates a short run through this command",
}


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def shell_commands() -> list[list[str]]:
    """Every command of the README's bash blocks, continuation lines joined, comments dropped."""
    lines = "\n".join(blocks("bash")).replace("\\\n", " ").splitlines()
    return [args for line in lines if (args := shlex.split(line, comments=True))]


def readme_command(start: str) -> list[str]:
    matches = [args for args in shell_commands() if shlex.join(args).startswith(start)]
    assert len(matches) == 1, f"{len(matches)} README commands start with {start!r}"
    return matches[0]


def starflow(args: list[str]) -> str:
    """A README `starflow ...` command through the CLI, in this process; returns its output."""
    assert args[0] == "starflow"
    result = CliRunner().invoke(app, args[1:])
    assert result.exit_code == 0, result.output
    return result.output


def starflow_run(args: list[str], cwd: Path) -> str:
    """A README `build/cpp/starflow-run ...` command with this checkout's build; returns its stdout."""
    from tests.runtime.cpp.test_libstarflow import BUILD, built

    assert args[0] == "build/cpp/starflow-run"
    program = built(BUILD) / "starflow-run"
    result = subprocess.run([str(program), *args[1:]], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_every_readme_command_runs_here_or_is_skipped_with_a_reason() -> None:
    languages = set(re.findall(r"^```(\w*)\n", README.read_text(), flags=re.M))
    assert languages == {"", "bash", "python", "c"}  # "": printed output; c: runtime/cpp/examples/sample.c
    commands = [shlex.join(args) for args in shell_commands()]
    for command in commands:
        matched = [start for start in (*RUN, *SKIPPED) if command.startswith(start)]
        assert len(matched) == 1, f"README {command!r}: matched by {matched} (add it to RUN or SKIPPED)"
    unused = [start for start in (*RUN, *SKIPPED) if not any(c.startswith(start) for c in commands)]
    assert not unused, f"no README command starts with {unused}"


def test_readme_names_and_paths_exist() -> None:
    """Every `starflow.x.y` name resolves (module, then attribute) and every repo path exists."""
    for doc in DOCS:
        text = doc.read_text()
        for name in set(re.findall(r"(?<![\w/<.-])starflow(?:\.[A-Za-z_]\w*)+", text)):
            parts = name.split(".")
            for cut in range(len(parts), 0, -1):
                with contextlib.suppress(ModuleNotFoundError):
                    target = importlib.import_module(".".join(parts[:cut]))
                    break
            for attribute in parts[cut:]:
                assert hasattr(target, attribute), f"{doc.name}: {name} does not resolve"
                target = getattr(target, attribute)
        folders = "starflow|runtime|export|cli|scripts|tests|benchmarks|docs"
        for path in set(re.findall(rf"(?<![\w/.-])((?:{folders})/[\w./-]*[\w/])", text)):
            assert (ROOT / path).exists(), f"{doc.name}: {path} does not exist"


@pytest.fixture(scope="module")
def python_examples(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The README's Python blocks run in order in one namespace; (their directory, what they printed)."""
    directory = tmp_path_factory.mktemp("readme-python")
    namespace: dict[str, object] = {}
    printed = io.StringIO()
    with contextlib.chdir(directory), contextlib.redirect_stdout(printed):
        for index, block in enumerate(blocks("python")):
            exec(compile(block, f"README.md python block {index}", "exec"), namespace)  # noqa: S102
    return directory, printed.getvalue()


def test_readme_python_examples_run(python_examples: tuple[Path, str]) -> None:
    directory, printed = python_examples
    assert len(blocks("python")) >= 3
    assert "iterations per chunk" in printed and ("images/s" in printed or "s per image" in printed)
    assert (directory / "digits-onnx" / "manifest.json").is_file()


def test_cpp_prompt_example_on_the_python_export(python_examples: tuple[Path, str]) -> None:
    """`starflow-run --artifacts digits-onnx ... --out digits.png` on the export the README's Python
    made (no self-denoise): one grid of 2 rows (prompts) by 4 (images), 8x8 digits drawn 4x."""
    from PIL import Image

    directory, _ = python_examples
    printed = starflow_run(readme_command(CPP_PROMPTS), directory)
    assert printed.startswith("generated 8 images 8x8 -> digits.png in ") and printed.count("\n") == 1
    with Image.open(directory / "digits.png") as image:
        assert image.size == ((4 * 9 + 1) * 4, (2 * 9 + 1) * 4)
    assert not list(directory.glob("digits-*.png"))


def test_cpp_clip_and_likelihood_examples(demo_video_export: Path, tmp_path: Path) -> None:
    """The embedded video model's export as digits-video/: one 8-frame clip of "3", then its bits
    per dimension, as the README prints them."""
    (tmp_path / "digits-video").symlink_to(demo_video_export)
    printed = starflow_run(readme_command(CPP_CLIP), tmp_path)
    assert printed.startswith("generated 1 clip of 8 frames 10x10 -> three.npy in ")
    assert np.load(tmp_path / "three.npy").shape == (1, 8, 10, 10, 1)
    printed = starflow_run(readme_command(CPP_LIKELIHOOD), tmp_path).splitlines()
    assert re.fullmatch(r"0: -?\d+\.\d+ bits/dim \(prompt '3'\)", printed[0]), printed
    assert printed[1].startswith("mean ") and len(printed) == 2


@pytest.fixture(scope="module")
def official_names(fixture_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory where the README's official names exist: artifacts/ (the tiny official fixture's
    export), checkpoint.pth and config.yaml, and the latent example's noise.npy, y.npy, y0.npy."""
    from safetensors.numpy import load_file

    directory = tmp_path_factory.mktemp("readme-official")
    shutil.copytree(fixture_artifacts, directory / "artifacts")
    for name in ("checkpoint.pth", "config.yaml"):
        (directory / name).symlink_to(T2I / name)
    golden = load_file(T2I / "golden.safetensors")
    for name, key in (("noise", "noise"), ("y", "y"), ("y0", "y_null")):
        np.save(directory / f"{name}.npy", golden[key])
    return directory


def test_cpp_latent_example(official_names: Path) -> None:
    printed = starflow_run(readme_command(CPP_LATENTS), official_names)
    assert printed == f"sampled a (2, 4, 8, 8) latent -> latent.npy in {printed.split(' in ')[1]}"
    assert np.load(official_names / "latent.npy").shape == (2, 4, 8, 8)
    assert json.loads((official_names / "stats.json").read_text())  # one entry per block


def test_inspect_and_validate_examples(official_names: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(official_names)
    assert "block" in starflow(readme_command(INSPECT))
    assert starflow(readme_command(VALIDATE)).startswith("validation passed: ")


def test_generate_examples_on_the_embedded_models(
    demo_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image lines reuse the session's cached export; the video lines export the embedded video
    model on first use (once per session: tests/apps/test_generate.py's demo makes the same export)."""
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    assert "generated 16 images 8x8" in starflow(readme_command(GRID))
    with Image.open("sevens.png") as image:
        assert image.size == ((8 * 9 + 1) * 4, (2 * 9 + 1) * 4)  # 8 columns, 2 rows, 4x
    assert "pytorch engine" in starflow(readme_command(PYTORCH))
    assert np.load("sevens.npy").shape == (1, 8, 8, 1)
    assert "generated 1 clip of 8 frames" in starflow(readme_command(GIF))
    with Image.open("three.gif") as gif:
        assert gif.n_frames == 8
    assert "generated 1 clip of 16 frames" in starflow(readme_command(MP4))
    assert Path("three.mp4").stat().st_size > 0
    assert {p.name for p in tmp_path.iterdir()} == {"sevens.npy", "sevens.png", "three.gif", "three.mp4"}


def test_embedded_export_line_is_the_export_generate_caches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's command line for the embedded model asks the exporter for exactly what
    `starflow generate` exports on first use (export/cache.py); conftest's demo_export makes that
    export once per session, so the line itself is not run again (about 2 minutes)."""
    from starflow.export.cache import demo_artifacts

    class Asked(Exception):
        pass

    asked = []

    def export_onnx(checkpoint, out, options, **_):
        asked.append((Path(checkpoint).resolve(), options))
        raise Asked

    monkeypatch.setattr("starflow.export.onnx.export_onnx", export_onnx)
    monkeypatch.setenv("STARFLOW_CACHE", str(tmp_path))
    monkeypatch.chdir(ROOT)
    result = CliRunner().invoke(app, readme_command(EMBEDDED_EXPORT)[1:])
    assert isinstance(result.exception, Asked), result.output
    with pytest.raises(Asked):
        demo_artifacts()
    (readme_checkpoint, readme_options), (cache_checkpoint, cache_options) = asked
    assert readme_checkpoint == cache_checkpoint
    assert replace(readme_options, force=True) == cache_options
    assert "fast" in readme_options.sampling_presets and readme_options.denoise


def test_serving_requests_are_answered(demo_export: Path, demo_video_export: Path) -> None:
    """The README's curl requests, sent to the app `starflow serve` runs, here in process over the
    session's embedded exports (tests/serving/ sends them through Ray Serve)."""
    from starlette.testclient import TestClient

    from starflow.runtime import Generator
    from starflow.serving.api import LocalClient, create_app
    from starflow.serving.worker import ModelWorker

    workers = {name: ModelWorker(name, Generator.load(path, threads=1))
               for name, path in (("digits", demo_export), ("digits-video", demo_video_export))}  # fmt: skip
    client = TestClient(create_app({name: LocalClient(worker) for name, worker in workers.items()}))
    curls = [args for args in shell_commands() if shlex.join(args).startswith(CURL)]
    assert len(curls) >= 3
    for args in curls:
        path = args[2].removeprefix("http://127.0.0.1:8000")
        body = args[args.index("-d") + 1] if "-d" in args else None
        response = client.get(path) if body is None else client.post(path, content=body)
        assert response.status_code == 200, (shlex.join(args), response.text)
