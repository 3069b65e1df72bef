"""libstarflow and starflow-run against hostile and careless input (issue #29), on the release and
the ASan+UBSan builds (`make cpp`, `make cpp-asan`; STARFLOW_CPP_BUILD / STARFLOW_CPP_ASAN_BUILD).

One table of broken exports is fed to both loaders, the Python one (`starflow.runtime.Pipeline`)
and libstarflow (through `starflow-run`), and both must refuse each with the same meaning: JSON
past the bounded reader's limits (depth, number digits, int64 and float32 ranges, string length),
files that are not regular files (a FIFO never hangs a load), blocks naming each other's graphs.
Then starflow-run's own rules: token ids in range and masks 0/1, strict integer and number
options, non-finite samples refused (--check-finite, on by default) and never drawn as PNG pixels,
every output path checked before any work, and the writer's rules (no symlink or device target,
stale partials of dead processes removed, a folder of PNGs whole or nothing on a full disk).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import json
import os
import stat
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from starflow.contract.manifest import MANIFEST_NAME, RECORD_NAME
from starflow.core.atomic import host_tag
from starflow.core.errors import StarflowError
from starflow.runtime import Generator, Pipeline
from tests.runtime.cpp.test_libstarflow import ASAN_BUILD, BUILD, built
from tests.security.test_write_safety import dead_pid

BUILDS = pytest.mark.parametrize("build", [BUILD, ASAN_BUILD], ids=["release", "asan-ubsan"])
DEEP = 100_000  # far past the depth limit (64): deep enough to overflow a recursive reader's stack


def starflow_run(build: Path, *args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """`starflow-run` of `build`; a hang ends the test as a failure after `timeout` seconds."""
    command = [str(built(build) / "starflow-run"), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, phrase: str) -> None:
    """Exit 1 with one line on stderr holding `phrase`, and no sanitizer report."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert result.stderr.startswith("starflow-run: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert phrase in result.stderr, result.stderr
    assert "Sanitizer" not in result.stderr and "runtime error" not in result.stderr


# ---- one table, both loaders ----------------------------------------------------------------------------
def _rewrite(directory: Path, edit: Callable[[str], str], name: str = MANIFEST_NAME) -> None:
    """`edit` manifest.json's (or record.json's) text; record.json's digest follows manifest.json's
    bytes, so only the edit itself is what a loader can refuse."""
    (directory / name).write_text(edit((directory / name).read_text()))
    if name == MANIFEST_NAME:
        digest = hashlib.sha256((directory / MANIFEST_NAME).read_bytes()).hexdigest()
        record = json.loads((directory / RECORD_NAME).read_text())
        (directory / RECORD_NAME).write_text(json.dumps({**record, "manifest_sha256": digest}))


def _edit_fields(directory: Path, edit: Callable[[dict], None]) -> None:
    def rewrite(text: str) -> str:
        data = json.loads(text)
        edit(data)
        return json.dumps(data, indent=2)

    _rewrite(directory, rewrite)


def _fifo(directory: Path, name: str) -> None:
    (directory / name).unlink()
    os.mkfifo(directory / name)


def _swap_block_graphs(data: dict) -> None:
    first, second = data["blocks"][1], data["blocks"][2]
    first["graphs"], second["graphs"] = second["graphs"], first["graphs"]


def _graph_file(directory: Path) -> str:
    return json.loads((directory / MANIFEST_NAME).read_text())["graphs"][0]["file"]


@dataclasses.dataclass(frozen=True)
class LoaderCase:
    """A broken copy of the demo export and the phrase each loader's one-line error must hold."""

    name: str
    python: str
    cpp: str
    make: Callable[[Path], None]


