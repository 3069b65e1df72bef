"""Scale run of `starflow export onnx`: a random checkpoint of a preset, exported with its memory
sampled.

Both steps run as children under `/usr/bin/time -v`, so their peak RSS is theirs alone. The
checkpoint is written by `random_checkpoint.py` (tensor by tensor: it never holds the model). While
a child runs, the memory of its whole process tree (PSS summed over /proc, every SAMPLE_S) goes to
a CSV, because `time`'s maximum is that of the largest single process, and the export may run
workers. Every output line is logged with its time, so the report names the step running at the
sampled peak. The report (JSON on stdout, and report.json) adds the export's file sizes and its
validation record: per precision and graph kind, the worst error relative to max|reference| and
the worst fraction of its limit.

The work directory (default runs/export-scale-PRESET-TIME) keeps the logs, CSVs and report; the
checkpoint and export are removed unless --keep. Arguments after `--` go to `starflow export onnx`.
A benchmark, not a test: numbers depend on the machine and its load (recorded at start and end).

    python benchmarks/export_scale.py --preset NAME [--dtype D] [--precision fp32 --precision fp16]
        [--work DIR] [--keep] [--checkpoint FILE] [-- --no-denoise ...]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from starflow.contract.manifest import Manifest

ROOT = Path(__file__).resolve().parent.parent
RANDOM_CHECKPOINT = Path(__file__).resolve().with_name("random_checkpoint.py")
STARFLOW = Path(sys.executable).with_name("starflow")  # the environment's console script
SAMPLE_S = 0.5
GIB = 2**30


def process_tree(root: int) -> list[int]:
    """`root` and every descendant alive now (from the parent ids in /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()  # the name may hold spaces and ")"
        except OSError:  # exited meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def pss_bytes(pid: int) -> int:
    """The proportional set size of one process (/proc/PID/smaps_rollup): a page shared with
    another process counts half in each, so a tree's sum is its footprint, where summed RSS counts
    a forked child's inherited pages twice (the export forks a tracer: 8.1 GiB of RSS against
    4.3 GiB of PSS, measured on the 7B shapes). 0 once it has exited."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    for line in rollup.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


class MemorySampler(threading.Thread):
    """Samples a process tree's summed PSS into a CSV until stopped; keeps the peak and its time."""

    def __init__(self, root: int, path: Path, began: float) -> None:
        super().__init__(daemon=True)
        self.root, self.path, self.began = root, path, began
        self.stop = threading.Event()
        self.peak, self.peak_at, self.most_processes, self.samples = 0, 0.0, 0, 0

    def run(self) -> None:
        with open(self.path, "w", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow(["elapsed_s", "pss_bytes", "processes", "load_1min"])
            while True:
                elapsed = time.perf_counter() - self.began
                pids = process_tree(self.root)
                pss = sum(pss_bytes(pid) for pid in pids)
                writer.writerow([f"{elapsed:.2f}", pss, len(pids), f"{os.getloadavg()[0]:.2f}"])
                stream.flush()
                self.samples += 1
                self.most_processes = max(self.most_processes, len(pids))
                if pss > self.peak:
                    self.peak, self.peak_at = pss, elapsed
                if self.stop.wait(SAMPLE_S):
                    return


def time_max_rss(path: Path) -> int | None:
    """`/usr/bin/time -v`'s maximum resident set size, in bytes."""
    for line in path.read_text().splitlines():
        if "Maximum resident set size (kbytes):" in line:
            return int(line.rsplit(":", 1)[1]) * 1024
    return None


def run_measured(name: str, command: list[str], work: Path) -> dict[str, Any]:
    """Run `command` under `/usr/bin/time -v` with its tree's PSS sampled; log every output line
    with its time (name.log), samples in name-pss.csv, time's report in name-time.txt."""
    time_file, log_file = work / f"{name}-time.txt", work / f"{name}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # lines arrive when printed: their times are right
    began = time.perf_counter()
    child = subprocess.Popen(
        ["/usr/bin/time", "-v", "-o", str(time_file), *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    sampler = MemorySampler(child.pid, work / f"{name}-pss.csv", began)
    sampler.start()
    lines: list[tuple[float, str]] = []
    assert child.stdout is not None
    with open(log_file, "w") as log:
        for line in child.stdout:
            lines.append((time.perf_counter() - began, line.rstrip()))
            log.write(f"{lines[-1][0]:9.1f}  {lines[-1][1]}\n")
            log.flush()
    exit_code = child.wait()
    wall = time.perf_counter() - began
    sampler.stop.set()
    sampler.join()
    at_peak = [text for at, text in lines if at <= sampler.peak_at]
    max_rss = time_max_rss(time_file)
    return {
        "command": command,
        "exit": exit_code,
        "wall_s": round(wall, 1),
        "time_max_rss_gib": None if max_rss is None else round(max_rss / GIB, 3),
        "sampled_peak_pss_gib": round(sampler.peak / GIB, 3),
        "sampled_peak_at_s": round(sampler.peak_at, 1),
        "output_at_peak": at_peak[-1] if at_peak else None,
        "most_processes": sampler.most_processes,
        "samples": sampler.samples,
        "output_tail": [text for _, text in lines[-12:]],
    }


def export_sizes(manifest: Manifest, directory: Path) -> dict[str, Any]:
    """GiB per precision and graph kind (graph + external data), the directory's total, its largest file."""
    by_kind: dict[str, dict[str, float]] = {}
    for g in manifest.graphs:
        size = (g.bytes + sum(e.bytes for e in g.external_data)) / GIB
        kinds = by_kind.setdefault(g.precision, {})
        kinds[g.kind] = kinds.get(g.kind, 0.0) + size
    files = [p for p in directory.rglob("*") if p.is_file()]
    largest = max(files, key=lambda p: p.stat().st_size)
    return {
        "gib": {p: {k: round(v, 3) for k, v in kinds.items()} for p, kinds in by_kind.items()},
        "directory_gib": round(sum(p.stat().st_size for p in files) / GIB, 3),
        "files": len(files),
        "external_data_graphs": sum(1 for g in manifest.graphs if g.external_data),
        "largest_file": {"name": largest.name, "gib": round(largest.stat().st_size / GIB, 3)},
    }


def worst_errors(manifest: Manifest) -> dict[str, dict[str, dict[str, Any]]]:
    """Per precision and graph kind: the largest error relative to max|reference| (with its
    tensor), and the largest error as a fraction of its limit (1 would fail)."""
    graphs = {g.name: g for g in manifest.graphs}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for v in manifest.validation:
        graph = graphs.get(v.graph)  # some comparisons name no graph ("denoise nll-gradient")
        precision, kind = (graph.precision, graph.kind) if graph else ("no graph", v.graph)
        relative = float(f"{v.max_abs_error / max(v.max_abs_reference, 1e-12):.4g}")
        worst = out.setdefault(precision, {}).setdefault(
            kind, {"relative_error": -1.0, "tensor": None, "of_limit": 0.0, "comparisons": 0}
        )
        worst["comparisons"] += 1
        worst["of_limit"] = round(max(worst["of_limit"], v.severity), 4)
        if relative > worst["relative_error"]:
            worst.update(relative_error=relative, tensor=f"{v.graph}.{v.tensor} ({v.case})")
    return out


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True, help="preset name (or YAML config) of the model")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="the checkpoint's"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--precision",
        action="append",
        choices=["fp32", "fp16"],
        help="repeat for both; default: the export's",
    )
    parser.add_argument("--work", type=Path, help="default: runs/export-scale-PRESET-TIME")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and the export")
    parser.add_argument("--checkpoint", type=Path, help="export this checkpoint instead of making one")
    args = parser.parse_args(argv[:split])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = args.work or ROOT / "runs" / f"export-scale-{Path(args.preset).stem}-{stamp}"
    work.mkdir(parents=True, exist_ok=True)
    checkpoint, export = args.checkpoint or work / "model.safetensors", work / "export"
    report: dict[str, Any] = {
        "preset": args.preset,
        "dtype": args.dtype,
        "cpus": os.cpu_count(),
        "load_average_start": os.getloadavg(),
    }
    try:
        if args.checkpoint is None:
            command = [sys.executable, str(RANDOM_CHECKPOINT), "--preset", args.preset, "--dtype", args.dtype]
            command += ["--seed", str(args.seed), "--out", str(checkpoint)]
            report["checkpoint"] = run_measured("checkpoint", command, work)
        report["checkpoint_bytes"] = checkpoint.stat().st_size if checkpoint.exists() else None
        if checkpoint.exists():
            precisions = sorted(set(args.precision or []))
            command = [str(STARFLOW), "export", "onnx", "--checkpoint", str(checkpoint), "--out", str(export)]
            if precisions:
                command += ["--precision", "both" if len(precisions) == 2 else precisions[0]]
            report["export"] = run_measured("export", command + argv[split + 1 :], work)
            if report["export"]["exit"] == 0:
                manifest = Manifest.load(export, verify_files=False)
                report["sizes"] = export_sizes(manifest, export)
                report["validation"] = worst_errors(manifest)
        report["load_average_end"] = os.getloadavg()
        text = json.dumps(report, indent=2)
        (work / "report.json").write_text(text + "\n")
        print(text)
    finally:
        if not args.keep:
            shutil.rmtree(export, ignore_errors=True)
            if args.checkpoint is None:
                checkpoint.unlink(missing_ok=True)
    print(f"records (logs, PSS samples, report.json): {work}", file=sys.stderr)


if __name__ == "__main__":
    main()
