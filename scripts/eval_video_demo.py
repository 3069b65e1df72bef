"""Measure a moving-digits video checkpoint (default: the embedded STARFlow-V demo model).

Rerunnable acceptance check for the video demo model, on `--per-digit` clips of every digit:
- frame accuracy: a classifier trained on the real training digits, each also moved by up to one
  pixel (the located 8x8 window can be off by one), reads each frame's located digit; the share
  read as the prompted digit, per digit and overall, should be >= 90%. Printed first: its
  accuracy on the held-out digits and on the frames of real held-out clips (the ceiling);
- temporal consistency: the mean over consecutive frame pairs of the shift-aligned error (the
  mean absolute ink difference, in [0, 1], between a frame and the previous one moved by the best
  integer shift within 2 pixels, around the edges for scrolling clips). Real clips score 0 (a
  digit moved); frames of different generated clips give the "new sample each frame" level,
  printed beside it;
- identity: the share of clips whose frames are all read as one digit.

    python scripts/eval_video_demo.py [--checkpoint X.safetensors] [--per-digit 100] [--frames 8]
    python scripts/eval_video_demo.py --runtime   # sample through the torch-free runtime instead
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from starflow.apps.quality import train_classifier
from starflow.core.config import DEMO_VIDEO_CHECKPOINT
from starflow.core.outputs import write_video
from starflow.core.sampler import with_overrides
from starflow.model.checkpoint import read_state_dict
from starflow.training.moving_digits import (
    MOTIONS,
    baseline_unrelated,
    frame_crops,
    moving_digits_dataset,
    temporal_consistency,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=DEMO_VIDEO_CHECKPOINT)
    parser.add_argument("--per-digit", type=int, default=100)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument(
        "--speed", type=int, help="pixels per frame of the real clips (default: training's, the patch size)"
    )
    parser.add_argument(
        "--motion", choices=MOTIONS, default="scroll", help="the real clips' motion (the training data's)"
    )
    parser.add_argument("--batch-size", type=int, default=100, help="clips sampled together (PyTorch)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--guidance", type=float, help="guidance weight (default: the checkpoint's cfg)")
    parser.add_argument("--runtime", action="store_true", help="sample through the ONNX export (no torch)")
    parser.add_argument("--gif", type=Path, help="also write (up to) 10 clips per digit as a GIF")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    classifier, held_out = train_classifier(max_shift=1)
    config = read_state_dict(args.checkpoint)[1]
    if config is None:
        raise SystemExit(f"{args.checkpoint}: no config in its metadata")
    wrap = args.motion == "scroll"  # a scrolling digit wraps around the edges
    speed = args.speed or config.patch_size
    real = moving_digits_dataset("test", args.frames, config.img_size, speed=speed, motion=args.motion)
    real_clips = real.x[:, :, 0].numpy()
    real_read = read_frames(classifier, real_clips, wrap)
    print(
        f"classifier: {held_out:.2%} on the held-out real digits, "
        f"{(real_read == real.labels.numpy()[:, None]).mean():.2%} on the frames of real held-out clips"
    )
    print(f"real clips: temporal consistency {temporal_consistency(real_clips, wrap=wrap):.4f}")

    if args.runtime:
        from starflow.export.cache import demo_artifacts
        from starflow.runtime import Generator

        generator = Generator.load(demo_artifacts(video=True), threads=args.threads)
    else:
        from starflow.model.reference import ReferenceGenerator

        generator = ReferenceGenerator.load(args.checkpoint, batch_size=args.batch_size)
    began = time.perf_counter()
    prompts = [str(d) for d in range(10)]
    sampling = with_overrides(generator.default_sampling(), guidance=args.guidance)
    print(f"guidance {sampling.guidance}")
    result = generator.generate(
        prompts, num_images=args.per_digit, seed=0, frames=args.frames, sampling=sampling
    )
    seconds = time.perf_counter() - began
    clips = result.images[..., 0] * 2 - 1  # (N, T, H, W) in [-1, 1], prompt after prompt
    calls = sum(b.evaluations for b in result.stats)
    print(f"sampled {len(clips)} clips of {args.frames} frames in {seconds:.0f} s ({calls} block calls)")

    read = read_frames(classifier, clips, wrap)
    wanted = np.repeat(np.arange(10), args.per_digit)[:, None]
    per_digit = [(read[wanted[:, 0] == d] == d).mean() for d in range(10)]
    print("frame accuracy per digit: " + " ".join(f"{d}:{a:.1%}" for d, a in enumerate(per_digit)))
    print(f"frame accuracy: {(read == wanted).mean():.2%} (worst digit {min(per_digit):.1%})")
    per_frame = [(column == wanted[:, 0]).mean() for column in read.T]
    print("frame accuracy per frame: " + " ".join(f"{a:.1%}" for a in per_frame))
    print(f"clips whose frames are all one digit: {(read == read[:, :1]).all(1).mean():.2%}")
    print(
        f"temporal consistency: generated {temporal_consistency(clips, wrap=wrap):.4f}, real 0, "
        f"frames of different generated clips {baseline_unrelated(clips, wrap=wrap):.4f}"
    )
    if args.gif:
        shown = min(10, args.per_digit)
        keep = np.concatenate([np.arange(d * args.per_digit, d * args.per_digit + shown) for d in range(10)])
        pixels = np.round(result.images[keep] * 255).astype(np.uint8)
        write_video(pixels, args.gif, fps=generator.fps, columns=shown)
        print(f"wrote {args.gif}")


def read_frames(classifier: torch.nn.Module, clips: np.ndarray, wrap: bool) -> np.ndarray:
    """Clips (N, T, H, W) in [-1, 1] -> the digit the classifier reads in every frame (N, T)."""
    with torch.no_grad():
        crops = torch.from_numpy(frame_crops(clips, wrap).reshape(-1, 64))
        return classifier(crops).argmax(1).numpy().reshape(clips.shape[:2])


if __name__ == "__main__":
    main()
