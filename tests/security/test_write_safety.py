"""Writes that never clobber (issue 29): the one atomic writer, its targets, its partials.

A target must be absent or a regular file (a symlink or a special file is refused, not replaced);
temporary names are unique (threads saving to one path never collide); a folder of outputs
appears whole or not at all; a partial left by a killed process is removed by the next run, and
a live writer's partial never is.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from starflow.cli.main import app
from starflow.core import outputs
from starflow.core.errors import StarflowError
from tests.security.test_untrusted_inputs import one_line_error

runner = CliRunner()
IMAGES = np.linspace(0, 1, 4 * 8 * 8).reshape(4, 8, 8, 1).astype(np.float32)


def special_targets(tmp_path: Path, suffix: str = ".png") -> dict[str, Path]:
    """A symlink to a file that must survive, and a FIFO (a special file any user can make; a
    device such as /dev/full is one too, but only root can make those)."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    link, fifo = tmp_path / f"link{suffix}", tmp_path / f"fifo{suffix}"
    link.symlink_to(victim)
    os.mkfifo(fifo)
    return {"a symbolic link": link, "a device or other special file": fifo}


WRITES = {
    "save_png": lambda t: outputs.save_png(t, IMAGES, columns=2),
    "save_text": lambda t: outputs.save_text(t, "{}"),
    "save_images": lambda t: outputs.save_images(t, IMAGES, columns=2),
    "write_video": lambda t: outputs.write_video(np.zeros((1, 2, 4, 4, 1), np.uint8), t, fps=8),
}


