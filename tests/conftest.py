"""Shared fixtures: the in-repo real datasets (read-only), and one Ray cluster per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

FIXTURE_DATA = Path(__file__).resolve().parent / "fixtures" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """tests/fixtures/data: a small real selection of BCCD and raccoon (VOC) and coco128 (COCO),
    committed with the tests so that a clone runs the whole suite (README.md there; the full sets
    in ../shared/data are for benchmarks and examples). Read-only: tests copy before they damage."""
    assert FIXTURE_DATA.is_dir(), f"{FIXTURE_DATA}: the repository's fixture datasets are missing"
    return FIXTURE_DATA


@pytest.fixture(scope="session")
def ray_session():
    """One Ray cluster of two nodes (on this machine) for the whole test session, always shut down.

    Two nodes so that the multi-node tests place workers on different nodes and every
    other Ray test runs against a cluster it joined, as on a real one. 2 logical CPUs
    per node, 4 in all on a 2-core machine: Ray Data's file listing needs a whole CPU
    and Train removes its workers' CPUs from Ray Data's budget, so with 2 logical CPUs
    in all a 2-worker run deadlocks (rtrain.ray_session.local_num_cpus).
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


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: small tensors on a shared 2-core machine run faster and
    far steadier without threads contending."""
    from inference_fixtures import one_thread as single

    yield from single()