DEEP_VALUE = "[" * DEEP + "]" * DEEP
LOADER_CASES = [
    LoaderCase(
        "deeply-nested-manifest",
        "nested more than 64 deep",
        "nested more than 64 deep",
        lambda d: _rewrite(d, lambda t: t.replace('"model": {', f'"model": {{"deep": {DEEP_VALUE}, ', 1)),
    ),
    LoaderCase(
        "deeply-nested-record",
        "nested more than 64 deep",
        "nested more than 64 deep",
        lambda d: _rewrite(d, lambda t: t.rstrip()[:-1] + f', "deep": {DEEP_VALUE}}}', RECORD_NAME),
    ),
    LoaderCase(
        "5000-digit-number",
        "a number of 5000 digits (at most 32)",
        "a number of 5000 digits (at most 32)",
        lambda d: _rewrite(d, lambda t: t.replace('"noise_std": 0.1', '"noise_std": ' + "9" * 5000, 1)),
    ),
    LoaderCase(
        "integer-outside-int64",
        "is an integer outside int64",
        "is an integer outside int64",
        lambda d: _edit_fields(d, lambda data: data["dims"]["batch"].update(max=2**63)),
    ),
    LoaderCase(
        "number-past-float32",
        "is not a finite number within float32's range",
        "is not a finite number within float32's range",
        lambda d: _edit_fields(d, lambda data: data["jacobi"].update(threshold=1e39)),
    ),
    LoaderCase(
        "70000-character-string",
        "a string of 70000 characters (at most 65536)",
        "a string of 70000 characters (at most 65536)",
        lambda d: _edit_fields(d, lambda data: data["producer"].update(version="9" * 70000)),
    ),
    LoaderCase(
        "fifo-as-manifest",
        "not a starflow export directory",
        "not a starflow export directory",
        lambda d: _fifo(d, MANIFEST_NAME),
    ),
    LoaderCase(
        "fifo-as-record", "record.json beside it", "record.json beside it", lambda d: _fifo(d, RECORD_NAME)
    ),
    LoaderCase(
        "fifo-as-graph",
        "is not a regular file",
        "a device or other special file, not a regular file",
        lambda d: _fifo(d, _graph_file(d)),
    ),
    LoaderCase(
        "blocks-name-each-others-graphs",
        "block 2 names graph block1.step.fp32 of another block",  # the first kind in each one's order
        "block 2 names graph block1.forward.fp32 of another block",
        lambda d: _edit_fields(d, _swap_block_graphs),
    ),
]


