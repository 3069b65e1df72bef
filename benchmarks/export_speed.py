"""The embedded digits model's export (all graphs, validation on), timed side by side with the
export of another checkout (a baseline, e.g. `git worktree add ../baseline <rev>`), interleaved,
each in a fresh process at an explicit thread count.

    python benchmarks/export_speed.py --baseline ../baseline [--rounds 2] [--threads 2]

Each run is a child process importing starflow from its checkout (the editable install's package
map pointed there), so both pay the same imports; the report gives every run's wall time and the
median ratio baseline / current, with the load average around the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]

# Runs in the child: export the digits model the way `starflow generate` does on first use (fp32
# graphs, density and denoise, validation on).
CHILD = """
import sys, time
began = time.perf_counter()
import torch
torch.set_num_threads(int(sys.argv[3]))
from pathlib import Path
from starflow.core.config import DEMO_CHECKPOINT
from starflow.core.sampling_presets import DIGITS_PRESETS, load_presets
from starflow.export.onnx import ExportOptions, export_onnx
assert str(DEMO_CHECKPOINT).startswith(sys.argv[1]), DEMO_CHECKPOINT
presets = load_presets(DIGITS_PRESETS)
options = ExportOptions(precisions=("fp32",), density=True, sampling_presets=presets, force=True)
export_onnx(DEMO_CHECKPOINT, Path(sys.argv[2]), options)
print(time.perf_counter() - began)
"""
# Imported by every Python process of the run (the baseline's exporter spawns a worker process,
# which must run the baseline's code too): points the editable install's package map at the
# checkout in STARFLOW_SOURCE_ROOT.
SITECUSTOMIZE = """
import os
import __editable___starflow_0_1_0_finder as finder
root, installed = os.environ["STARFLOW_SOURCE_ROOT"], finder.MAPPING["starflow"].rsplit("/", 1)[0]
for name, path in list(finder.MAPPING.items()):
    finder.MAPPING[name] = root + path[len(installed):]
"""


def run(root: Path, threads: int) -> float:
    """One export by `root`'s code in a fresh process; its seconds from start to the export's end."""
    with tempfile.TemporaryDirectory() as work:
        (Path(work) / "sitecustomize.py").write_text(SITECUSTOMIZE)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=work, STARFLOW_SOURCE_ROOT=str(root))
        command = [sys.executable, "-c", CHILD, str(root), str(Path(work) / "export"), str(threads)]
        # run from the checkout: `python -c` puts the working directory first on sys.path
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root, check=False)
    if done.returncode != 0:
        raise SystemExit(f"export by {root} failed:\n{done.stderr[-3000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, required=True, help="another checkout's root")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    load = [os.getloadavg()[0]]
    times: dict[str, list[float]] = {"current": [], "baseline": []}
    for _ in range(args.rounds):
        for name, root in (("baseline", args.baseline.resolve()), ("current", HERE)):
            times[name].append(run(root, args.threads))
            print(f"{name}: {times[name][-1]:.1f} s", file=sys.stderr)
    load.append(os.getloadavg()[0])
    report = {
        "seconds": times,
        "median_ratio_baseline_over_current": statistics.median(times["baseline"])
        / statistics.median(times["current"]),
        "threads": args.threads,
        "load_average": load,
        "when": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
