"""`starflow serve` under load against the in-process runtime, at the same total threads.

On a local Ray instance (loopback only) it deploys the embedded digits model and sends bounded
runs of `POST /v1/generate` requests (one image each, distinct seeds, PNG answers) at each
concurrency, alternating with the same requests through an in-process `ModelWorker` (one request
at a time, and batches of 8 requests in one call). It prints images/s, p50/p99 latency and the
mean batch the server formed; then 1 replica of 1 thread against 2 replicas of 1 thread each at
the highest concurrency; then the time from `starflow serve` to its first answer.

    .venv/bin/python benchmarks/serve_load.py [--threads 2] [--concurrency 1 8 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import ray
from ray import serve

from starflow.core.request import request
from starflow.export.cache import demo_artifacts
from starflow.runtime import Generator
from starflow.serving.config import APP_NAME, ModelConfig, serve_config
from starflow.serving.deployment import build_app
from starflow.serving.worker import ModelWorker

SIZE = (16, 16)  # the digits export's largest image: the most work per request it allows


def body(seed: int) -> dict:
    return {"prompts": [str(seed % 10)], "seed": seed, "size": list(SIZE), "output_format": "png"}


async def load(url: str, concurrency: int, requests: int, first_seed: int) -> dict[str, float]:
    """`requests` requests, at most `concurrency` in flight: images/s, latency p50/p99, mean batch."""
    latencies: list[float] = []
    batches: list[int] = []
    gate = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def one(seed: int) -> None:
            async with gate:
                began = time.perf_counter()
                async with session.post(f"{url}/v1/generate", json=body(seed)) as response:
                    answer = await response.json()
                    if response.status != 200:
                        raise SystemExit(f"request {seed}: HTTP {response.status}: {answer}")
                latencies.append(time.perf_counter() - began)
                batches.append(answer["batch_requests"])

        began = time.perf_counter()
        await asyncio.gather(*(one(first_seed + i) for i in range(requests)))
        wall = time.perf_counter() - began
    latencies.sort()
    return {
        "images/s": requests / wall,
        "p50": statistics.median(latencies),
        "p99": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
        "batch": statistics.mean(batches),
    }


def in_process(worker: ModelWorker, requests: int, per_call: int, first_seed: int) -> dict[str, float]:
    """The same requests through `ModelWorker.run`, `per_call` at a time (what a replica runs)."""
    reqs = [request(**{k: v for k, v in body(first_seed + i).items() if k != "output_format"})
            for i in range(requests)]  # fmt: skip
    latencies = []
    began = time.perf_counter()
    for first in range(0, requests, per_call):
        start = time.perf_counter()
        worker.run(reqs[first : first + per_call])
        latencies.append(time.perf_counter() - start)
    wall = time.perf_counter() - began
    return {
        "images/s": requests / wall,
        "p50": statistics.median(latencies),
        "p99": max(latencies),
        "batch": per_call,
    }


def deploy(port: int, replicas: int, threads: int, artifacts: Path) -> str:
    model = ModelConfig(artifacts=str(artifacts), replicas=replicas, threads=threads)
    config = serve_config(models={"digits": model}, port=port)
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    asyncio.run(load(url, 1, 2, 10_000))  # warm: the replica's first call loads its sessions' caches
    return url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def row(name: str, result: dict[str, float]) -> str:
    return (
        f"{name:<34} {result['images/s']:7.1f} images/s   p50 {1000 * result['p50']:7.1f} ms   "
        f"p99 {1000 * result['p99']:7.1f} ms   batch {result['batch']:.2f}"
    )


def startup_and_stop_seconds(port: int) -> tuple[float, float]:
    """`starflow serve` (its own local Ray instance, the embedded models cached) from the command
    to its first 200 on /v1/images/generations, and from Ctrl-C (SIGINT) to its exit."""
    command = [sys.executable, "-m", "starflow.cli", "serve", "--port", str(port), "--threads", "1"]
    began = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in process.stdout:  # "serving ... first answer after ..." once it is up
            if line.startswith("serving "):
                break
        else:
            raise SystemExit("starflow serve exited before serving")
        data = b'{"model": "digits", "prompt": "3", "n": 1, "response_format": "b64_json"}'
        call = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/images/generations",
            data,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(call, timeout=60) as response:
            assert response.status == 200
        up = time.perf_counter() - began
        stopping = time.perf_counter()
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
        return up, time.perf_counter() - stopping
    finally:
        if process.poll() is None:
            process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="total CPU threads on each side")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=64, help="per run (at least 4x the concurrency)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    artifacts = demo_artifacts()
    worker = ModelWorker("digits", Generator.load(artifacts, threads=args.threads))
    print(f"digits export {artifacts}, {SIZE[0]}x{SIZE[1]} images, {args.threads} threads each side, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    ray.init(num_cpus=args.threads, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        url = deploy(port, 1, args.threads, artifacts)
        seed = 0
        alone, batched = [], []
        served: dict[int, list[dict[str, float]]] = {c: [] for c in args.concurrency}
        for _ in range(args.rounds):  # interleaved: each round runs every side once
            for c in args.concurrency:
                n = max(args.requests, 4 * c)
                served[c].append(asyncio.run(load(url, c, n, seed)))
                seed += n
            alone.append(in_process(worker, args.requests, 1, seed))
            batched.append(in_process(worker, args.requests, 8, seed))
            seed += args.requests
        inproc_alone, inproc_batched = median_of(alone), median_of(batched)
        print(row("in-process, one request per call", inproc_alone))
        print(row("in-process, 8 requests per call", inproc_batched))
        for c in args.concurrency:
            print(row(f"server, concurrency {c}", median_of(served[c])))
        lowest, highest = median_of(served[min(args.concurrency)]), median_of(served[max(args.concurrency)])
        latency = lowest["p50"] / inproc_alone["p50"] - 1
        per_image = inproc_alone["images/s"] / lowest["images/s"] - 1
        print(
            f"overhead at concurrency {min(args.concurrency)}: {latency:+.1%} p50 latency, "
            f"{per_image:+.1%} time per image"
        )
        print(f"concurrency {max(args.concurrency)} vs in-process batches of 8: "
              f"{highest['images/s'] / inproc_batched['images/s']:.2f}x")  # fmt: skip
        # 1 replica x 1 thread against 2 replicas x 1 thread, alternating deployments
        c = max(args.concurrency)
        scaled: dict[int, list[dict[str, float]]] = {1: [], 2: []}
        for _ in range(2):
            for replicas in (1, 2):
                url = deploy(port, replicas, 1, artifacts)
                scaled[replicas].append(asyncio.run(load(url, c, max(args.requests, 4 * c), seed)))
                seed += max(args.requests, 4 * c)
        one, two = median_of(scaled[1]), median_of(scaled[2])
        print(row(f"1 replica x 1 thread, concurrency {c}", one))
        print(row(f"2 replicas x 1 thread, concurrency {c}", two))
        print(f"2 replicas vs 1: {two['images/s'] / one['images/s']:.2f}x")
    finally:
        serve.shutdown()
        ray.shutdown()
    up, down = startup_and_stop_seconds(free_port())
    print(
        f"starflow serve: {up:.1f} s from the command to its first answer; {down:.1f} s from Ctrl-C to exit"
    )
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
