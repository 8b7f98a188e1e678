"""What every rtrain CLI shares: one parser, one error rule, a readable terminal.

    from rtrain.cli import OneLineParser, run_cli

    def build_parser() -> OneLineParser: ...

    @run_cli("rtrain.evaluate", parser=build_parser)
    def main(args) -> int:          # called as main(argv): parses, sets up logging, runs
        ...

A bad argument (argparse) and an RtrainError or data_prep DatasetError (rtrain.errors) are each
one line `PROG: error: MESSAGE` on stderr; the exit status is 2 for bad input, or the error's
`exit_code` (1 for a run that started and failed).

Also the one `rtrain` command (`main`, the console script; `python -m rtrain` runs it too):
`rtrain fit ...` is `python -m rtrain.fit ...` with the same flags, and so on for every command
in COMMANDS.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import os
import re
import sys
from collections.abc import Callable

from data_prep.records import DatasetError
from rtrain.errors import BAD_INPUT, RtrainError

# Lines Ray forwards from its processes that say nothing to someone watching a training run:
# Ray Train's placement-group cleaner retrying the State API (served only with a dashboard),
# every report's whole metrics dict and checkpoint path (our one line per epoch says it),
# Ray Data's per-epoch execution banners (full logs stay in the session's ray-data log files),
# and pycocotools' index messages. Matched by Ray's log deduplicator, which drops them from the
# driver's terminal only: the workers' log files under /tmp/ray/session_latest/logs keep them.
QUIET_RAY_LINES = "|".join([
    "Failed to query Ray Train Controller actor state",
    "Reporting training result",
    "Checkpoint successfully created at",
    "execution finished in [0-9.]+ seconds",
    "Starting execution of Dataset",
    "Execution plan of Dataset",
    "A new progress UI is available",
    "Estimated parquet",
    "creating index\\.\\.\\.",
    "index created!",
    # Ray Train starting its worker group and torch in each worker (our "run" and "data" lines
    # say what runs where), and its restore notice on a resumed run (our "resuming" line says it).
    "Requesting resources: ",
    "Attempting to start training worker group",
    "Started training worker group of size",
    "^- \\(ip=[^)]*\\) world_rank=",
    "Setting up process group for: ",
    "Moving model to device: ",
    "Wrapping provided model in DistributedDataParallel",
    "A run snapshot was found in storage folder",
    "This snapshot contains a list of checkpoints",
    "If you meant to start a brand new training job",
    # Ray Train's controller announcing its own state machine (INITIALIZING -> SCHEDULING -> RUNNING).
    "\\[State Transition\\] [A-Z_]+ -> ",
    # Ray core's ERROR line about Ray Train's own PreemptionWatcher actor (core_worker.cc).
    "has constructor arguments in the object store and max_restarts",
    # The GCS's ERROR line about an actor on a node that is gone (after a lost node, e.g. an
    # elastic run's): there is nothing to kill, and the run's own lines say what it does next.
    "Failed to kill actor [0-9a-f]+, return status: Invalid: KillActor RPC failed",
    # The raylet's note that a busy node started workers faster than it expected (a load
    # remark about Ray's own worker pool, nothing the user can act on).
    "PYTHON worker processes have been started on node: ",
    # Ray's deprecation warnings about Ray's own calls (made one line each: quiet_worker).
    "RayDeprecationWarning: ",
    # Ray Data's notes that its progress bars are off (RAY_DATA_DISABLE_PROGRESS_BARS, below).
    "Progress bars disabled\\. To enable",
    "Progress will be logged because stdout",
    "Registered dataset logger for dataset",
    "Truncating long operator name to",
])

# Ray's driver-side WARNING lines that need no action: the notice that token authentication is on
# (the README says so; its "is disabled" warning still shows). Also filtered on the logger that
# makes it: ray.init(configure_logging=False), as rtrain.ray_session starts Ray, takes the "ray"
# logger's handlers away, and the notice then reaches the root logger's handlers.
QUIET_DRIVER_LINES = "Token authentication is enabled for this Ray cluster"
QUIET_DRIVER_LOGGER = "ray._private.authentication.authentication_token_setup"

# What the quiet default changes in every Ray process of the job (ray.init's runtime env, through
# Ray's RAY_RUNTIME_ENV_HOOK, so a joined cluster's workers get it too): no Ray Data progress bars
# (tqdm_ray bars of every operator on the driver's terminal), one-line Ray deprecation warnings.
QUIET_ENV_VARS = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
QUIET_RUNTIME_ENV_HOOK = "rtrain.cli.quiet_runtime_env"
QUIET_WORKER_HOOK = "rtrain.cli.quiet_worker"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr (usage is behind --help), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def error_exit(prog: str, exc: BaseException) -> int:
    """Print `prog: error: <first line of exc>` on stderr; the exit status the CLI returns."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    print(f"{prog}: error: {line}", file=sys.stderr)
    return int(getattr(exc, "exit_code", BAD_INPUT))


