"""Sample quality of the embedded digits model: what a sampling budget costs in what users see.

A classifier trained on the real training digits reads the samples of each prompted digit
(accuracy), and the samples' within-digit spread is compared with the real digits' (diversity:
mean pairwise distance of the samples over that of the real digits of the class). Used by
`starflow bench --quality` (block calls and quality of every sampling preset side by side),
`scripts/eval_demo.py` and `scripts/calibrate_sampling.py`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from starflow.core.checks import check_count
from starflow.core.errors import StarflowError
from starflow.core.generation import check_images_fit
from starflow.core.sampler import SampleOptions
from starflow.training.data import DIGITS_LEVELS, digits_split
from starflow.training.moving_digits import translate


def train_classifier(seed: int = 0, max_shift: int = 0) -> tuple[nn.Module, float]:
    """An MLP on the real training digits (pixels in [0, 1]); returns it and its test accuracy.

    With `max_shift` it also learns every training digit moved by up to that many pixels on each
    axis (zero-filled): a reader of digits cropped from video frames, where the located 8x8
    window can be off by one (see `starflow.training.moving_digits.frame_crops`).
    """
    torch.manual_seed(seed)
    (x_train, y_train), (x_test, y_test) = digits_split("train"), digits_split("test")
    shifts = range(-max_shift, max_shift + 1)
    x_train = np.concatenate([translate(x_train, dy, dx) for dy in shifts for dx in shifts])
    y_train = np.tile(y_train, len(shifts) ** 2)
    x_train = torch.from_numpy(x_train.reshape(-1, 64) / DIGITS_LEVELS).float()
    x_test = torch.from_numpy(x_test.reshape(-1, 64) / DIGITS_LEVELS).float()
    y_train, y_test = torch.from_numpy(y_train).long(), torch.from_numpy(y_test).long()
    net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Dropout(0.2), nn.Linear(256, 10))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-3)
    for _ in range(400):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x_train), y_train).backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(x_test).argmax(1) == y_test).float().mean().item()
    return net, accuracy


def mean_pairwise_distance(x: np.ndarray) -> float:
    """Mean L2 distance over all pairs of the flattened images."""
    flat = torch.from_numpy(x.reshape(len(x), -1)).double()
    n = len(x)
    return (torch.cdist(flat, flat).sum() / (n * (n - 1))).item()


def score_digit(
    classifier: nn.Module, images: np.ndarray, digit: int, real_digits: np.ndarray
) -> tuple[float, float]:
    """Samples (N, 8, 8) of one digit -> (share the classifier reads as `digit`, diversity ratio:
    their mean pairwise distance over that of the real digits of that class)."""
    with torch.no_grad():
        predicted = classifier(torch.from_numpy(images.reshape(-1, 64))).argmax(1)
    accuracy = (predicted == digit).float().mean().item()
    return accuracy, mean_pairwise_distance(images) / mean_pairwise_distance(real_digits)


@dataclasses.dataclass(frozen=True)
class Quality:
    """One sampling setting measured on every digit: cost and quality."""

    name: str
    images: int
    block_calls: int
    accuracy: float  # mean over digits of the share read as the prompted digit
    min_accuracy: float  # the worst digit's
    diversity: float  # mean over digits of the diversity ratio
    seconds: float


class DigitsJudge:
    """The classifier and the real digits, made once, scoring any generator's samples."""

    def __init__(self, seed: int = 0):
        self.classifier, self.held_out_accuracy = train_classifier(seed)
        images, self.labels = digits_split("all")
        self.real = images.astype(np.float32) / DIGITS_LEVELS

    def evaluate(self, name: str, generator: Any, sampling: SampleOptions, per_digit: int) -> Quality:
        """`per_digit` samples of every digit (seed 1 + digit, the same for every setting) through
        `generator` (runtime `Generator` or `ReferenceGenerator`)."""
        accuracies, ratios, calls = [], [], 0
        began = time.perf_counter()
        for digit in range(10):
            result = generator.generate([str(digit)], num_images=per_digit, seed=1 + digit, sampling=sampling)
            calls += sum(s.evaluations for s in result.stats)
            real = self.real[self.labels == digit]
            accuracy, ratio = score_digit(self.classifier, result.images[..., 0], digit, real)
            accuracies.append(accuracy)
            ratios.append(ratio)
        return Quality(
            name, 10 * per_digit, calls, float(np.mean(accuracies)), float(min(accuracies)),
            float(np.mean(ratios)), time.perf_counter() - began,
        )  # fmt: skip


def format_quality(results: list[Quality], held_out_accuracy: float) -> str:
    """The settings side by side, each against the first (the official settings)."""
    base = results[0]
    lines = [
        f"classifier held-out accuracy on real digits {held_out_accuracy:.4f}; "
        f"{base.images} samples per setting, the same seeds",
        f"{'setting':12} {'block calls':>11} {'fewer calls':>11} {'accuracy':>9} {'worst digit':>11} "
        f"{'diversity':>9} {'seconds':>8}",
    ]
    for r in results:
        lines.append(
            f"{r.name:12} {r.block_calls:11d} {base.block_calls / r.block_calls:10.2f}x "
            f"{r.accuracy:9.4f} {r.min_accuracy:11.3f} {r.diversity:9.4f} {r.seconds:8.1f}"
        )
    lines.append("seconds: one run each, in turn (not interleaved); the sampling rows above time engines")
    return "\n".join(lines)


def quality_bench(
    artifacts: Path | None = None, per_digit: int = 20, threads: int | None = None
) -> tuple[list[Quality], float]:
    """Block calls and quality of the official settings and of every calibrated preset of a digits
    export (default: the embedded model's, exported on first use), through the runtime; returns
    them and the classifier's held-out accuracy."""
    from starflow.export.cache import demo_artifacts
    from starflow.runtime.generator import Generator

    check_count(per_digit, "per_digit", 2, note="diversity needs pairs")
    check_images_fit(per_digit)
    generator = Generator.load(artifacts or demo_artifacts(), threads=threads)
    text = generator.manifest.text
    classes = text.component.classes if text and text.component else None
    if classes is None or sorted(classes) != [str(d) for d in range(10)]:
        raise StarflowError(
            f"--quality scores a digits model (prompts 0-9); the export {artifacts} has "
            f"{'no label table' if classes is None else f'the prompts {list(classes)}'}"
        )
    names = ["official", *generator.manifest.sampling_presets]
    guidance = max(generator.sampling(name).guidance for name in names)
    generator.check_memory(per_digit, None, generator.latent_size(), guidance)  # before the classifier
    judge = DigitsJudge()
    results = [judge.evaluate(name, generator, generator.sampling(name), per_digit) for name in names]
    return results, judge.held_out_accuracy
