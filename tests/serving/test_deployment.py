"""`starflow serve` on a two-node Ray cluster on this machine: the openai package's client gets
`starflow generate`'s images, the API key and bad bodies are answered with JSON errors, overload
is answered at once without crashing or growing a replica, and losing a node fails only the
requests in flight on it. One server (started from a config file `--write-config` wrote, as
`starflow serve --config` runs it) serves every test; the failover test, which kills a node,
runs last."""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from starflow.cli.main import app

pytest.importorskip("ray.serve")
requests = pytest.importorskip("requests")  # a dependency of ray[serve]

TOKEN = "test-token-5b1e"
REPLICA_TITLE = "ray::ServeReplica:starflow:digits"
CAPACITY = dict(replicas=2, max_ongoing_requests=4, max_queued_requests=4)  # 12 requests in the system
MAX_BODY = 4096
STARTUP_S = 240  # the deadline for the first healthy answer (2 replicas load on 2 busy cores)


@dataclasses.dataclass
class Server:
    url: str
    process: subprocess.Popen
    startup_s: float  # what `starflow serve` reported: its start to the first healthy answer

    def call(self, path: str, body: object = None, *, token: str | None = TOKEN, **kwargs: object):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if body is None and "data" not in kwargs:
            return requests.get(f"{self.url}{path}", headers=headers, timeout=60)
        return requests.post(f"{self.url}{path}", json=body, headers=headers, timeout=60, **kwargs)