def run_cli(prog: str, *, also: tuple[type[BaseException], ...] = (),
            parser: Callable[[], argparse.ArgumentParser] | None = None, log_level: int = logging.WARNING):
    """Decorate a CLI's main: RtrainError / DatasetError (and the `also` types, for plain exceptions
    a CLI has always reported as bad input) become `error_exit`'s line and status instead of a
    traceback. Output into a closed pipe (`python -m rtrain.models | head`) ends it with status 1
    and no traceback.

    Without `parser` the decorated function is `main(argv) -> int` itself. With `parser` (a
    build_parser function) it is `body(args) -> int` and the result is `main(argv)`, which parses
    argv and sets up logging (`log_level`, bare messages) before calling it.
    """
    caught = (RtrainError, DatasetError, *also)

    def wrap(body: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(body)
        def guarded(*args, **kwargs) -> int:
            try:
                code = body(*args, **kwargs)
                sys.stdout.flush()  # a reader that has gone (`| head`) shows here, not at exit
                return code
            except caught as exc:
                return error_exit(prog, exc)
            except BrokenPipeError:
                # What Python's docs advise: no traceback, and no second error when Python
                # flushes stdout at exit.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                return 1

        if parser is None:
            return guarded

        @functools.wraps(body)
        def main(argv: list[str] | None = None) -> int:
            args = parser().parse_args(argv)
            logging.basicConfig(level=log_level, format="%(message)s")
            return guarded(args)

        return main

    return wrap


def quiet_ray_terminal(verbose: bool = False) -> None:
    """Before Ray is imported: a terminal that shows rtrain's lines and Ray's warnings and errors.

    Drops QUIET_RAY_LINES from the lines Ray forwards (the user's own RAY_DEDUP_LOGS_SKIP_REGEX
    wins), turns Ray Data's progress bars off, hides Ray's driver-side INFO lines (Ray Data's
    stay in its ray-data.log) and its deprecation warnings about its own calls, and has every
    Ray process of the job print those warnings as one line (so the skip list drops them while
    the workers' log files keep them). `verbose` (--verbose) leaves Ray as it is: everything.
    """
    if verbose:
        return
    os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", QUIET_RAY_LINES)
    for key, value in QUIET_ENV_VARS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("RAY_RUNTIME_ENV_HOOK", QUIET_RUNTIME_ENV_HOOK)
    import warnings

    import ray.data  # noqa: F401  (their imports give the "ray" and "ray.data" loggers their handlers)
    from ray.util.annotations import RayDeprecationWarning

    drop = _DropLines(QUIET_DRIVER_LINES)
    for name in ("ray", "ray.data"):
        for handler in logging.getLogger(name).handlers:
            if not isinstance(handler, logging.FileHandler):  # the terminal; log files keep all
                handler.setLevel(max(handler.level, logging.WARNING))
                handler.addFilter(drop)
    logging.getLogger(QUIET_DRIVER_LOGGER).addFilter(drop)
    warnings.filterwarnings("ignore", category=RayDeprecationWarning)


class _DropLines(logging.Filter):
    """Drops the records whose message matches `pattern`."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_runtime_env(runtime_env):
    """RAY_RUNTIME_ENV_HOOK: ray.init's runtime env plus QUIET_ENV_VARS and the quiet_worker
    setup hook (what the user's runtime env sets is kept)."""
    env = dict(runtime_env or {})
    env["env_vars"] = {**QUIET_ENV_VARS, **(env.get("env_vars") or {})}
    env.setdefault("worker_process_setup_hook", QUIET_WORKER_HOOK)
    return env


def quiet_worker() -> None:
    """Every Ray worker of a quiet job, at start: Ray's deprecation warnings as one line."""
    import warnings

    from ray.util.annotations import RayDeprecationWarning

    format_warning = warnings.formatwarning

    def one_line(message, category, filename, lineno, line=None):
        if issubclass(category, RayDeprecationWarning):
            return f"{filename}:{lineno}: {category.__name__}: {message}\n"
        return format_warning(message, category, filename, lineno, line)

    warnings.formatwarning = one_line


# `rtrain NAME ...` runs `main(argv)` of this module; the line is what `rtrain --help` says of it.
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("rtrain.fit", "train a detector on Ray Train (no arguments: the quickstart)"),
    "tune": ("rtrain.tune", "architecture and batch-size search on Ray Tune (ASHA on val mAP50)"),
    "evaluate": ("rtrain.evaluate", "COCO metrics of weights on val shards"),
    "predict": ("rtrain.predict", "detections for images, folders or shards"),
    "export": ("rtrain.export", "ONNX or TorchScript with a parity check"),
    "visualize": ("rtrain.visualize", "feature maps of a layer for an image"),
    "compare": ("rtrain.compare", "curves of several runs in one plot"),
    "models": ("rtrain.models.__main__", "every registered variant: params, GFLOPs; --layers, --trunk"),
    "shard": ("data_prep.shard", "COCO / VOC / YOLO / ImageNet-LOC -> Parquet shards"),
    "inspect": ("data_prep.inspect", "a shard directory's manifest summary and a contact sheet"),
    "synthetic": ("data_prep.synthetic", "the procedural shapes dataset of the quickstart"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: rtrain COMMAND [ARGS...]    (the same as python -m MODULE [ARGS...])", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "rtrain COMMAND --help shows a command's flags."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`rtrain COMMAND ...`: dispatch to COMMANDS[COMMAND]'s `main(argv)`; exit 2 with one line on
    a missing or unknown command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("rtrain: error: a command is required (see rtrain --help)", file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    if name in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if name == "--version":
        from rtrain import __version__

        print(f"rtrain {__version__}")
        return 0
    if name not in COMMANDS:
        print(f"rtrain: error: unknown command {name!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest)
