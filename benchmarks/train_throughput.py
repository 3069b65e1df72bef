"""Training throughput (images/s) of the digits demo config for 1 and 2 processes on CPU.

Not a test: `python benchmarks/train_throughput.py [--steps 40] [--threads 1]`. Each process gets
`--threads` torch threads; the first logged interval (startup, first steps) is left out.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from starflow.training.train import TrainOptions, train

CONFIG = Path(__file__).resolve().parents[1] / "starflow" / "configs" / "digits.yaml"


def images_per_second(nproc: int, steps: int, threads: int, batch_size: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        options = TrainOptions(
            config=str(CONFIG), out=out, steps=steps, batch_size=batch_size, nproc=nproc,
            threads=threads, device="cpu", log_every=steps // 4, checkpoint_every=steps, sample_every=0,
            progress=False,
        )  # fmt: skip
        train(options)
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    timed = records[1:]
    seconds = timed[-1]["seconds"] - records[0]["seconds"]
    return (timed[-1]["step"] - records[0]["step"]) * batch_size / seconds


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    for nproc in (1, 2):
        rate = images_per_second(nproc, args.steps, args.threads, args.batch_size)
        print(f"nproc {nproc} x {args.threads} thread(s), batch {args.batch_size}: {rate:.1f} images/s")
