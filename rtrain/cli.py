"""What every rtrain CLI shares: argument errors as one line and exit status 2; a readable terminal."""

from __future__ import annotations

import argparse
import logging
import os

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


def quiet_ray_terminal() -> None:
    """Before Ray is imported: drop QUIET_RAY_LINES from the driver's terminal (the user's own
    RAY_DEDUP_LOGS_SKIP_REGEX wins) and keep Ray Data's driver-side INFO lines in its log files."""
    os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", QUIET_RAY_LINES)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
