"""A quiet default terminal: Ray's internals are dropped from what rtrain.fit / rtrain.tune print
(they stay in Ray's log files) and --verbose shows them.

The units need no Ray; the last test runs the quick-start CLI path against the session's cluster
(a subprocess with --address, as tests/e2e/test_faults.py runs its driver) and reads what it printed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rtrain import cli

ROOT = Path(__file__).resolve().parents[2]

# Lines Ray's processes forwarded to the driver in real runs of this repository (from the worker
# logs of a Ray session; ids and paths shortened), which a default run must not print.
RAY_INTERNAL_LINES = [
    "(pid=gcs_server) [2026-12-02 07:04:07,411 E 11813 11813] (gcs_server) gcs_actor_scheduler.cc:538: "
    "Failed to kill actor 56bcef97e3ca8c721ee0d8d204000000, return status: Invalid: KillActor RPC failed for "
    "actor 56bcef97e3ca8c721ee0d8d204000000: RpcError: RPC error: Socket closed rpc_code: 14",
    "[2026-12-01 21:45:55,989 E 26948 26977] core_worker.cc:2465: Actor with class name: "
    "'PreemptionWatcher' and ID: '5e6536a2c8a9c668482d371001000000' has constructor arguments in the "
    "object store and max_restarts > 0. If the arguments in the object store go out of scope or are lost, "
    "the actor restart will fail. See https://github.com/ray-project/ray/issues/53727 for more details.",
    "/usr/lib/python3.11/site-packages/ray/data/_internal/execution/interfaces/execution_options.py:436: "
    "RayDeprecationWarning: `ExecutionOptions.exclude_resources` is deprecated and will be removed after "
    "January 2027. Use `ExecutionOptions.label_selector` to constrain Ray Data work to labeled nodes.",
    "Requesting resources: {'CPU': 1.0} * 2",
    "Attempting to start training worker group of size 2 with the following resources: [{'CPU': 1.0}] * 2",
    "Started training worker group of size 2: ",
    "- (ip=192.0.2.2, pid=27066) world_rank=0, local_rank=0, node_rank=0",
    "Setting up process group for: env:// [rank=0, world_size=2]",
    "Moving model to device: cpu",
    "Wrapping provided model in DistributedDataParallel.",
    "Failed to query Ray Train Controller actor state. State API may be temporarily unavailable.",
    "Progress bars disabled. To enable, set `ray.data.DataContext.get_current().enable_progress_bars`.",
    "Starting execution of Dataset train_1_0. Full logs are in /tmp/ray/session_latest/logs/ray-data",
    "A run snapshot was found in storage folder at: '/tmp/runs/e2e'",
    "WARNING: 10 PYTHON worker processes have been started on node: 841169ba4212db419e3aa1bf57bfa31d1d98882"
    "ca45f2aa4ca8d47e0 with address: 192.0.2.2, which is 5x the maximum expected startup concurrency (2). "
    "This could be a result of using a large number of actors, tasks blocked in ray.get() calls, or tasks "
    "with fractional CPU requests (e.g., num_cpus=0.1) allowing high concurrency.",
    "Truncating long operator name to 100 characters. To disable this behavior, set `ray.data...`.",
    "(TrainController pid=3214) [State Transition] INITIALIZING -> SCHEDULING.",
    "(TrainController pid=3214) [State Transition] SCHEDULING -> RUNNING.",
]
# What a run must keep printing: rtrain's own lines, and Ray's errors.
KEPT_LINES = [
    "epoch 1/9  25.1s  loss 2.3100 (cls 1.000 box 0.500 dfl 0.800)  mAP -  lr 0.00100  19.0 img/s  "
    "data-wait 4%  ETA 0:02:10",
    "epoch 3 step 40/120 31.5 img/s loss 2.310 data-wait 4% ETA 0:00:28",
    "data: 480 images, 480 per epoch in batches of 8 per worker (decoded in blocks of 16); decode on cpu "
    "(1 Ray actors)",
    "Traceback (most recent call last):",
    "ray.train.WorkerGroupError: Training failed due to worker errors:",
    "RuntimeError: [gloo/transport/tcp/pair.cc:534] Read error: Connection reset by peer.",
]


def test_skip_list_drops_rays_internals_and_keeps_rtrains_lines_and_errors():
    skip = re.compile(cli.QUIET_RAY_LINES)
    assert [ln for ln in RAY_INTERNAL_LINES if not skip.search(ln)] == []
    assert [ln for ln in KEPT_LINES if skip.search(ln)] == []


def test_runtime_env_hook_adds_the_quiet_settings_and_keeps_the_users():
    from ray.runtime_env import RuntimeEnv

    env = cli.quiet_runtime_env(None)
    assert env == {"env_vars": cli.QUIET_ENV_VARS, "worker_process_setup_hook": cli.QUIET_WORKER_HOOK}
    RuntimeEnv(**env)  # a runtime env Ray accepts
    theirs = cli.quiet_runtime_env({"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "0", "A": "1"},
                                    "worker_process_setup_hook": "mine.setup", "pip": ["x"]})
    assert theirs["env_vars"] == {"RAY_DATA_DISABLE_PROGRESS_BARS": "0", "A": "1"}
    assert theirs["worker_process_setup_hook"] == "mine.setup" and theirs["pip"] == ["x"]
    assert cli.quiet_runtime_env.__module__ + ".quiet_runtime_env" == cli.QUIET_RUNTIME_ENV_HOOK
    assert cli.quiet_worker.__module__ + ".quiet_worker" == cli.QUIET_WORKER_HOOK


QUIET_VARS = ("RAY_DEDUP_LOGS_SKIP_REGEX", "RAY_DATA_DISABLE_PROGRESS_BARS", "RAY_RUNTIME_ENV_HOOK")


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in QUIET_VARS}
    base["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**base, **env}, capture_output=True,
                          text=True, timeout=120)


def test_worker_hook_makes_rays_deprecation_warnings_one_line(tmp_path):
    script = tmp_path / "warn.py"  # a file, so that warnings can show their source line
    script.write_text(
        "import warnings\n"
        "from ray.util.annotations import RayDeprecationWarning\n"
        "from rtrain.cli import quiet_worker\n"
        "quiet_worker()\n"
        "warnings.warn('old API', RayDeprecationWarning)\n"
        "warnings.warn('user warning', UserWarning)\n"
    )
    out = _python(f"exec(compile(open({str(script)!r}).read(), {str(script)!r}, 'exec'))")
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines() == [
        f"{script}:5: RayDeprecationWarning: old API",  # one line: the skip list drops it whole
        f"{script}:6: UserWarning: user warning",  # other warnings as Python prints them
        "  warnings.warn('user warning', UserWarning)",
    ]


CHECK_TERMINAL = (
    "import logging, os, sys, warnings\n"
    "from rtrain.cli import quiet_ray_terminal\n"
    "quiet_ray_terminal(verbose=len(sys.argv) > 1)\n"
    "from ray.util.annotations import RayDeprecationWarning\n"
    "warnings.warn('old API', RayDeprecationWarning)\n"
    "print(os.environ.get('RAY_DEDUP_LOGS_SKIP_REGEX') is not None,\n"
    "      os.environ.get('RAY_DATA_DISABLE_PROGRESS_BARS'), os.environ.get('RAY_RUNTIME_ENV_HOOK'))\n"
    "import ray.data\n"
    "print(ray.data.DataContext.get_current().enable_progress_bars)\n"
    "print(sorted({logging.getLevelName(h.level) for n in ('ray', 'ray.data')\n"
    "              for h in logging.getLogger(n).handlers if not isinstance(h, logging.FileHandler)}))\n"
    "log = logging.getLogger('ray._private.authentication.authentication_token_setup')\n"
    "log.warning('Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled')\n"
    "log.warning('Token authentication is disabled for this Ray cluster. Anyone with network access')\n"
)


def test_default_terminal_is_quiet_and_verbose_leaves_ray_alone():
    quiet = _python(CHECK_TERMINAL)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout.splitlines() == [f"True 1 {cli.QUIET_RUNTIME_ENV_HOOK}", "False", "['WARNING']"]
    assert "RayDeprecationWarning" not in quiet.stderr
    assert "is enabled for this Ray cluster" not in quiet.stderr  # a notice that needs no action
    assert "Token authentication is disabled for this Ray cluster" in quiet.stderr  # a warning does
    verbose = _python(CHECK_TERMINAL.replace("len(sys.argv) > 1", "True"))
    assert verbose.returncode == 0, verbose.stderr
    assert verbose.stdout.splitlines()[:2] == ["False None None", "True"]
    assert "WARNING" not in verbose.stdout.splitlines()[2]
    assert "RayDeprecationWarning: old API" in verbose.stderr
    assert "Token authentication is enabled for this Ray cluster" in verbose.stderr


def test_a_local_ray_start_prints_no_token_notice():
    """A real local start (the quick start's): `start_ray`'s ray.init(configure_logging=False) takes
    the "ray" logger's handlers away, and the notice then reached the terminal through the root's."""
    code = ("from rtrain.cli import quiet_ray_terminal\nquiet_ray_terminal()\n"
            "import ray\nfrom rtrain.ray_session import start_ray\nassert start_ray()\nray.shutdown()\n"
            "print('started')\n")
    env = {k: v for k, v in os.environ.items() if k not in (*QUIET_VARS, "RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "started", out.stderr[-3000:]
    assert "Token authentication is enabled" not in out.stderr, out.stderr[-3000:]


def test_fit_and_tune_take_verbose():
    from rtrain import fit, tune

    assert fit.build_parser().parse_args(["--verbose"]).verbose
    assert tune.build_parser().parse_args(["--verbose"]).verbose
    assert not fit.build_parser().parse_args([]).verbose


# Lines of Ray's internals a default run must not print (the three, and their kind).
FORBIDDEN = re.compile("|".join([
    "tqdm is not installed", "core_worker\\.cc", "PreemptionWatcher", "max_restarts", "RayDeprecationWarning",
    "__ray_tqdm_magic_token__", "Attempting to start training worker group", "Reporting training result",
    "Setting up process group", "Connecting to existing Ray cluster", "Started a local Ray instance",
    "Running Dataset", "Truncating long operator name", "Token authentication is enabled",
]))
# rtrain's own: "run ...", "joined the Ray cluster ...", "data: ...", and room for two more. On a
# loaded machine the first step is slow enough for a progress line ("epoch 1 step 1/2") to come
# before the epoch's line: either is rtrain's first training line.
MAX_LINES_BEFORE_FIRST_EPOCH = 5


@pytest.mark.ray
@pytest.mark.slow
def test_quickstart_cli_prints_rtrains_lines_and_none_of_rays_internals(ray_session, tmp_path):
    from rtrain.training.quickstart import prepare_synthetic

    root = tmp_path / "synthetic"
    prepare_synthetic(root, images=40, size=96, seed=3)  # the quick start finds its data made
    address = ray_session.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "rtrain.fit", "--data-root", str(root), "--address", address,
           "--storage", str(tmp_path / "runs"), "--no-plots",
           "--set", "train.epochs=1", "train.time_limit_min=0", "data.img_size=64", "eval.interval=1"]
    env = {k: v for k, v in os.environ.items() if k not in QUIET_VARS}  # the CLI's own default
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    log = tmp_path / "driver.log"
    with log.open("w") as sink:  # a file, not a pipe: a full pipe would stall the driver
        done = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, timeout=600)
    lines = log.read_text().splitlines()
    assert done.returncode == 0, "\n".join(lines[-40:])
    bad = [ln for ln in lines if FORBIDDEN.search(ln)]
    assert bad == [], "\n".join(bad)
    first = next((i for i, ln in enumerate(lines) if re.search(r"epoch 1(/1  | step )", ln)), None)
    assert first is not None, "\n".join(lines)
    assert first <= MAX_LINES_BEFORE_FIRST_EPOCH, "\n".join(lines[:first + 1])
