"""End to end: the README's cluster commands ("More than one machine"), run as written.

Starts its own head node with `ray start --head` (127.0.0.1, its own temp dir and ports, token
authentication on as Ray 2.60 sets it), submits a one-epoch quick-start `python -m rtrain.fit` with
`ray job submit`, and reads the run back from the dashboard's Train API with the token. The head is
always stopped at the end: its processes, found by the temp dir in their command lines, are killed
by pid (`ray stop` would stop every Ray on the machine). About 2-4 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` CLI of this interpreter


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _pids_under(temp_dir: str) -> list[int]:
    """Processes whose command line names `temp_dir` (this head's raylet, GCS, dashboard, workers)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if temp_dir in cmdline:
            pids.append(int(proc.name))
    return pids


def _stop_head(temp_dir: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _pids_under(temp_dir)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while pids and _pids_under(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.5)


def _train_runs(dashboard: str, token: str | None, patience_s: float = 240) -> tuple[int, dict]:
    """(HTTP status, JSON body) of the dashboard's Train runs; a busy dashboard gets retried."""
    req = urllib.request.Request(f"{dashboard}/api/train/v2/runs/v1")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    deadline = time.monotonic() + patience_s
    while True:
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, {}
        except (TimeoutError, urllib.error.URLError):
            if time.monotonic() > deadline:
                raise
            time.sleep(5)


@pytest.mark.e2e
@pytest.mark.slow
def test_ray_job_submit_trains_and_the_run_shows_in_the_train_api(tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    gcs, dash, client, node_mgr, obj_mgr, agent, agent_grpc, metrics, env_agent = _free_ports(9)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")  # the job imports this tree
    # The raylet waits for its dashboard agent to come up and aborts the head when it is late (here
    # after 15 s at load 60: "Timed out waiting for file .../dashboard_agent"). Longer for this head.
    head_env = {**env, "RAY_agent_register_timeout_ms": "180000"}
    dashboard = f"http://127.0.0.1:{dash}"
    try:
        start = subprocess.run(
            [*RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
             "--ray-client-server-port", str(client), "--node-manager-port", str(node_mgr),
             "--object-manager-port", str(obj_mgr), "--dashboard-agent-listen-port", str(agent),
             "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
             "--runtime-env-agent-port", str(env_agent), "--temp-dir", temp_dir, "--num-cpus", "4",
             "--disable-usage-stats"],
            env=head_env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
        assert start.returncode == 0, start.stdout[-2000:] + start.stderr[-2000:]
        # the quick start's synthetic data, made small here (the job finds it and makes none)
        from rtrain.training.quickstart import prepare_synthetic

        prepare_synthetic(tmp_path / "data", images=40, size=128)
        entry = ["python", "-m", "rtrain.fit", "--name", "jobrun", "--storage", str(tmp_path / "runs"),
                 "--data-root", str(tmp_path / "data"), "--no-plots", "--set", "train.epochs=1"]
        submit = [*RAY, "job", "submit", "--address", dashboard, "--", *entry]

        no_token = subprocess.run(submit, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert no_token.returncode != 0
        assert "Missing authentication token" in no_token.stdout + no_token.stderr
        assert _train_runs(dashboard, None)[0] == 401

        token = subprocess.run([*RAY, "get-auth-token"], env=env, capture_output=True, text=True,
                               check=True, timeout=60).stdout.strip()
        assert token
        authed = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
        job = subprocess.run(submit, env=authed, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout, job.stdout[-3000:]
        metrics = (tmp_path / "runs" / "jobrun" / "metrics.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in metrics]
        assert len(rows) == 1 and rows[0]["evaluated"] and rows[0]["steps"] > 0

        status, body = _train_runs(dashboard, token)
        assert status == 200, body
        runs = [r for r in body.get("train_runs", body.get("runs", [])) if r.get("name") == "jobrun"]
        assert runs, json.dumps(body)[:2000]
        assert runs[0].get("status") == "FINISHED", runs[0]
    finally:
        _stop_head(temp_dir)
    assert not _pids_under(temp_dir), "the test's Ray head outlived it"
    shutil.rmtree(temp_dir, ignore_errors=True)  # kept when the test fails: the head's logs are there
