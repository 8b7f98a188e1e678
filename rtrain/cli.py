"""What every rtrain CLI shares: argument errors as one line and exit status 2; a readable terminal.

Also the one `rtrain` command (`main`, the console script; `python -m rtrain` runs it too):
`rtrain fit ...` is `python -m rtrain.fit ...` with the same flags, and so on for every command
in COMMANDS.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

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


# `rtrain NAME ...` runs `main(argv)` of this module; the line is what `rtrain --help` says of it.
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("rtrain.fit", "train a detector on Ray Train (no arguments: the quickstart)"),
    "tune": ("rtrain.tune", "architecture and batch-size search on Ray Tune (ASHA on val mAP)"),
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
