"""rtrain.ray_session.start_ray against a real cluster: joining one turns on Ray Train's state
tracking only where the cluster serves a dashboard (its Train view reads it; without one, Ray
Train's state actor prints a State API traceback every 30 s of a run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

JOIN = (
    "import os, sys\n"
    "from rtrain.ray_session import start_ray\n"
    "print('started', start_ray(sys.argv[1]))\n"
    "print('tracking', os.environ.get('RAY_TRAIN_ENABLE_STATE_TRACKING'))\n"
)


@pytest.mark.ray
def test_joining_a_cluster_without_a_dashboard_leaves_state_tracking_off(ray_session):
    address = ray_session.get_runtime_context().gcs_address  # the session cluster has no dashboard
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_TRAIN_ENABLE_STATE_TRACKING", "RAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", JOIN, address], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[-2:] == ["started False", "tracking None"]
