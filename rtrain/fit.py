"""python -m rtrain.fit: train a detector on Ray Train (streaming data, checkpoints, resume).

    python -m rtrain.fit                                     # built-in quickstart (synthetic shapes)
    python -m rtrain.fit --config configs/bccd.yaml --workers 2 --set train.epochs=50
    python -m rtrain.fit --config configs/coco.yaml --gpus 8 --address auto
    python -m rtrain.fit --config configs/coco.yaml --gpus 4:8 --address auto   # elastic: 4 to 8 GPUs
    python -m rtrain.fit --resume [--name RUN] [--set train.epochs=80]   # continue a run

Exit status: 0 done, 2 bad input (one line on stderr), 1 training failed, 130 interrupted,
75 preempted (a SIGTERM: the run checkpointed, or ran out of run.grace_s; the line on stderr
gives the `--resume` command).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from rtrain.cli import OneLineParser, quiet_ray_terminal, run_cli
from rtrain.config import ConfigError, add_config_arguments, parse_worker_count


def worker_count(option: str):
    """argparse type of --workers/--gpus: an int, or the "MIN:MAX" string of an elastic run."""

    def parse(text: str) -> int | str:
        value: int | str = int(text) if text.strip().isdigit() else text
        try:
            parse_worker_count(value, option)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{option}: ")) from None
        return value

    parse.__name__ = "worker count"  # argparse names the type in its message
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m rtrain.fit", description=__doc__.split("\n")[0],
                      epilog="Without --config (and without --resume) the built-in quickstart runs: it makes "
                             "./data/synthetic and its shards if absent, then trains for a few minutes.")
    add_config_arguments(p)
    p.add_argument("--gpus", type=worker_count("--gpus"), metavar="N|MIN:MAX",
                   help="GPU workers, one GPU each (run.gpus); MIN:MAX is an elastic run")
    p.add_argument("--workers", type=worker_count("--workers"), metavar="N|MIN:MAX",
                   help="CPU workers when --gpus is 0 (run.workers; 0 runs as 1); MIN:MAX is an elastic run: "
                        "it goes on with fewer workers when a node is lost and grows back when the cluster "
                        "does, the global batch fixed at train.batch_size x MAX")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs reserved per worker (run.cpus_per_worker)")
    p.add_argument("--address", help="join this Ray cluster ('auto' or host:port) instead of starting one")
    p.add_argument("--name", help="run name (default: <config stem>-<time>; with --resume: the latest run)")
    p.add_argument("--storage", help="folder that holds the runs (run.storage, default ./runs)")
    p.add_argument("--resume", action="store_true", help="continue a run from its last checkpoint")
    p.add_argument("--dashboard", action="store_true", default=None,
                   help="start the Ray dashboard (local Ray only; token: `ray get-auth-token`)")
    p.add_argument("--dashboard-host", help="dashboard bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots at the end")
    p.add_argument("--verbose", action="store_true",
                   help="show all of Ray's output: its start-up and worker-group lines, Ray Data's "
                        "progress bars, deprecation warnings (hidden by default; always in Ray's logs)")
    p.add_argument("--data-root", default=None,
                   help="quickstart only: where the synthetic data lives (default ./data/synthetic)")
    return p


@run_cli("rtrain.fit")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_ray_terminal(verbose=args.verbose)
    from rtrain.training.runner import PreemptedError, fit

    config = args.config
    try:
        if config is None and not args.resume:
            from rtrain.training import quickstart

            root = args.data_root or quickstart.DEFAULT_ROOT
            quickstart.prepare_synthetic(root)
            config = quickstart.quickstart_config_dict(root)
            args.name = args.name or f"quickstart-{time.strftime('%Y%m%d-%H%M%S')}"
        result = fit(
            config, overrides=args.overrides, gpus=args.gpus, workers=args.workers,
            cpus_per_worker=args.cpus_per_worker, address=args.address, name=args.name,
            storage=args.storage, resume=args.resume, dashboard=args.dashboard,
            dashboard_host=args.dashboard_host, plots=not args.no_plots, preemptible=True,
        )
    except PreemptedError as exc:
        print(f"rtrain: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("rtrain.fit: interrupted; `python -m rtrain.fit --resume` continues from the last checkpoint",
              file=sys.stderr)
        return 130
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
