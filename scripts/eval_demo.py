"""Measure a class-conditional digits checkpoint (default: the embedded demo model).

Rerunnable acceptance check for the demo model:
- a classifier trained on the real training digits (its held-out accuracy is printed first)
  labels the samples of each prompt; the per-digit and mean accuracy should be >= 90%;
- diversity: within-digit mean pairwise distance of samples / of real digits (>= 0.6);
- test bits/dim: the official NLL on the held-out digits, noise-augmented as in training.

    python scripts/eval_demo.py [--checkpoint X.safetensors] [--per-digit 100] [--guidance G]
    python scripts/eval_demo.py --runtime   # sample the embedded model through its ONNX export
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from starflow.apps.quality import score_digit, train_classifier
from starflow.core.config import DEMO_CHECKPOINT
from starflow.core.outputs import save_png
from starflow.core.sampler import with_overrides
from starflow.model.reference import ReferenceGenerator
from starflow.training.data import DIGITS_LEVELS, digits_split, to_model_range


@torch.no_grad()
def test_bits_per_dim(model, labels, noise_std: float, seed: int = 0) -> float:
    images, classes = digits_split("test")
    x = to_model_range(images, DIGITS_LEVELS)
    x = x + noise_std * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    device = next(model.parameters()).device
    y = labels(torch.from_numpy(classes).long().to(device))
    return model.nll(x.to(device), y).bits_per_dim.item()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, default=DEMO_CHECKPOINT)
    parser.add_argument("--per-digit", type=int, default=100)
    parser.add_argument("--guidance", type=float, default=None, help="default: the checkpoint's cfg")
    parser.add_argument("--method", default="jacobi")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--grid", type=Path, default=None, help="also write a 10 x 10 sample grid PNG")
    parser.add_argument("--device", default="cpu", help="where to sample (the noise is drawn on the CPU)")
    parser.add_argument(
        "--runtime", action="store_true", help="sample through the deployed path: export + torch-free runtime"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)  # the check runs beside other work; sampling is small

    classifier, held_out = train_classifier()
    print(f"classifier held-out accuracy on real test digits: {held_out:.4f}")
    reference = ReferenceGenerator.load(args.checkpoint, device=args.device)
    model, labels = reference.model, reference.encoder.labels
    bpd = test_bits_per_dim(model, labels, model.config.noise_std)
    print(f"test bits/dim (noise_std {model.config.noise_std}): {bpd:.4f}")
    generator = reference
    if args.runtime:
        from starflow.export.cache import demo_artifacts
        from starflow.runtime.generator import Generator

        if args.checkpoint != DEMO_CHECKPOINT:
            parser.error("--runtime evaluates the embedded model's export only")
        generator = Generator.load(demo_artifacts())
    sampling = with_overrides(generator.default_sampling(), guidance=args.guidance, method=args.method)

    real_images, real_labels = digits_split("all")
    real = real_images.astype(np.float32) / DIGITS_LEVELS
    accuracies, ratios, stats, per_digit_samples = [], [], [], []
    began = time.perf_counter()
    for digit in range(10):
        result = generator.generate(
            [str(digit)], num_images=args.per_digit, seed=args.seed + digit, sampling=sampling
        )
        images, stats = result.images[..., 0], stats + result.stats
        per_digit_samples.append(images)
        accuracy, ratio = score_digit(classifier, images, digit, real[real_labels == digit])
        accuracies.append(accuracy)
        ratios.append(ratio)
        print(f"digit {digit}: accuracy {accuracies[-1]:.3f}, diversity ratio {ratios[-1]:.3f}")
    seconds = time.perf_counter() - began
    iters = [i for s in stats for i in s.iterations]
    print(
        f"sampled {10 * args.per_digit} images ({sampling.method}, guidance {sampling.guidance:g}, "
        f"{'runtime' if args.runtime else 'PyTorch'}) in {seconds:.1f} s; "
        f"mean iterations per {sampling.jacobi.block_size}-token chunk {np.mean(iters):.2f}"
    )
    print(f"mean accuracy {np.mean(accuracies):.4f} (>= 0.90), min {min(accuracies):.3f}")
    print(f"mean diversity ratio {np.mean(ratios):.4f} (>= 0.60), min {min(ratios):.3f}")
    if args.grid is not None:
        rows = np.stack([s[:10] for s in per_digit_samples], axis=1).reshape(-1, 8, 8, 1)  # column = digit
        save_png(args.grid, rows, columns=10, scale=6)
        print(f"wrote {args.grid}")


if __name__ == "__main__":
    main()
