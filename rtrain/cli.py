"""What every rtrain CLI shares: one parser, one error rule, a readable terminal.

    from rtrain.cli import OneLineParser, run_cli

    def build_parser() -> OneLineParser: ...

    @run_cli("rtrain.evaluate", parser=build_parser)
    def main(args) -> int:          # called as main(argv): parses, sets up logging, runs
        ...

A bad argument (argparse) and an RtrainError or data_prep DatasetError (rtrain.errors) are each
one line `PROG: error: MESSAGE` on stderr; the exit status is 2 for bad input, or the error's
`exit_code` (1 for a run that started and failed).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from collections.abc import Callable

from data_prep.records import DatasetError
from rtrain.errors import BAD_INPUT, RtrainError

# Lines Ray forwards from its processes that say nothing to someone watching a training run:
# Ray Train's placement-group cleaner retrying the State API (served only with a dashboard),
# every report's whole metrics dict and checkpoint path (our one line per epoch says it),
# Ray Data's per-epoch execution banners (full logs stay in the session's ray-data log files),
# and pycocotools' index messages. Matched by Ray's log deduplicator, which drops them.
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
])


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
    traceback.

    Without `parser` the decorated function is `main(argv) -> int` itself. With `parser` (a
    build_parser function) it is `body(args) -> int` and the result is `main(argv)`, which parses
    argv and sets up logging (`log_level`, bare messages) before calling it.
    """
    caught = (RtrainError, DatasetError, *also)

    def wrap(body: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(body)
        def guarded(*args, **kwargs) -> int:
            try:
                return body(*args, **kwargs)
            except caught as exc:
                return error_exit(prog, exc)

        if parser is None:
            return guarded

        @functools.wraps(body)
        def main(argv: list[str] | None = None) -> int:
            args = parser().parse_args(argv)
            logging.basicConfig(level=log_level, format="%(message)s")
            return guarded(args)

        return main

    return wrap


def quiet_ray_terminal() -> None:
    """Before Ray is imported: drop QUIET_RAY_LINES from the driver's terminal (the user's own
    RAY_DEDUP_LOGS_SKIP_REGEX wins) and keep Ray Data's driver-side INFO lines in its log files."""
    os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", QUIET_RAY_LINES)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