@pytest.mark.parametrize("write", WRITES)
def test_a_symlink_or_special_file_target_is_refused(tmp_path: Path, write: str) -> None:
    for kind, target in special_targets(tmp_path, ".npy" if write == "write_video" else ".png").items():
        with pytest.raises(StarflowError, match=f"{target}: is {kind}; expected a new name or a regular"):
            WRITES[write](target)
        assert os.path.islink(target) == ("link" in kind) and os.path.lexists(target)
    assert (tmp_path / "victim.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial left


@pytest.mark.parametrize(
    "flag, args",
    [("out", ["generate", "--prompt", "3", "--num-images", "64", "--out"]), ("json", ["bench", "--json"])],
)
def test_a_symlink_output_is_refused_before_any_work(demo_export: Path, tmp_path: Path, flag, args) -> None:
    """`--out /dev/stdout` or `--json /dev/stdout` is a symlink too: the rename would replace it."""
    link = special_targets(tmp_path)["a symbolic link"]
    began = time.perf_counter()
    result = runner.invoke(app, [*args, str(link)])
    one_line_error(result, f"{flag} {link}: is a symbolic link")
    assert time.perf_counter() - began < 5 and (tmp_path / "victim.txt").read_text() == "keep me"


def test_a_folder_reached_through_a_link_is_written_into(tmp_path: Path) -> None:
    """Only the target itself must not be a link: `--out results/` may be a link to a bigger disk."""
    (tmp_path / "disk").mkdir()
    link = tmp_path / "results"
    link.symlink_to(tmp_path / "disk")
    outputs.save_png(link / "grid.png", IMAGES, columns=2)
    outputs.save_images(link, IMAGES, columns=2)
    assert link.is_symlink() and len(list((tmp_path / "disk").iterdir())) == 5


def in_threads(write, n: int) -> list[Exception]:
    """Run `write` in `n` threads released at once; the errors they raised."""
    start, errors = threading.Barrier(n), []

    def run() -> None:
        start.wait()
        try:
            write()
        except Exception as err:  # collected for the caller's assertion
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_threads_saving_to_one_file_never_collide(tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    assert in_threads(lambda: outputs.save_png(out, IMAGES, columns=2), 8) == []
    Image.open(out).load()  # one whole file, nothing else
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]


@pytest.mark.parametrize("kind", ["images", "frames"])
def test_two_writers_racing_to_create_one_folder_both_succeed(tmp_path: Path, monkeypatch, kind: str) -> None:
    """Both find no folder and both rename theirs into place at once: the second moves its files in."""
    out, rename, gate = tmp_path / kind, os.replace, threading.Barrier(2, timeout=10)

    def racing(src, dst, *args, **kwargs):
        if Path(dst) == out:
            gate.wait()  # both writers are here before either renames
        return rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", racing)
    clips = np.full((2, 3, 4, 4, 1), 200, np.uint8)
    if kind == "images":
        write = lambda: outputs.save_images(out, IMAGES, columns=2)  # noqa: E731
    else:
        write = lambda: outputs.write_video(clips, out, fps=8)  # noqa: E731
    assert in_threads(write, 2) == []
    assert [p.name for p in tmp_path.iterdir()] == [kind]
    for png in out.iterdir():
        Image.open(png).load()
    assert len(list(out.iterdir())) == (4 if kind == "images" else 6)


@pytest.mark.parametrize("existing", [False, True])
def test_a_full_disk_leaves_no_half_folder_of_pngs(tmp_path: Path, monkeypatch, existing: bool) -> None:
    """The disk fills up at the third PNG: the folder is not there (or holds what it held), as the
    message says."""
    out = tmp_path / "images"
    if existing:
        out.mkdir()
        (out / "0000-.png").write_bytes(b"an earlier run's image")
    saved = Image.Image.save
    calls = []

    def filling(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return saved(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", filling)
    with pytest.raises(StarflowError, match=f"out {out}.*: cannot write .*; nothing was written"):
        outputs.save_images(out, IMAGES, columns=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["images"] if existing else [])
    if existing:
        assert [p.name for p in out.iterdir()] == ["0000-.png"]
        assert (out / "0000-.png").read_bytes() == b"an earlier run's image"


WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from starflow.core.atomic import atomic_path
    from starflow.export.onnx import staging_directory

    out, killed = Path(sys.argv[1]), sys.argv[2] == "killed"
    if not killed:
        print("ready", flush=True)
        sys.stdin.readline()
    with staging_directory(out / "artifacts"), atomic_path(out / "grid.png"):
        print("staged", flush=True)
        os.kill(os.getpid(), signal.SIGKILL) if killed else sys.stdin.readline()
    """
)


def test_a_killed_writers_partials_go_and_a_live_ones_stay(tmp_path: Path) -> None:
    """An export's staging folder and an atomic write's temporary file, of a killed process and
    of a live one: the next export and the next write of that file remove the first two only."""
    from starflow.export.onnx import staging_directory

    def writer(mode: str) -> subprocess.Popen:
        args = [sys.executable, "-c", WRITER, str(tmp_path), mode]
        return subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    killed, live = writer("killed"), writer("live")  # both import torch at once
    try:
        assert killed.wait(timeout=120) == -signal.SIGKILL
        dead = {p.name for p in tmp_path.iterdir()}
        assert len(dead) == 2, dead
        assert live.stdout.readline() == "ready\n"
        live.stdin.write("go\n")
        live.stdin.flush()
        assert live.stdout.readline() == "staged\n"
        alive = {p.name for p in tmp_path.iterdir()} - dead
        assert len(alive) == 2, alive
        with staging_directory(tmp_path / "artifacts"):
            outputs.save_text(tmp_path / "grid.png", "")
            left = {p.name for p in tmp_path.iterdir()}
        assert left & dead == set() and alive <= left
    finally:
        live.kill()
        live.wait()


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def test_a_dead_writers_partial_beside_a_target_is_removed_by_the_next_write(tmp_path: Path) -> None:
    from starflow.core.atomic import PARTIAL, partial_prefix

    target = tmp_path / "report.txt"
    live = tmp_path / (partial_prefix(target) + "live0001")  # this process's: never removed
    dead = tmp_path / partial_prefix(target).replace(f"-{os.getpid()}-", f"-{dead_pid()}-")
    dead = dead.with_name(dead.name + "dead0001")
    for partial in (live, dead):
        assert PARTIAL.fullmatch(partial.name)
        partial.write_text("half")
    outputs.save_text(target, "whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, target.name])


def test_the_writability_probe_is_named_as_a_partial(tmp_path: Path, monkeypatch) -> None:
    """A probe left by a killed process is then removed by the next run like any partial (a bulk
    run's check that its folder is empty would otherwise fail on it)."""
    from starflow.core.atomic import PARTIAL

    made = []
    named_temporary_file = outputs.tempfile.NamedTemporaryFile

    def recording(*args, **kwargs):
        probe = named_temporary_file(*args, **kwargs)
        made.append(Path(probe.name).name)
        return probe

    monkeypatch.setattr(outputs.tempfile, "NamedTemporaryFile", recording)
    outputs.check_writable(tmp_path, "out")
    assert len(made) == 1 and PARTIAL.fullmatch(made[0]), made
