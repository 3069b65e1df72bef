"""Bulk generation (`starflow generate --prompts-file`): the same files in this process and over
two Ray nodes, killed halfway and resumed; resumes skip done shards; other parameters and bad
prompts files are refused before any work."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner, Result

from starflow.cli.main import app
from starflow.core.request import request
from starflow.serving.worker import ModelWorker

PROMPTS = 200
SHARD = 8
SHARDS = -(-PROMPTS // SHARD)


def generate(*args: object) -> Result:
    return CliRunner().invoke(app, ["generate", *map(str, args)])


def files(folder: Path) -> dict[str, bytes]:
    """Every file of a run's folder (the lock aside) by its relative path."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".bulk.lock"
    }


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bulk") / "prompts.txt"
    path.write_text("".join(f"{i * 3 % 10}\n" for i in range(PROMPTS)))
    return path


@pytest.fixture(scope="module")
def single_process(tmp_path_factory: pytest.TempPathFactory, prompts_file: Path, demo_export: Path) -> Path:
    """The 200 prompts in this process (PNG shards of 8)."""
    out = tmp_path_factory.mktemp("single") / "out"
    result = generate("--prompts-file", prompts_file, "--out", out, "--artifacts", demo_export,
                      "--threads", 1, "--shard-size", SHARD)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"(0 done before, {SHARDS} generated now in this process" in result.stdout
    return out


def test_two_ray_nodes_killed_halfway_and_resumed_give_the_single_process_files(
    ray_cluster, single_process: Path, prompts_file: Path, demo_export: Path, tmp_path: Path
) -> None:
    """The run is killed (SIGKILL, by PID) once about half the shards are done, then run again:
    the rerun makes only the others, both nodes made shards, and every file (each PNG, the
    markers, the index) equals the single-process run's byte for byte, present once."""
    out = tmp_path / "out"
    command = [sys.executable, "-c", "from starflow.cli.main import app; app()", "generate",
               "--prompts-file", str(prompts_file), "--out", str(out), "--artifacts", str(demo_export),
               "--threads", "1", "--shard-size", str(SHARD), "--ray", ray_cluster.address]  # fmt: skip
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while len(list(out.glob("*.done"))) < SHARDS // 2 and first.poll() is None:
            assert time.monotonic() < deadline, "no shard done in 300 s"
            time.sleep(0.02)
        first.kill()
        _, first_log = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    done = len(list(out.glob("*.done")))
    assert 0 < done < SHARDS, f"{done} of {SHARDS} shards done when killed; {first_log[-2000:]}"
    assert not (out / "index.jsonl").exists()

    began = time.perf_counter()
    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    print(f"killed with {done} of {SHARDS} shards done; the rerun took {time.perf_counter() - began:.1f} s")
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"({done} done before, {SHARDS - done} generated now on Ray" in second.stdout, second.stdout
    nodes = set(re.findall(r"\(node (\w+)\)", first_log + second.stderr))
    assert len(nodes) == 2, nodes
    made, expected = files(out), files(single_process)
    assert sum(name.endswith(".png") for name in made) == PROMPTS
    assert made.keys() == expected.keys()
    assert [name for name in made if made[name] != expected[name]] == []


@pytest.fixture(scope="module")
def npy_run(tmp_path_factory: pytest.TempPathFactory, demo_export: Path) -> tuple[Path, Path]:
    """20 prompts as .npy shards of 8 (3 shards), seeds from 7: (prompts file, out)."""
    folder = tmp_path_factory.mktemp("npy")
    prompts = folder / "prompts.txt"
    prompts.write_text("".join(f"{i % 10}\n" for i in range(20)))
    out = folder / "out"
    result = generate(*npy_args(prompts, out, demo_export))
    assert result.exit_code == 0, result.output
    return prompts, out


def npy_args(prompts: Path, out: Path, artifacts: Path, shard_size: int = 8) -> list[object]:
    return ["--prompts-file", prompts, "--out", out, "--artifacts", artifacts, "--threads", 1,
            "--seed", 7, "--format", "npy", "--shard-size", shard_size]  # fmt: skip


def test_resume_skips_done_shards(npy_run: tuple[Path, Path], demo_export: Path) -> None:
    """A shard without its marker (its .npy half-written, a stale temporary file beside it) is
    made again and alone; a complete folder is left as it is."""
    prompts, out = npy_run
    kept = files(out)
    (out / "shard-00001.done").unlink()
    (out / "shard-00001.npy").write_bytes(b"half")
    dies_writing = "import os, sys, starflow.core.atomic as a\nwith a.atomic_file(sys.argv[1]): os._exit(0)"
    subprocess.run([sys.executable, "-c", dies_writing, str(out / "shard-00002.npy")], check=True)
    assert list(out.glob(".shard-00002.npy.partial-*"))  # of a process that died writing shard 2
    result = generate(*npy_args(prompts, out, demo_export))
    assert result.exit_code == 0, result.output
    assert "(2 done before, 1 generated now in this process" in result.stdout
    assert result.output.count("images written") == 1
    assert files(out) == kept
    result = generate(*npy_args(prompts, out, demo_export))
    assert "(3 done before, 0 generated now in this process: nothing left to do)" in result.stdout
    assert files(out) == kept


