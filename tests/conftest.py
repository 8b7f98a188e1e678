"""Shared fixtures: the read-only real datasets, and one Ray cluster per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout; a git worktree one level deeper finds it further up.
SHARED_DATA = next((p / "shared" / "data" for p in REPO_ROOT.parents if (p / "shared" / "data").is_dir()),
                   REPO_ROOT.parent / "shared" / "data")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data: BCCD and raccoon (VOC), coco128 (COCO). Read-only: never write here."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_session():
    """One Ray cluster of two nodes (on this machine) for the whole test session, always shut down.

    Two nodes so that the multi-node tests place workers on different nodes and every
    other Ray test runs against a cluster it joined, as on a real one. 2 logical CPUs
    per node, 4 in all on a 2-core machine: Ray Data's file listing needs a whole CPU
    and Train removes its workers' CPUs from Ray Data's budget, so with 2 logical CPUs
    in all a 2-worker run deadlocks (../shared/RAY_NOTES.md).
    Tests that need the address use `ray.get_runtime_context().gcs_address`.
    """
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    node = {"num_cpus": 2, "object_store_memory": 256 * 1024**2}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        cluster.add_node(**node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)
        yield ray
    finally:
        ray.shutdown()
        cluster.shutdown()