@pytest.fixture(scope="module")
def server(ray_cluster, demo_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`starflow serve --config` (of a file `--write-config` wrote) on the shared cluster, as a
    subprocess; stopped with Ctrl-C (SIGINT to its PID), which must end it cleanly."""
    port = _free_port()
    config = tmp_path_factory.mktemp("serve") / "serve.yaml"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in CAPACITY.items()]
    written = CliRunner().invoke(
        app,
        ["serve", "--write-config", str(config), "--artifacts", f"digits={demo_export}", "--port", str(port),
         "--threads", "1", "--max-replicas-per-node", "1", "--max-batch-size", "4", "--timeout-s", "60",
         "--max-body-bytes", str(MAX_BODY), "--api-key", TOKEN, *flags],
    )  # fmt: skip
    assert written.exit_code == 0, written.output
    assert TOKEN not in config.read_text()  # the file names the variable, never the key
    env = {**os.environ, "STARFLOW_API_KEY": TOKEN}
    command = ["serve", "--config", str(config), "--address", ray_cluster.address]
    process = subprocess.Popen(
        [sys.executable, "-m", "starflow.cli", *command],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )  # fmt: skip
    try:
        lines = _lines(process)
        startup = _wait_for_line(process, lines, "first answer after", STARTUP_S)
        seconds = float(startup.split("first answer after ")[1].split(" s")[0])
        print(f"starflow serve: first answer after {seconds:.1f} s")
        yield Server(f"http://127.0.0.1:{port}", process, seconds)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
        assert process.returncode == 0 and "stopped\n" in lines, lines
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# ---- the openai client, the key, bad bodies ---------------------------------------------------------------
def test_openai_client_gets_starflow_generates_image(
    server: Server, demo_export: Path, tmp_path: Path
) -> None:
    openai = pytest.importorskip("openai")
    from PIL import Image

    from starflow.core.outputs import to_uint8

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=TOKEN, max_retries=0)
    raw = client.images.with_raw_response.generate(
        model="digits", prompt="3", n=1, size="8x8", response_format="b64_json", extra_body={"seed": 5}
    )
    (image,) = raw.parse().data
    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(image.b64_json))))
    out = tmp_path / "three.npy"
    args = ["generate", "--artifacts", str(demo_export), "--prompt", "3", "--seed", "5", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(served.reshape(8, 8), to_uint8(np.load(out))[0].reshape(8, 8))
    assert raw.headers["X-Starflow-Node"] and raw.headers["X-Starflow-Replica"]


def test_api_key_and_bad_bodies_get_json_errors(server: Server) -> None:
    assert server.call("/healthz", token=None).status_code == 200  # liveness stays open
    for token in (None, "wrong"):
        response = server.call("/v1/models", token=token)
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    assert server.call("/v1/models").json()["data"][0]["id"] == "digits"
    bad = {
        "not JSON": dict(data=b"{prompts: 3", headers={"Content-Type": "application/json"}),
        "unknown field": dict(json={"prompts": ["3"], "colour": "red"}),
        "over the limit": dict(json={"prompts": ["3"], "num_images": 9}),
        "too big": dict(json={"prompts": ["3" * MAX_BODY]}),
    }
    for what, kwargs in bad.items():
        headers = {"Authorization": f"Bearer {TOKEN}", **kwargs.pop("headers", {})}  # type: ignore[dict-item]
        response = requests.post(f"{server.url}/v1/generate", headers=headers, timeout=30, **kwargs)  # type: ignore[arg-type]
        assert 400 <= response.status_code < 500, (what, response.status_code, response.text)
        assert set(response.json()["error"]) == {"message", "type"}, (what, response.text)
    assert response.status_code == 413


# ---- overload ---------------------------------------------------------------------------------------------
HEAVY = {"prompts": ["8"], "num_images": 8, "size": [16, 16], "output_format": "npy"}


def test_overload_is_answered_at_once_and_replicas_stay(server: Server, ray_cluster) -> None:
    """A burst of 4x what the replicas take and queue: every request is answered (200, or 429 /
    503 at once), the same replica processes serve afterwards, and their memory stays flat."""
    capacity = CAPACITY["replicas"] * CAPACITY["max_ongoing_requests"] + CAPACITY["max_queued_requests"]
    burst = 4 * capacity
    warm = _burst(server, burst)  # then every buffer a full batch needs exists
    before = _replica_rss(ray_cluster)
    assert len(before) == CAPACITY["replicas"]
    began = time.perf_counter()
    results = _burst(server, burst)
    seconds = time.perf_counter() - began
    after = _replica_rss(ray_cluster)
    statuses = Counter(status for status, _ in warm + results)
    print(
        f"2 bursts of {burst}: {dict(statuses)}, the second in {seconds:.1f} s; RSS MiB {before} -> {after}"
    )
    assert set(statuses) <= {200, 429, 503} and statuses[200] >= 2 * capacity, statuses
    assert statuses[429] + statuses[503] > 0, statuses  # the bound was reached
    refused = [elapsed for status, elapsed in warm + results if status != 200]
    assert max(refused) < 5, refused  # at once, not after a wait
    assert after.keys() == before.keys()  # no replica died or was replaced
    for pid, rss in after.items():
        assert rss < before[pid] * 1.25 + 64, (before, after)


def test_each_request_is_measured_on_rays_prometheus_endpoint(server: Server, ray_cluster) -> None:
    """Queue time, batch size, block calls, Jacobi iterations and stage seconds of the requests
    so far, on the head node's endpoint (a replica runs there), within Ray's report interval."""
    head = ray_cluster.head_node
    url = f"http://{head.node_ip_address}:{head.metrics_export_port}/metrics"
    names = ("requests_total", "queue_seconds_count", "batch_requests_count", "block_calls_count",
             "jacobi_iterations_count", "stage_seconds_count")  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        lines = requests.get(url, timeout=10).text.splitlines()
        missing = [n for n in names if not any(line.startswith(f"ray_starflow_{n}{{") for line in lines)]
        if not missing:
            break
        assert time.monotonic() < deadline, missing
        time.sleep(1)
    served = [line for line in lines if line.startswith("ray_starflow_requests_total{")]
    assert any('model="digits"' in line and 'outcome="served"' in line for line in served), served


def _burst(server: Server, n: int) -> list[tuple[int, float]]:
    """`n` heavy requests at once: (status, seconds) each."""

    def one(_: int) -> tuple[int, float]:
        began = time.perf_counter()
        response = server.call("/v1/generate", HEAVY)
        if response.status_code != 200:
            assert set(response.json()["error"]) == {"message", "type"}, response.text
        return response.status_code, time.perf_counter() - began

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


# ---- two nodes, one lost --------------------------------------------------------------------------------
LIGHT = {"prompts": ["1"], "output_format": "npy"}


@dataclasses.dataclass
class Call:
    began: float
    ended: float
    status: int
    node: str | None
    error: str | None


def test_losing_a_node_fails_only_its_requests_in_flight(server: Server, ray_cluster) -> None:
    head = ray_cluster.head_node.node_id
    worker = next(iter(ray_cluster.worker_nodes))
    nodes = Counter(call.node for call in _run(server, 16, concurrency=4))
    assert set(nodes) == {head, worker.node_id}, nodes  # two replicas, one a node, both served

    calls: list[Call] = []
    killed_at = gone_at = 0.0  # remove_node's call and return (its workers die soon after)

    def kill_when_busy() -> None:
        nonlocal killed_at, gone_at
        while sum(c.status == 200 for c in calls) < 12:
            time.sleep(0.01)
        killed_at = time.perf_counter()
        ray_cluster.remove_node(worker, allow_graceful=False)  # its raylet and agents, by PID
        gone_at = time.perf_counter()

    with concurrent.futures.ThreadPoolExecutor(1) as killer:
        killing = killer.submit(kill_when_busy)
        _run(server, 48, concurrency=4, into=calls)
        killing.result()
    failed = [c for c in calls if c.status != 200]
    in_flight = [c for c in calls if c.began < killed_at < c.ended]  # on either node at the kill
    print(f"48 requests, a node killed after 12 answers ({gone_at - killed_at:.2f} s): {len(failed)} failed")
    assert in_flight  # the kill did land mid-run (else nothing below would be tested)
    assert all(c.status == 503 and "lost" in (c.error or "") for c in failed), failed
    assert len(failed) <= len(in_flight) <= 4  # at most the requests in flight at once
    # every failed request was out at one moment (the loss), none had ended before the kill, and
    # once the first failure came back (the loss was known) every request went to the head
    assert not failed or max(c.began for c in failed) < min(c.ended for c in failed)
    assert all(c.status == 200 for c in calls if c.ended < killed_at)
    known = min((c.ended for c in failed), default=float("inf"))
    assert all(c.status == 200 and c.node == head for c in calls if c.began > known)

    ray_cluster.add_node(num_cpus=2)  # a node joins: the lost replica is placed on it
    deadline = time.monotonic() + 120
    while True:
        recent = _run(server, 8, concurrency=4)
        if all(c.status == 200 for c in recent) and len({c.node for c in recent}) == 2:
            break
        assert time.monotonic() < deadline, recent
        time.sleep(1)


def _run(server: Server, n: int, *, concurrency: int, into: list[Call] | None = None) -> list[Call]:
    """`n` light requests, `concurrency` at a time, appended to `into` as each ends."""
    calls = [] if into is None else into

    def one(_: int) -> None:
        began = time.perf_counter()
        response = server.call("/v1/generate", LIGHT)
        error = None if response.status_code == 200 else response.json()["error"]["message"]
        node = response.headers.get("X-Starflow-Node")
        calls.append(Call(began, time.perf_counter(), response.status_code, node, error))

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(n)))
    return calls


# ---- helpers ----------------------------------------------------------------------------------------------
def _replica_rss(cluster) -> dict[int, float]:
    """Resident MiB of each digits replica process of `cluster` (children of its raylets)."""
    from ray._private import ray_constants

    raylets = {
        node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
        for node in [cluster.head_node, *cluster.worker_nodes]
    }
    rss = {}
    for proc in Path("/proc").iterdir():
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode()
            if parent in raylets and title.startswith(REPLICA_TITLE):
                status = (proc / "status").read_text()
                kib = int(status.split("VmRSS:")[1].split()[0])
                rss[int(proc.name)] = round(kib / 1024, 1)
        except (OSError, ValueError, IndexError):
            continue  # not a process, or it ended while being read
    return rss


def _lines(process: subprocess.Popen) -> list[str]:
    """The process's stdout lines, collected by a thread as they come."""
    lines: list[str] = []
    assert process.stdout is not None
    threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()  # type: ignore[arg-type]
    return lines


def _wait_for_line(process: subprocess.Popen, lines: list[str], text: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        found = [line for line in lines if text in line]
        if found:
            return found[0]
        time.sleep(0.2)
    pytest.fail(f"starflow serve did not say {text!r}: exit {process.poll()}, output {''.join(lines)!r}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