def test_an_image_depends_on_its_prompt_and_seed_alone(npy_run: tuple[Path, Path], demo_export: Path) -> None:
    """Other shard sizes give the same images, and so does each prompt generated alone from seed
    7 + its index (the per-row stop test: within float rounding of a different batch)."""
    prompts, out = npy_run
    images = np.concatenate([np.load(out / f"shard-{n:05d}.npy") for n in range(3)])
    assert images.shape == (20, 8, 8, 1) and images.dtype == np.float32
    other = out.parent / "threes"
    result = generate(*npy_args(prompts, other, demo_export, shard_size=3))
    assert result.exit_code == 0, result.output
    regrouped = np.concatenate([np.load(other / f"shard-{n:05d}.npy") for n in range(7)])
    np.testing.assert_allclose(regrouped, images, atol=1e-5)
    worker = ModelWorker.load("digits", demo_export, threads=1)
    for i in (0, 13, 19):
        (alone,) = worker.run([request(prompts=[str(i % 10)], seed=7 + i)])
        np.testing.assert_allclose(alone.images[0], images[i], atol=1e-5)


def test_a_rerun_with_other_parameters_is_refused(npy_run: tuple[Path, Path], demo_export: Path) -> None:
    prompts, out = npy_run
    kept = files(out)
    result = generate(*npy_args(prompts, out, demo_export), "--seed", 8, "--guidance", 2)
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"error: out {out}: holds a bulk run with other parameters (seed 7 there, 8 now; guidance None "
        "there, 2.0 now); rerun with those or give another folder"
    )
    other = prompts.parent / "other.txt"
    other.write_text(prompts.read_text().replace("3", "4"))
    result = generate(*npy_args(other, out, demo_export))
    assert result.exit_code == 2 and "prompts_sha256" in result.output, result.output
    assert files(out) == kept


BAD_FILES = {  # name: (content, expected message after "prompts-file PATH")
    "empty": (b"", ": holds no prompts (one per line)"),
    "blank line": (b"1\n\n2\n", " line 2: blank; this text model takes a prompt on every line"),
    "unknown prompt": (b"1\n2\ncat\n", " line 3: 'cat'; this model knows the prompts ['0', '1', '2'"),
    "too long": (b"1\n2\n" + b"7" * 2001 + b"\n", " line 3: 2001 characters; a prompt has at most 2000"),
    "not utf-8": (b"1\n\xff\xfe\n", " line 2: not UTF-8 text"),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_a_bad_prompts_file_is_one_line_naming_it(name: str, tmp_path: Path, demo_export: Path) -> None:
    content, message = BAD_FILES[name]
    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    result = generate("--prompts-file", path, "--out", tmp_path / "out", "--artifacts", demo_export)
    assert result.exit_code == 2
    line = result.output.strip()
    assert "\n" not in line and line.startswith(f"error: prompts-file {path}{message}"), line
    assert not (tmp_path / "out").exists()


def test_bad_bulk_options_are_refused_before_any_work(tmp_path: Path, prompts_file: Path) -> None:
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    o, missing = tmp_path / "o", tmp_path / "none.txt"
    bulk = ("--prompts-file", prompts_file, "--out", o)
    cases = [
        (("--prompts-file", missing, "--out", o), f"prompts-file {missing}: no such file"),
        (("--ray", "local", "--out", o), "ray: an option of bulk generation; give --prompts-file FILE too"),
        ((*bulk, "--prompt", "3"), "prompt: give --prompt or --prompts-file, not both"),
        (("--prompts-file", prompts_file), "out: give the folder the shards go to (--out DIR)"),
        ((*bulk, "--format", "gif"), "format: 'gif'; images are written as png or npy"),
        ((*bulk, "--engine", "pytorch"),
         "engine: pytorch; bulk generation runs an export (the runtime engine)"),
        ((*bulk, "--ray", "127.0.0.1"), "ray: '127.0.0.1'; expected local, auto, HOST:PORT or ray://HOST:PORT"),
        (("--prompts-file", prompts_file, "--out", full),
         f"out {full}: not empty and holds no bulk.json; give a new or empty folder"),
    ]  # fmt: skip
    for args, message in cases:
        result = generate(*args)
        assert (result.exit_code, result.output.strip()) == (2, f"error: {message}"), args
    assert not o.exists()
