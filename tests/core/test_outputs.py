"""Video clip outputs (STARFlow-V): .npy, animated GIF, H.264 MP4 and a folder of PNG frames.

Sizes are worked out by hand here: clips sit in a grid with a 1-pixel black border, the grid is
upscaled (nearest) so a clip's short side is >= 128 px, then padded to even sides.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from starflow.core import outputs
from starflow.core.errors import StarflowError
from starflow.core.outputs import video_output_kind, write_video


def blocky(n: int, t: int, h: int, w: int, c: int, block: int = 4, seed: int = 0) -> np.ndarray:
    """Random flat-coloured blocks, different in every frame: easy on a lossy codec, and no two
    consecutive frames equal (Pillow would merge those into one GIF frame)."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 256, (n, t, h // block, w // block, c), dtype=np.uint8)
    return cells.repeat(block, 2).repeat(block, 3)


def clip_region(frame: np.ndarray, i: int, h: int, w: int, scale: int) -> np.ndarray:
    """Clip i's pixels in a one-row grid frame (1-pixel border, then `scale`)."""
    top, left = scale, scale * (1 + i * (w + 1))
    return frame[top : top + scale * h, left : left + scale * w]


def up(pixels: np.ndarray, scale: int) -> np.ndarray:
    return pixels.repeat(scale, 0).repeat(scale, 1)


# ---- .npy, .gif, folder ---------------------------------------------------------------------------------
def test_npy_keeps_the_array(tmp_path: Path) -> None:
    clips = blocky(2, 3, 12, 8, 3)
    out = tmp_path / "clips.npy"
    assert write_video(clips, out, fps=8) == [out]
    back = np.load(out)
    assert back.dtype == np.uint8 and np.array_equal(back, clips)


def test_gif_is_a_looping_grid_animation(tmp_path: Path) -> None:
    clips = blocky(3, 5, 8, 8, 3)
    out = tmp_path / "clips.gif"
    assert write_video(clips, out, fps=10) == [out]
    with Image.open(out) as gif:
        assert gif.format == "GIF" and gif.n_frames == 5
        # 3 clips of 8x8 in one row: (8+1)*3+1 = 28 wide, 10 high; 128/8 = 16x
        assert gif.size == (28 * 16, 10 * 16)
        assert gif.info["loop"] == 0  # forever
        durations = []
        for t in range(gif.n_frames):
            gif.seek(t)
            durations.append(gif.info["duration"])
            frame = np.asarray(gif.convert("RGB"))
            for i in range(3):
                assert np.array_equal(clip_region(frame, i, 8, 8, 16), up(clips[i, t], 16))
    assert durations == [100] * 5  # 1/10 s


def test_grayscale_gif(tmp_path: Path) -> None:
    clips = blocky(1, 3, 16, 10, 1, block=2)
    out = tmp_path / "gray.gif"
    write_video(clips, out, fps=4)
    with Image.open(out) as gif:
        # (16+2, 10+2) pixels, 13x (ceil(128/10)); 234 x 156 are even already
        assert gif.n_frames == 3 and gif.size == (12 * 13, 18 * 13)
        for t in range(3):
            gif.seek(t)
            assert gif.info["duration"] == 250
            frame = np.asarray(gif.convert("L"))
            assert np.array_equal(clip_region(frame, 0, 16, 10, 13), up(clips[0, t, ..., 0], 13))


def test_gif_delays_are_rounded_to_hundredths(tmp_path: Path) -> None:
    out = tmp_path / "x.gif"
    write_video(blocky(1, 2, 4, 4, 1, block=1), out, fps=15)  # 66.7 ms -> 70 ms, not truncated to 60
    with Image.open(out) as gif:
        assert gif.info["duration"] == 70


def test_folder_has_one_sorted_png_per_clip_and_frame(tmp_path: Path) -> None:
    clips = blocky(2, 3, 12, 12, 3)
    out = tmp_path / "frames"
    files = write_video(clips, out, fps=8)
    names = [f"clip{i:03d}_frame{t:04d}.png" for i in range(2) for t in range(3)]
    assert files == [out / name for name in names]
    assert sorted(p.name for p in out.iterdir()) == names
    assert [p.name for p in tmp_path.iterdir()] == ["frames"]  # no temporary folder left
    for i in range(2):
        for t in range(3):
            with Image.open(out / f"clip{i:03d}_frame{t:04d}.png") as png:
                assert np.array_equal(np.asarray(png), up(clips[i, t], 11))  # 12 px -> 132 px


