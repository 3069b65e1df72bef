"""Calibrate a fast sampling preset of the embedded digits model on sample quality, not agreement.

For each candidate policy (per-block chunk length, threshold, iteration budget, first guess) it
samples `--per-digit` images of every digit through the torch-free runtime (the same seeds for
every policy) and prints the block calls against `scripts/eval_demo.py`'s quality measures:
classifier accuracy on the prompted digit and within-digit diversity relative to real digits.
The chosen policy is the one with the fewest block calls whose accuracy is within 1 point and
diversity within 0.03 of the official settings'; `--write` stores it as the model's "fast"
preset (starflow/assets/digits-presets.json), which the embedded model's export carries; it
also times the chosen policy against the official settings side by side.

    python scripts/calibrate_sampling.py [--per-digit 100] [--write]
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from starflow.apps.bench import interleaved
from starflow.apps.quality import DigitsJudge
from starflow.core.outputs import save_text
from starflow.core.sampler import JacobiSettings, SampleOptions
from starflow.core.sampling_presets import DIGITS_PRESETS, presets_to_json
from starflow.export.cache import demo_artifacts
from starflow.runtime.generator import Generator


def candidates(official: SampleOptions) -> dict[str, SampleOptions]:
    """The official settings and cheaper budgets: the shallow blocks (easy, GS-Jacobi's finding)
    get long chunks and few iterations; the deep block keeps or shortens its budget."""
    out = {"official": official}
    for shallow_iters in (1, 2, 3):
        for init in ("noise", "chunk-mean"):
            shallow = JacobiSettings(block_size=64, max_iter=shallow_iters, threshold=1e-3, init=init)
            out[f"shallow 64x{shallow_iters} {init}"] = dataclasses.replace(official, shallow_jacobi=shallow)
    for deep_iters in (4, 6):
        deep = dataclasses.replace(official.jacobi, max_iter=deep_iters)
        shallow = JacobiSettings(block_size=64, max_iter=2, threshold=1e-3)
        out[f"deep 16x{deep_iters}, shallow 64x2"] = dataclasses.replace(
            official, jacobi=deep, shallow_jacobi=shallow
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-digit", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="store the chosen policy as the 'fast' preset")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    judge = DigitsJudge()
    generator = Generator.load(demo_artifacts(), threads=args.threads)
    official = generator.default_sampling()
    held_out, samples = judge.held_out_accuracy, 10 * args.per_digit
    print(f"classifier held-out accuracy {held_out:.4f}; {samples} samples per policy")
    results = {}
    for name, sampling in candidates(official).items():
        r = results[name] = judge.evaluate(name, generator, sampling, args.per_digit)
        print(
            f"{name:32} block calls {r.block_calls:6d}  accuracy {r.accuracy:.4f}  "
            f"diversity {r.diversity:.4f}  ({r.seconds:.1f} s)"
        )
    base = results["official"]
    eligible = [
        name
        for name, r in results.items()
        if r.accuracy >= base.accuracy - 0.01 and abs(r.diversity - base.diversity) <= 0.03
    ]
    chosen = min(eligible, key=lambda name: results[name].block_calls)
    ratio = base.block_calls / results[chosen].block_calls
    print(f"chosen: {chosen} ({ratio:.2f}x fewer block calls than the official settings)")
    sampling = candidates(official)[chosen]
    # calls are not compute (a long chunk costs more per call): time both side by side
    prompts = [str(d) for d in range(10)]
    runs = {
        name: lambda options=options: generator.generate(prompts, num_images=10, seed=0, sampling=options)
        for name, options in (("official", official), (chosen, sampling))
    }
    timed = interleaved(runs, repeats=5, warmup=1)
    (fast_s, _), (official_s, _) = timed[chosen], timed["official"]
    print(
        f"100 images, medians of 5 interleaved rounds, {args.threads} threads: official {official_s:.2f} s, "
        f"{chosen} {fast_s:.2f} s ({official_s / fast_s:.2f}x faster)"
    )
    if args.write:
        save_text(DIGITS_PRESETS, presets_to_json({"fast": sampling}))
        print(f"wrote {DIGITS_PRESETS}")


if __name__ == "__main__":
    main()
