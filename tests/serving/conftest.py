"""One two-node Ray cluster on this machine for every serving test that needs Ray."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

NODE_CPUS = 2  # logical CPUs each node offers (Ray's accounting; the machine may have fewer cores)


@pytest.fixture(scope="session")
def ray_cluster(isolated_cache: Path) -> Iterator[object]:
    """A head and a worker node (`ray.cluster_utils.Cluster`), started after the session's cache
    is set so their workers inherit STARFLOW_CACHE; stopped by Cluster's own shutdown, which
    kills only its nodes' processes."""
    pytest.importorskip("ray.serve")
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": NODE_CPUS, "include_dashboard": False}
    )
    try:
        cluster.add_node(num_cpus=NODE_CPUS)
        yield cluster
    finally:
        ray.shutdown()  # a test that connected this process must let go before the head is removed
        cluster.shutdown()