def test_an_existing_folder_is_reused(tmp_path: Path) -> None:
    out = tmp_path / "frames"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "clip000_frame0000.png").write_bytes(b"old")
    write_video(blocky(1, 2, 4, 4, 1, block=1), out, fps=8)
    assert sorted(p.name for p in out.iterdir()) == [
        "clip000_frame0000.png",
        "clip000_frame0001.png",
        "notes.txt",
    ]
    assert (out / "notes.txt").read_text() == "keep me"
    with Image.open(out / "clip000_frame0000.png") as png:
        assert png.size == (128, 128)
    assert [p.name for p in tmp_path.iterdir()] == ["frames"]


# ---- .mp4 -----------------------------------------------------------------------------------------------
@pytest.fixture
def iio():
    pytest.importorskip("imageio_ffmpeg", reason="the video extra (imageio-ffmpeg) is not installed")
    return pytest.importorskip("imageio.v3", reason="the video extra (imageio) is not installed")


@pytest.mark.parametrize("channels", [3, 1])
def test_mp4_decodes_back_to_the_scaled_grid(tmp_path: Path, iio, channels: int) -> None:
    clips = blocky(2, 4, 12, 12, channels)
    out = tmp_path / "clips.mp4"
    assert write_video(clips, out, fps=12) == [out]
    meta = iio.immeta(out, plugin="FFMPEG")
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p") and meta["fps"] == 12
    frames = iio.imread(out, plugin="FFMPEG")
    # 2 clips of 12x12: 27 x 14 pixels, 11x (ceil(128/12)) = 297 x 154, padded to even 298 x 154
    assert frames.shape == (4, 154, 298, 3)
    for t in range(4):
        for i in range(2):
            expected = up(clips[i, t], 11).astype(np.float64)
            decoded = clip_region(frames[t], i, 12, 12, 11).astype(np.float64)
            if channels == 1:
                decoded = decoded.mean(axis=-1, keepdims=True)
            assert np.abs(decoded - expected).mean() < 8, (t, i)
    assert [p.name for p in tmp_path.iterdir()] == ["clips.mp4"]


def test_a_failing_encoder_leaves_nothing(tmp_path: Path, iio, monkeypatch) -> None:
    def half_written(uri, *args, **kwargs):
        Path(uri).write_bytes(b"\x00\x00\x00\x18ftypmp42")
        raise RuntimeError("encoder crashed")

    monkeypatch.setattr(iio, "imwrite", half_written)
    with pytest.raises(RuntimeError, match="encoder crashed"):
        write_video(blocky(1, 2, 8, 8, 3), tmp_path / "x.mp4", fps=8)
    assert list(tmp_path.iterdir()) == []


def test_missing_imageio_is_refused_before_any_work(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "imageio", None)
    monkeypatch.setitem(sys.modules, "imageio.v3", None)
    with pytest.raises(StarflowError, match=r"\.mp4 needs imageio .*pip install 'starflow\[video\]'"):
        video_output_kind(tmp_path / "x.mp4")
    assert video_output_kind(tmp_path / "x.gif") == "gif"  # the other forms do not need it
    write_video(blocky(1, 2, 4, 4, 3, block=1), tmp_path / "x.gif", fps=8)


# ---- failures: nothing written, nothing left behind ------------------------------------------------
def test_a_failing_gif_keeps_the_old_file(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "x.gif"
    out.write_bytes(b"old")

    def crash(f, frames, fps):
        f.write(b"GIF89a")
        raise ValueError("encoder crashed")

    monkeypatch.setattr(outputs, "_gif", crash)
    with pytest.raises(ValueError, match="encoder crashed"):
        write_video(blocky(1, 2, 8, 8, 3), out, fps=8)
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.gif"]


@pytest.mark.parametrize("name", ["x.npy", "x.gif", "frames"])
def test_a_full_disk_is_one_error_and_leaves_nothing(tmp_path: Path, monkeypatch, name: str) -> None:
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs.os, "replace", full)  # the last step of every write: the rename
    out = tmp_path / name
    with pytest.raises(StarflowError, match=f"out {out}: cannot write \\(No space left on device\\)"):
        write_video(blocky(2, 2, 8, 8, 3), out, fps=8)
    assert list(tmp_path.iterdir()) == []


