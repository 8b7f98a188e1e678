"""python -m rtrain.tune: architecture and batch-size search on Ray Tune (ASHA on val mAP50).

    python -m rtrain.tune --config configs/sweep_quickstart.yaml           # synthetic data, 2 CPUs
    python -m rtrain.tune --config configs/sweep_bccd.yaml --num-samples 8 --max-concurrent 1
    python -m rtrain.tune --config configs/sweep_bccd.yaml --gpus-per-trial 0.25 --address auto
    python -m rtrain.tune --resume [--name SWEEP]      # continue the latest (or named) sweep

Writes SWEEP = <storage>/<name>: results.csv/.md (printed at the end), pareto.png, best.yaml
(train it: python -m rtrain.fit --config SWEEP/best.yaml). See rtrain.search.spec (spec format) and
rtrain.search.driver (trials, resources, the placement-group workaround).

Ray dashboard: a sweep that starts its own Ray turns it on at http://127.0.0.1:8265 (this machine
only; the REST API wants `Authorization: Bearer $(ray get-auth-token)`). Each running trial is an
`ImplicitFunc` actor with its `TrainController`, `RayTrainWorker` and Ray Data decode actors beside
it; the Train page lists one run per trial; the Jobs page shows this CLI as the driver. Tune's own
progress table (trial, status, params, tune.metric) is printed here every 30 s.

Exit status: 0 done (failed trials are rows of the table), 2 bad input (one line on stderr),
1 the sweep itself failed, 130 interrupted (--resume continues it).
"""

from __future__ import annotations

import argparse
import logging
import sys

from rtrain.cli import OneLineParser, quiet_ray_terminal, run_cli


def build_parser() -> argparse.ArgumentParser:
    from rtrain.config import add_config_arguments

    p = OneLineParser(prog="python -m rtrain.tune", description=__doc__.split("\n")[0])
    add_config_arguments(p)  # --config SWEEP.yaml, --set section.key=value (tune.* sets the tune: section)
    p.add_argument("--num-samples", type=int, help="samples per grid point (tune.num_samples)")
    p.add_argument("--gpus-per-trial", type=float, help="GPUs per trial, e.g. 0.25 (tune.gpus_per_trial)")
    p.add_argument("--workers-per-trial", type=int, help="Train workers per trial (tune.workers_per_trial)")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs per Train worker (tune.cpus_per_worker)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (tune.max_concurrent; 0 = fit)")
    p.add_argument("--address", help="join this Ray cluster ('auto' or host:port) instead of starting one")
    p.add_argument("--name", help="sweep name (default <config stem>-<time>; with --resume: the latest)")
    p.add_argument("--storage", help="folder of sweeps (default <base run.storage>/sweeps)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep: finished trials are kept, unfinished ones resume")
    p.add_argument("--verbose", action="store_true",
                   help="show all of Ray's output: its start-up and worker-group lines, Ray Data's "
                        "progress bars, deprecation warnings (hidden by default; always in Ray's logs)")
    p.add_argument("--no-dashboard", action="store_true",
                   help="start Ray without its dashboard (stopped trials' worker groups are still freed)")
    return p


@run_cli("rtrain.tune")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_ray_terminal(verbose=args.verbose)
    from rtrain.search.driver import run_sweep
    from rtrain.search.spec import SweepError, load_sweep

    flags = {"num_samples": args.num_samples, "gpus_per_trial": args.gpus_per_trial,
             "workers_per_trial": args.workers_per_trial, "cpus_per_worker": args.cpus_per_worker,
             "max_concurrent": args.max_concurrent}
    try:
        if args.config is None and not args.resume:
            raise SweepError("--config SWEEP.yaml is required (e.g. configs/sweep_quickstart.yaml)")
        spec = load_sweep(args.config, args.overrides, flags) if args.config else None
        result = run_sweep(spec, name=args.name, storage=args.storage, resume=args.resume,
                           address=args.address, dashboard=not args.no_dashboard)
    except KeyboardInterrupt:
        print("rtrain.tune: interrupted; `python -m rtrain.tune --resume` continues the sweep",
              file=sys.stderr)
        return 130
    print(result.summary())
    return 130 if result.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
