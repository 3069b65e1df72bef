"""No user-facing command ends in a Python traceback (issue 29): bad input through the real
`starflow` command, in a fresh process, ends in exit code 2 and one `error:` line naming what is
wrong. Counts, sizes and frame rates are refused before any work: the run's cache (where the
first use of the embedded models exports them) stays empty, and the refusal takes about as long
as the command's start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from starflow.core.bounded import MAX_DEPTH
from starflow.model.checkpoint import CONFIG_METADATA_KEY

STARFLOW = Path(sys.executable).with_name("starflow")  # the console script a user runs
HUGE = "100000000000"  # 1e11
DEEP = b"[" * 100_000 + b"]" * 100_000
TINY = dict(
    channel_size=1, img_size=8, patch_size=1, channels=32, layers_per_block=[1, 1], head_dim=32,
    rope=True, sos=True, txt_size=1, txt_dim=8, cond_top_only=True, use_softplus=True,
    use_final_norm=True, soft_clip=4.0, seq_order="L2R", noise_std=0.1,
)  # fmt: skip


def export_dir(name: str, manifest: bytes) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        directory = tmp / name
        directory.mkdir()
        (directory / "manifest.json").write_bytes(manifest)
        return directory

    return make


def file_of(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        (tmp / name).write_bytes(data)
        return tmp / name

    return make


def deep_checkpoint(tmp: Path) -> Path:
    path = tmp / "deep.safetensors"
    save_file({"w": torch.zeros(1)}, path, metadata={CONFIG_METADATA_KEY: DEEP.decode()})
    return path


def image_folder_with_a_broken_image(tmp: Path) -> Path:
    for label in ("a", "b"):
        (tmp / "data" / label).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp / "data" / label / "0.png")
    (tmp / "data" / "b" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (tmp / "tiny.yaml").write_text(yaml.safe_dump({"model": TINY}))
    return tmp / "data"


INF_PRESETS = json.dumps({"fast": {"jacobi": {"threshold": float("inf")}}}).encode()
# id -> (arguments, given the made path as {made} and the test's folder as {tmp}; what makes the
# path; a phrase of the one line). Issue 29's cases, then a sample of the first round's.
CASES: dict[str, tuple[list[str], Callable[[Path], Path] | None, str]] = {
    "num-images 1e11": (
        ["generate", "--prompt", "3", "--num-images", HUGE],
        None,
        "100000000000 images (their decoded pixels alone) needs about",
    ),
    "gif fps under 1/655.35": (
        ["generate", "--prompt", "up", "--frames", "4", "--fps", "0.001", "--out", "{tmp}/x.gif"],
        None,
        "fps: 0.001 frames per second; a .gif shows 0.001526 to 100",
    ),
    "gif fps over 100": (
        ["generate", "--prompt", "up", "--frames", "4", "--fps", "1000", "--out", "{tmp}/x.gif"],
        None,
        "fps: 1000 frames per second; a .gif shows",
    ),
    "mp4 fps over 1000": (
        ["generate", "--prompt", "up", "--frames", "4", "--fps", "1e9", "--out", "{tmp}/x.mp4"],
        None,
        "fps: 1e+09 frames per second; a .mp4 shows 0.001 to 1000",
    ),
    "demo per-digit 1e11": (
        ["demo", "--per-digit", HUGE, "--no-pytorch", "--no-video", "--out", "{tmp}/d.png"],
        None,
        "1000000000000 images (their decoded pixels alone) needs about",
    ),
    "bench batch 1e11": (
        ["bench", "--batch", HUGE, "--threads", "1"],
        None,
        "a batch of 100000000000 images",
    ),
    "bench throughput batch 1e11": (
        ["bench", "--throughput-batch", HUGE, "--threads", "1"],
        None,
        "a batch of 100000000000 images",
    ),
    "bench clips of 1e11 frames": (
        ["bench", "--preset", "bench-video", "--frames", HUGE, "--threads", "1"],
        None,
        "of 100000000000 frames",
    ),
    "bench quality per-digit 1e11": (["bench", "--quality", "--per-digit", HUGE], None, "needs about"),
    "deeply nested manifest": (
        ["inspect", "{made}"],
        export_dir("deep", DEEP),
        f"manifest.json: line 1: nested more than {MAX_DEPTH} deep",
    ),
    "5000-digit manifest number": (
        ["inspect", "{made}"],
        export_dir("digits", b'{"schema_version": 1' + b"0" * 5000 + b"}"),
        "a number of 5001 digits",
    ),
    "non-UTF-8 manifest in a non-UTF-8 path": (
        ["inspect", "{made}"],
        export_dir("bad\udcffdir", b'{"a": "\xff"}'),
        "manifest.json: not UTF-8 text (byte 0xff at offset 7)",
    ),
    "NaN in a manifest": (
        ["inspect", "{made}"],
        export_dir("nan", b'{"a": NaN}'),
        "at a: nan is not a finite",
    ),
    "deeply nested YAML config": (
        ["train", "--config", "{made}", "--steps", "1"],
        file_of("deep.yaml", b"model: " + DEEP),
        "line 1: nested more than 64 deep",
    ),
    "deeply nested checkpoint config": (
        ["generate", "--engine", "pytorch", "--prompt", "3", "--checkpoint", "{made}"],
        deep_checkpoint,
        "embedded config: line 1: nested more than 64 deep",
    ),
    "infinite threshold in presets": (
        [
            "export",
            "onnx",
            "--config",
            "tiny-t2i",
            "--checkpoint",
            "{made}",
            "--sampling-presets",
            "{tmp}/p.json",
            "--out",
            "{tmp}/export",
        ],
        lambda tmp: (file_of("p.json", INF_PRESETS)(tmp), file_of("c.safetensors", b"")(tmp))[1],
        "p.json: at fast/jacobi/threshold: inf is not a finite number",
    ),
    "a corrupt training image": (
        ["train", "--config", "{tmp}/tiny.yaml", "--data", "{made}", "--out", "{tmp}/run", "--steps", "1"],
        image_folder_with_a_broken_image,
        "data/b/1.png: not a readable image",
    ),
    "non-UTF-8 prompts file": (
        ["generate", "--prompts-file", "{made}", "--out", "{tmp}/shards"],
        file_of("prompts.txt", b"1\n\xff\n"),
        "line 2: not UTF-8 text",
    ),
    # the first round's
    "output in a missing folder": (
        ["generate", "--prompt", "3", "--out", "{tmp}/missing/x.png"],
        None,
        "directory {tmp}/missing does not exist",
    ),
    "NaN threshold": (["generate", "--prompt", "3", "--jacobi-threshold", "nan"], None, "jacobi_threshold"),
    "negative seed": (["generate", "--prompt", "3", "--seed", "-1"], None, "seed"),
    "zero threads": (["bench", "--threads", "0"], None, "threads"),
    "a missing export": (["inspect", "{tmp}/nowhere"], None, "not a starflow export directory"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_ends_in_one_line_without_a_traceback(tmp_path, case):
    args, make, phrase = CASES[case]
    made = str(make(tmp_path)) if make else ""
    cache = tmp_path / "cache"
    env = {**os.environ, "STARFLOW_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    command = [str(STARFLOW), *(a.replace("{made}", made).replace("{tmp}", str(tmp_path)) for a in args)]
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, env=env, cwd=tmp_path, check=False, timeout=120)
    seconds = time.perf_counter() - began
    out = (done.stdout + done.stderr).decode("utf-8", "backslashreplace")
    assert "Traceback" not in out, out
    assert done.returncode == 2, out
    assert out.startswith("error: ") and out.count("\n") == 1, out
    assert phrase.replace("{tmp}", str(tmp_path)) in out.replace("\\udcff", "\udcff"), out
    assert not cache.exists() or not any(cache.iterdir()), (
        f"work done before the refusal: {list(cache.iterdir())}"
    )
    assert seconds < 30, f"{seconds:.1f} s to refuse"