def test_a_failing_frame_leaves_no_folder(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def picture(pixels):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(5, "Input/output error")
        return Image.fromarray(pixels)

    monkeypatch.setattr(outputs, "_picture", picture)
    with pytest.raises(StarflowError, match="cannot write \\(Input/output error\\)"):
        write_video(blocky(2, 2, 8, 8, 3), tmp_path / "frames", fps=8)
    assert list(tmp_path.iterdir()) == []


# ---- bad destinations and bad input, refused before any work ---------------------------------------
def test_kinds(tmp_path: Path) -> None:
    assert [video_output_kind(tmp_path / n) for n in ["a.gif", "a.npy", "a"]] == ["gif", "npy", "dir"]


def test_a_bad_suffix_lists_the_forms(tmp_path: Path) -> None:
    with pytest.raises(StarflowError) as err:
        video_output_kind(tmp_path / "x.avi")
    assert str(err.value) == (
        f"out {tmp_path / 'x.avi'}: expected an .mp4 (H.264), a .gif, a .npy (N, T, H, W, C) uint8 array, "
        "or a folder (one PNG per frame)"
    )
    with pytest.raises(StarflowError, match="expected an .mp4"):
        video_output_kind(tmp_path / "x.png")  # an image form is not a video form


def test_a_file_suffix_on_a_folder_and_a_folder_on_a_file(tmp_path: Path) -> None:
    (tmp_path / "x.gif").mkdir()
    (tmp_path / "frames").write_text("")
    with pytest.raises(StarflowError, match="x.gif: is a directory, expected a .gif file"):
        video_output_kind(tmp_path / "x.gif")
    with pytest.raises(StarflowError, match="frames: exists and is not a folder"):
        write_video(blocky(1, 1, 4, 4, 1, block=1), tmp_path / "frames", fps=8)


def test_a_missing_parent(tmp_path: Path) -> None:
    with pytest.raises(StarflowError, match=f"directory {tmp_path / 'no'} does not exist"):
        video_output_kind(tmp_path / "no" / "x.npy")


@pytest.mark.parametrize(
    "clips, message",
    [
        (np.zeros((2, 4, 8, 8), np.uint8), r"expected an \(N, T, H, W, C\) array, got shape \(2, 4, 8, 8\)"),
        ([[[[[0]]]]], r"expected an \(N, T, H, W, C\) array, got shape None"),
        (np.zeros((1, 2, 8, 8, 3), np.float32), r"expected uint8 pixels \(0..255\), got float32"),
        (
            np.zeros((1, 0, 8, 8, 3), np.uint8),
            r"expected at least one clip, frame, .*got shape \(1, 0, 8, 8, 3\)",
        ),
        (
            np.zeros((0, 2, 8, 8, 3), np.uint8),
            r"expected at least one clip, frame, .*got shape \(0, 2, 8, 8, 3\)",
        ),
    ],
)
def test_bad_clips(tmp_path: Path, clips, message: str) -> None:
    with pytest.raises(StarflowError, match="clips: " + message):
        write_video(clips, tmp_path / "x.npy", fps=8)
    assert list(tmp_path.iterdir()) == []


def test_latent_channels_are_written_as_npy_only(tmp_path: Path) -> None:
    clips = np.zeros((1, 2, 8, 8, 4), np.uint8)  # a 4-channel latent model without a decoder
    for name in ("x.gif", "frames"):
        with pytest.raises(StarflowError, match=r"clips: 4 channels .* can be written as \.npy only"):
            write_video(clips, tmp_path / name, fps=8)
    assert list(tmp_path.iterdir()) == []
    write_video(clips, tmp_path / "x.npy", fps=8)
    assert np.load(tmp_path / "x.npy").shape == (1, 2, 8, 8, 4)


@pytest.mark.parametrize("fps", [0, -1.5, float("nan"), float("inf"), "24", True, None])
def test_bad_fps(tmp_path: Path, fps) -> None:
    with pytest.raises(StarflowError, match=f"fps: expected a finite number > 0, got {fps!r}"):
        write_video(blocky(1, 2, 4, 4, 3, block=1), tmp_path / "x.gif", fps=fps)
    assert list(tmp_path.iterdir()) == []


def test_numpy_fps_is_a_number(tmp_path: Path) -> None:
    write_video(blocky(1, 2, 4, 4, 3, block=1), tmp_path / "x.gif", fps=np.float32(20))
    with Image.open(tmp_path / "x.gif") as gif:
        assert gif.info["duration"] == 50


# ---- non-finite pixels ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["grid.png", "images"])
def test_non_finite_pixels_are_refused_by_the_png_writer(tmp_path: Path, name: str) -> None:
    """NaN has no pixel value (a cast makes it an arbitrary byte): refused, nothing written; .npy keeps it."""
    images = np.full((2, 4, 4, 1), 0.5, np.float32)
    images[1, 2, 3, 0] = np.nan
    out = tmp_path / name
    with pytest.raises(StarflowError, match=f"out {out}: 1 pixel values are NaN or inf"):
        outputs.save_images(out, images, columns=2)
    with pytest.raises(StarflowError, match="images: 1 pixel values are NaN or inf"):
        outputs.png_bytes(outputs.to_uint8(images[1]))
    assert list(tmp_path.iterdir()) == []
    outputs.save_images(tmp_path / "x.npy", images, columns=2)
    assert np.isnan(np.load(tmp_path / "x.npy")).sum() == 1
