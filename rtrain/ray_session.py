"""The one place that starts or joins Ray for rtrain's drivers (fit, tune, predict).

    from rtrain.ray_session import start_ray
    started = start_ray(address, dashboard=False)
    try:
        ...
    finally:
        if started:
            ray.shutdown()

`start_ray` reuses an already initialised Ray as is, joins `address` ("auto" or host:port) when
one is given or, failing that, the cluster in `RAY_ADDRESS` (set for the entrypoint of a Ray job:
`ray job submit -- python -m rtrain.fit ...` joins the job's cluster), and otherwise starts a local
Ray of its own (`address="local"`: never the cluster that another process's `ray start` or
`ray.cluster_utils.Cluster` on this machine recorded in /tmp/ray/ray_current_cluster). It returns
True only when it started one, so the caller shuts down only what it started. See docs/design.md
("The flow") for why the drivers own Ray's lifetime.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def local_num_cpus() -> int:
    """Logical CPUs for a local Ray: at least 4, whatever the core count.

    Ray Data's file listing needs a whole CPU and Ray Train takes its workers' CPUs out of Ray
    Data's budget, so with num_cpus = 2 cores a 1-2 worker run deadlocks ("Cluster resources are
    not enough"). The work itself is still bounded by the real cores; only the scheduler's count
    grows.
    """
    return max(4, os.cpu_count() or 1)


def start_ray(address: str | None = None, *, dashboard: bool = False,
              dashboard_host: str = "127.0.0.1") -> bool:
    """Join `address`, reuse an initialised Ray, or start a local one. True if this started it.

    dashboard: start the local Ray's dashboard on `dashboard_host`. Ray Train's state tracking
    (what the dashboard's Train view reads) is turned on with a dashboard: the local one, or a
    joined cluster's. A cluster without one gets none: Ray Train's state actor would poll the
    dashboard's State API every 30 s and print a traceback each time it finds no server.
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    address = address or os.environ.get("RAY_ADDRESS") or None  # a Ray job's entrypoint has it
    if dashboard:
        os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    if address:
        context = ray.init(address=address, configure_logging=False)
        logger.info("joined the Ray cluster at %s", address)
        if context.dashboard_url:  # its dashboard shows the run in its Train view
            os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
        return False
    context = ray.init(
        address="local",
        num_cpus=local_num_cpus(),
        include_dashboard=dashboard,
        dashboard_host=dashboard_host,
        configure_logging=False,
    )
    if dashboard:
        logger.info("Ray dashboard: http://%s (token: run `ray get-auth-token`)", context.dashboard_url)
    return True