@pytest.fixture(scope="module")
def broken_exports(demo_export: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import shutil

    root = tmp_path_factory.mktemp("broken-exports")
    exports = {}
    for case in LOADER_CASES:
        exports[case.name] = root / case.name
        shutil.copytree(demo_export, exports[case.name])
        case.make(exports[case.name])
    return exports


@pytest.mark.parametrize("loader", ["python", "release", "asan-ubsan"])
@pytest.mark.parametrize("case", LOADER_CASES, ids=[c.name for c in LOADER_CASES])
def test_both_loaders_refuse_the_same_broken_exports(broken_exports, tmp_path, case, loader):
    directory = broken_exports[case.name]
    if loader == "python":
        with pytest.raises(StarflowError, match=None) as refused:
            Pipeline.load(directory, threads=1)
        assert case.python in str(refused.value) and "\n" not in str(refused.value), str(refused.value)
        return
    build = BUILD if loader == "release" else ASAN_BUILD
    args = ["--tokenize", "--artifacts", directory, "--prompt", "3", "--out", tmp_path / "ids.npy"]
    assert_one_line_error(starflow_run(build, *args, timeout=30), case.cpp)
    assert not (tmp_path / "ids.npy").exists()


@pytest.fixture(scope="module")
def digit_inputs(demo_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model's inputs for latent mode, made once: noise.npy, the prompt "3"'s ids.npy,
    mask.npy and embeddings y.npy, and the empty prompt's y0.npy."""
    folder = tmp_path_factory.mktemp("digit-inputs")
    generator = Generator.load(demo_export, threads=1)
    ids, mask = generator.text.tokenize(["3"])
    arrays = {"ids": ids, "mask": mask, "y": generator.encode(["3"]), "y0": generator.encode([""])}
    for name, array in {**arrays, "noise": np.zeros((1, 1, 8, 8), np.float32)}.items():
        np.save(folder / f"{name}.npy", array)
    return folder


# ---- token ids and masks -----------------------------------------------------------------------------------
@BUILDS
@pytest.mark.parametrize(
    ("array", "index", "value", "phrase"),
    [
        ("ids", 0, -1, "input_ids: -1 at (0, 0) is outside this text encoder's vocabulary [0, "),
        ("ids", 0, 10**6, "input_ids: 1000000 at (0, 0) is outside this text encoder's vocabulary [0, "),
        ("mask", 0, 2, "attention_mask: 2 at (0, 0) is not 0 or 1"),
        ("mask", 0, -1, "attention_mask: -1 at (0, 0) is not 0 or 1"),
    ],
)
def test_token_ids_outside_the_vocabulary_and_masks_not_0_or_1_are_refused(
    demo_export, digit_inputs, tmp_path, build, array, index, value, phrase
):
    """A negative id would pick another class's embedding (ONNX Gather wraps it): refused, as an
    id past the vocabulary and a mask value other than 0 or 1, before any graph runs."""
    for name in ("ids", "mask"):
        loaded = np.load(digit_inputs / f"{name}.npy")
        if name == array:
            loaded.flat[index] = value
        np.save(tmp_path / f"{name}.npy", loaded)
    args = ["--artifacts", demo_export, "--noise", digit_inputs / "noise.npy", "--guidance", "0"]
    args += ["--token-ids", tmp_path / "ids.npy", "--attention-mask", tmp_path / "mask.npy", "--threads", "1"]
    assert_one_line_error(starflow_run(build, *args, "--out", tmp_path / "out.npy"), phrase)
    assert not (tmp_path / "out.npy").exists()


@BUILDS
@pytest.mark.parametrize("bad_id", [2**63 - 1, 2**31, -1])
def test_a_tokenizer_id_outside_int32_is_refused_naming_the_token(demo_export, tmp_path, build, bad_id):
    """tokenizer.json's ids size the vocabulary (the largest id + 1): an id of 2**63 - 1 would overflow
    that sum (UBSan's report, or a vocabulary of nothing), a negative one means nothing; refused."""
    import shutil

    export = tmp_path / "export"
    shutil.copytree(demo_export, export)
    tokenizer = json.loads((export / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"]["3"] = bad_id
    (export / "tokenizer.json").write_text(json.dumps(tokenizer))
    data = (export / "tokenizer.json").read_bytes()
    _edit_fields(
        export,
        lambda manifest: manifest["files"][0].update(
            sha256=hashlib.sha256(data).hexdigest(), bytes=len(data)
        ),
    )
    args = ["--tokenize", "--artifacts", export, "--prompt", "3", "--out", tmp_path / "ids.npy"]
    result = starflow_run(build, *args, timeout=30)
    assert_one_line_error(
        result, f"tokenizer.json: token '3' has id {bad_id}; expected an id from 0 to 2147483647"
    )
    assert not (tmp_path / "ids.npy").exists()


# ---- strict options, checked before the export is read --------------------------------------------------
@pytest.mark.parametrize(
    ("flag", "value", "phrase"),
    [
        ("--block-size", "+3", "--block-size: expected an integer from 1 to 1048576, got '+3'"),
        ("--block-size", " 3", "--block-size: expected an integer from 1 to 1048576"),
        ("--block-size", "1048577", "--block-size: expected an integer from 1 to 1048576"),
        ("--max-iter", "2147483648", "--max-iter: expected an integer from 1 to 1048576"),
        ("--max-iter", "4294967297", "--max-iter: expected an integer from 1 to 1048576"),
        ("--threads", "5000", "--threads: expected an integer from 1 to 1024, got '5000'"),
        ("--num-images", "2000000000", "--num-images: expected an integer from 1 to 1048576"),
        ("--frames", "3.0", "--frames: expected an integer from 1 to 65536"),
        ("--shallow-jacobi", "8,+2,0.1", "--shallow-jacobi max_iter: expected an integer from 1 to 1048576"),
        ("--guidance", "1e39", "--guidance: expected a finite number within float32's range"),
        ("--guidance", "inf", "--guidance: expected a finite number within float32's range"),
        ("--guidance", "0x10", "--guidance: expected a finite number within float32's range"),
        ("--threshold", "1e39", "--threshold: expected a finite number within float32's range"),
        ("--shallow-jacobi", "8,2,nan", "--shallow-jacobi threshold: expected a finite number"),
    ],
)
def test_integer_and_number_options_are_parsed_strictly_before_any_work(tmp_path, flag, value, phrase):
    """No option is wrapped, truncated, clamped or read leniently: each is refused naming the flag
    and its range before the export is read (the artifacts folder here does not exist)."""
    args = ["--artifacts", tmp_path / "no-export", "--prompt", "3", "--out", tmp_path / "x.npy", flag, value]
    result = starflow_run(BUILD, *args)
    assert_one_line_error(result, phrase)
    assert "manifest" not in result.stderr


# ---- non-finite samples -----------------------------------------------------------------------------------
@BUILDS
def test_guidance_that_overflows_float32_arithmetic_fails_instead_of_writing_nan(
    demo_export, digit_inputs, tmp_path, build
):
    """1e38 is finite in float32, but the guide's (1 + w) * mu is not: the latents are all NaN.
    --check-finite (the default, as `starflow generate`'s) refuses them and writes nothing;
    --no-check-finite keeps them."""
    inputs = digit_inputs
    args = ["--artifacts", demo_export, "--noise", inputs / "noise.npy", "--text", inputs / "y.npy"]
    args += ["--text-uncond", inputs / "y0.npy", "--guidance", "1e38", "--threads", "1", "--max-iter", "2"]
    result = starflow_run(build, *args, "--out", tmp_path / "out.npy")
    assert_one_line_error(result, "the sampled latents or images contain NaN or inf")
    assert not (tmp_path / "out.npy").exists()
    kept = starflow_run(build, *args, "--no-check-finite", "--out", tmp_path / "kept.npy")
    assert kept.returncode == 0, kept.stderr
    assert not np.isfinite(np.load(tmp_path / "kept.npy")).any()


@BUILDS
def test_png_writer_refuses_non_finite_pixels(demo_export, tmp_path, build):
    """NaN has no pixel value (casting it to a byte is undefined): a .png refuses it, a .npy keeps it."""
    args = ["--artifacts", demo_export, "--prompt", "3", "--guidance", "1e38", "--max-iter", "2"]
    args += ["--no-denoise", "--no-check-finite"]
    result = starflow_run(build, *args, "--threads", "1", "--out", tmp_path / "grid.png")
    assert_one_line_error(result, "pixel values that are NaN or inf, which a PNG cannot hold")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    kept = starflow_run(build, *args, "--threads", "1", "--out", tmp_path / "images.npy")
    assert kept.returncode == 0, kept.stderr


# ---- outputs checked before any work ---------------------------------------------------------------------
def _special_files(tmp_path: Path) -> None:
    (tmp_path / "victim.npy").write_bytes(b"keep")
    (tmp_path / "link.npy").symlink_to(tmp_path / "victim.npy")
    os.mkfifo(tmp_path / "fifo.npy")


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (
            ("--noise", "n.npy", "--out", "missing/x.npy"),
            "--out {tmp}/missing/x.npy: directory {tmp}/missing does not exist",
        ),
        (
            ("--noise", "n.npy", "--out", "x.npy", "--stats", "missing/s.json"),
            "--stats {tmp}/missing/s.json: directory",
        ),
        (
            ("--prompt", "3", "--out", "x.npy", "--latents-out", "missing/l.npy"),
            "--latents-out {tmp}/missing/l.npy: directory",
        ),
        (
            ("--tokenize", "--prompt", "3", "--out", "x.npy", "--mask-out", "missing/m.npy"),
            "--mask-out {tmp}/missing/m.npy",
        ),
        (("--likelihood-latents", "n.npy", "--out", "missing/b.npy"), "--out {tmp}/missing/b.npy: directory"),
        (
            ("--noise", "n.npy", "--out", "link.npy"),
            "--out {tmp}/link.npy: is a symbolic link; expected a new name or a regular file",
        ),
        (
            ("--noise", "n.npy", "--out", "fifo.npy"),
            "--out {tmp}/fifo.npy: is a device or other special file; expected a new name or a regular file",
        ),
        (
            ("--prompt", "3", "--out", "grid.png", "--stats", "link.npy"),
            "--stats {tmp}/link.npy: is a symbolic link",
        ),
    ],
)
def test_every_output_path_is_checked_before_the_export_is_read(tmp_path, args, phrase):
    _special_files(tmp_path)
    np.save(tmp_path / "n.npy", np.zeros((1, 1, 8, 8), np.float32))
    paths = [str(tmp_path / a) if a.endswith((".npy", ".json", ".png")) else a for a in args]
    result = starflow_run(BUILD, "--artifacts", tmp_path / "no-export", *paths)
    assert_one_line_error(result, phrase.format(tmp=tmp_path))
    assert "manifest" not in result.stderr
    assert (tmp_path / "victim.npy").read_bytes() == b"keep"


# ---- the writer -------------------------------------------------------------------------------------------
def _libstarflow() -> ctypes.CDLL:
    """The release build's library, declaring the C calls these tests make."""
    library, p = ctypes.CDLL(str(built(BUILD) / "libstarflow.so")), ctypes.c_void_p
    for name, args in {
        "sf_tensor_create": [ctypes.c_int, ctypes.POINTER(ctypes.c_int64), ctypes.c_size_t, p],
        "sf_tensor_data": [p],
        "sf_tensor_save_npy": [p, ctypes.c_char_p],
        "sf_output_stage_folder": [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t],
        "sf_output_place_folder": [ctypes.c_char_p, ctypes.c_char_p],
    }.items():
        getattr(library, name).restype, getattr(library, name).argtypes = p, args
    library.sf_tensor_free.argtypes = [p]
    library.sf_status_message.restype, library.sf_status_message.argtypes = ctypes.c_char_p, [p]
    return library


@BUILDS
def test_a_special_file_at_the_target_is_refused_not_replaced(demo_export, tmp_path, build):
    """A rename replaces whatever is at the name: a symbolic link or a device there is refused
    (never a device outside the test's folder: a device node made here, when root)."""
    _special_files(tmp_path)
    targets = ["link.npy", "fifo.npy"]
    if os.geteuid() == 0:
        os.mknod(tmp_path / "full.npy", 0o600 | stat.S_IFCHR, os.makedev(1, 7))  # a /dev/full
        targets.append("full.npy")
    args = ["--artifacts", demo_export, "--prompt", "3", "--threads", "1", "--seed", "1"]
    for target in targets:
        kind = "a symbolic link" if target == "link.npy" else "a device or other special file"
        assert_one_line_error(starflow_run(build, *args, "--out", tmp_path / target), f"is {kind}")
    assert (tmp_path / "victim.npy").read_bytes() == b"keep"
    assert stat.S_ISFIFO(os.lstat(tmp_path / "fifo.npy").st_mode)
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_stale_partials_of_dead_processes_are_removed_live_ones_kept(demo_export, tmp_path):
    """A killed run leaves `.NAME.partial-PID-HOST-RANDOM`; the next write of NAME removes it when
    PID is gone (on this host), and keeps a live process's (named as the Python writer names them)."""
    host = host_tag()
    dead = tmp_path / f".x.npy.partial-{dead_pid()}-{host}-deadbeef"
    live = tmp_path / f".x.npy.partial-{os.getpid()}-{host}-alive123"
    other_host = tmp_path / f".x.npy.partial-{dead_pid()}-00000000-elsewher"
    folder = tmp_path / f".digits.partial-{dead_pid()}-{host}-folder12"
    for path in (dead, live, other_host):
        path.write_bytes(b"partial")
    folder.mkdir()
    (folder / "0000-3.png").write_bytes(b"half")
    args = ["--artifacts", demo_export, "--prompt", "3", "--threads", "1", "--no-denoise", "--max-iter", "2"]
    result = starflow_run(BUILD, *args, "--out", tmp_path / "x.npy")
    assert result.returncode == 0, result.stderr
    assert not dead.exists() and live.exists() and other_host.exists()
    result = starflow_run(BUILD, *args, "--out", tmp_path / "digits")
    assert result.returncode == 0, result.stderr
    assert not folder.exists() and sorted(p.name for p in (tmp_path / "digits").iterdir()) == ["0000-3.png"]


def test_threads_saving_to_one_path_never_collide(tmp_path):
    """sf_tensor_save_npy from 8 threads at once to one path: each write is whole (the file is one
    of the tensors, never a mix) and no partial is left."""
    library = _libstarflow()
    n = 1 << 16
    shape = (ctypes.c_int64 * 1)(n)
    tensors = []
    for value in range(8):
        handle = ctypes.c_void_p()
        assert library.sf_tensor_create(1, shape, 1, ctypes.byref(handle)) is None
        data = ctypes.cast(library.sf_tensor_data(handle), ctypes.POINTER(ctypes.c_float))
        np.ctypeslib.as_array(data, (n,))[:] = value
        tensors.append(handle)
    errors = []

    def save(handle: ctypes.c_void_p) -> None:
        for _ in range(20):
            status = library.sf_tensor_save_npy(handle, str(tmp_path / "one.npy").encode())
            if status:
                errors.append(library.sf_status_message(status).decode())

    threads = [threading.Thread(target=save, args=(t,)) for t in tensors]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    saved = np.load(tmp_path / "one.npy")
    assert saved.shape == (n,) and len(set(saved.tolist())) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.npy"]
    for handle in tensors:
        library.sf_tensor_free(handle)


@contextlib.contextmanager
def _tiny_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` at `path` (root only: skipped otherwise), unmounted after."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.decode().strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_a_folder_of_pngs_on_a_full_disk_is_whole_or_nothing(demo_export, tmp_path):
    """The PNGs go into a hidden sibling folder, moved into place whole: when the disk fills
    halfway the message says nothing was written, and nothing is (no folder, no partial)."""
    with _tiny_disk(tmp_path / "disk", "32k") as disk:  # 40 PNGs of 32x32: about 45 KB
        args = ["--artifacts", demo_export, "--prompt", "3", "--num-images", "40", "--threads", "1"]
        result = starflow_run(BUILD, *args, "--no-denoise", "--max-iter", "1", "--out", disk / "digits")
        assert_one_line_error(result, f"--out {disk / 'digits'}: nothing was written (")
        assert "No space left on device" in result.stderr and ".partial-" not in result.stderr
        assert list(disk.iterdir()) == []


def test_a_folder_reached_through_a_link_is_written_into(demo_export, tmp_path):
    """As the Python writer: only a link as the target itself is refused; `--out results` may be a
    link to a folder on a bigger disk, and the PNGs go into that folder."""
    (tmp_path / "disk").mkdir()
    (tmp_path / "results").symlink_to(tmp_path / "disk")
    args = ["--artifacts", demo_export, "--prompt", "3", "--threads", "1", "--no-denoise", "--max-iter", "1"]
    result = starflow_run(BUILD, *args, "--out", tmp_path / "results")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "results").is_symlink()
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["0000-3.png"]


def test_a_folder_of_pngs_that_fails_keeps_the_latents_file_that_was_there(demo_export, tmp_path):
    """The PNGs are made (staged) before --latents-out is written: when a picture cannot be written
    (NaN pixels here), the user's existing latents file is left as it was, not replaced or removed."""
    (tmp_path / "latents.npy").write_bytes(b"keep")
    args = [
        "--artifacts",
        demo_export,
        "--prompt",
        "3",
        "--guidance",
        "1e38",
        "--max-iter",
        "2",
        "--threads",
        "1",
    ]
    args += ["--no-denoise", "--no-check-finite", "--latents-out", tmp_path / "latents.npy"]
    result = starflow_run(BUILD, *args, "--out", tmp_path / "digits")
    assert_one_line_error(result, "pixel values that are NaN or inf, which a PNG cannot hold")
    assert (tmp_path / "latents.npy").read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latents.npy"]


def test_writers_racing_to_create_one_folder_all_land_in_it(tmp_path):
    """8 threads stage a folder for one new path and place it at once: the first rename makes the
    folder, the others find it made (ENOTEMPTY) and move their files in, as the Python writer does."""
    library = _libstarflow()
    out = str(tmp_path / "out").encode()
    staged = []
    for i in range(8):
        name = ctypes.create_string_buffer(4096)
        assert library.sf_output_stage_folder(out, name, 4096) is None
        (Path(name.value.decode()) / f"{i}.png").write_bytes(b"png")
        staged.append(name.value)
    start, errors = threading.Barrier(len(staged)), []

    def place(folder: bytes) -> None:
        start.wait()
        status = library.sf_output_place_folder(folder, out)
        if status:
            errors.append(library.sf_status_message(status).decode())

    threads = [threading.Thread(target=place, args=(folder,)) for folder in staged]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(f"{i}.png" for i in range(8))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
