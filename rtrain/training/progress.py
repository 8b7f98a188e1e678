"""Progress inside an epoch: plain lines from the worker, a tqdm bar on the driver's terminal.

    epoch 3 step 40/120 31.5 img/s loss 2.310 data-wait 4% ETA 0:00:42

The design, and why:

1. The numbers come from where they are already on the host. `engine.train_one_epoch` reads
   its device sums once every `log_every` steps; its keyword-only `on_progress(step_in_epoch,
   steps_total, stats)` hook is called right there, so progress costs no extra host sync.
   `read_every(device)` picks that interval: every step on the CPU (a read is free there), every
   `GPU_READ_EVERY` steps on a GPU, the steps at which the non-finite guard already drains the
   device (the two reads share one wait for the device, as many as without progress).
2. Rank 0 writes plain lines (`ProgressReporter`): at most one every `interval_s` seconds of
   the epoch, none for the last step (the epoch line follows it). It logs them through the
   `rtrain` logger like the epoch lines, so they reach the driver through Ray's log forwarding
   (a Ray Train worker's output is never a terminal), land in the worker's log file, and read
   well in `ray job logs`, CI and files, where a bar would be a stream of carriage returns.
3. The driver decides the pace (`interval_for`): with stdout on a terminal the worker writes a
   line a second and the driver turns them into one tqdm bar (`attach_bar`); otherwise a line
   every 30 s is printed as it comes. `RTRAIN_PROGRESS_S` overrides the pace (0 = no progress).
   The bar is drawn by wrapping the driver's handler of forwarded lines (Ray's
   "ray_print_logs" stdstream handler, which also draws Ray's own `tqdm_ray` bars): progress
   lines feed the bar, every other line is printed above it. If that handler is not there
   (another Ray version, `log_to_driver=False`), nothing is wrapped and the lines print plainly.

Not chosen: a Ray actor or queue the driver polls. It needs a polling thread beside the blocking
`trainer.fit()`, one more actor per run (and per Tune trial), and still a plain-text path for
jobs whose driver has no terminal; the log line is that path already, and it survives a worker
restart, a driver on another machine and `ray job submit` with nothing to clean up.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)

TERMINAL_INTERVAL_S = 1.0  # driver on a terminal: the bar's update pace
LOG_INTERVAL_S = 30.0  # driver output to a file or a job log: one plain line this often
GUARD_EVERY = 50  # engine.train_one_epoch's NonFiniteGuard sync interval when log_every is 0
GPU_READ_EVERY = GUARD_EVERY  # read the sums where the guard drains the device anyway
ENV_INTERVAL = "RTRAIN_PROGRESS_S"

PROGRESS_LINE = re.compile(
    r"^epoch (?P<epoch>\d+) step (?P<step>\d+)/(?P<total>\d+|\?) (?P<ips>[\d.]+) img/s "
    r"loss (?P<loss>\S+) data-wait (?P<wait>\d+)% ETA (?P<eta>[\d:]+|\?)$"
)
EPOCH_LINE = re.compile(r"^epoch \d+(/\d+)?  ")  # train_loop._log_epoch's line: the epoch is over


def fmt_time(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def format_line(epoch: int, step: int, total: int | None, stats: dict) -> str:
    """The plain progress line. `epoch` as the epoch lines count (1-based); `stats` as
    `engine.train_one_epoch` hands them: images_per_s, loss, data_wait_frac, elapsed_s."""
    elapsed = float(stats.get("elapsed_s", 0.0))
    if total and step > 0:
        eta = fmt_time(elapsed / step * max(0, total - step))
    else:
        eta = "?"
    return (f"epoch {epoch} step {step}/{total or '?'} {float(stats.get('images_per_s', 0.0)):.1f} img/s "
            f"loss {float(stats.get('loss', float('nan'))):.3f} "
            f"data-wait {100 * float(stats.get('data_wait_frac', 0.0)):.0f}% ETA {eta}")


def parse_line(line: str) -> dict | None:
    """The fields of a progress line (None for any other line)."""
    m = PROGRESS_LINE.match(line.strip())
    if m is None:
        return None
    total = m["total"]
    return {"epoch": int(m["epoch"]), "step": int(m["step"]), "total": None if total == "?" else int(total),
            "images_per_s": float(m["ips"]), "loss": m["loss"], "data_wait": int(m["wait"]), "eta": m["eta"]}


def interval_for(stream=None) -> float:
    """Seconds between the worker's progress lines, as the driver's output wants them."""
    value = os.environ.get(ENV_INTERVAL)
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            logger.warning("%s=%r is not a number of seconds; using the default", ENV_INTERVAL, value)
    stream = stream or sys.stdout
    isatty = getattr(stream, "isatty", None)
    return TERMINAL_INTERVAL_S if isatty is not None and isatty() else LOG_INTERVAL_S


def read_every(device) -> int:
    """`log_every` for train_one_epoch: how often the device sums are read (see the module doc)."""
    import torch

    return GPU_READ_EVERY if torch.device(device).type == "cuda" else 1


class ProgressReporter:
    """The `on_progress` hook of rank 0: one line per `interval_s` seconds of an epoch.

    The clock is the epoch's own (`stats["elapsed_s"]`, measured by the engine), so a new epoch
    starts a new interval and the throttle needs no timer of its own.
    """

    def __init__(self, interval_s: float, emit: Callable[[str], None] | None = None) -> None:
        self.interval_s = interval_s
        self.emit = emit or logger.info
        self.epoch: int | None = None
        self.last_s = 0.0
        self.lines = 0

    def __call__(self, step: int, total: int | None, stats: dict) -> None:
        epoch = int(stats.get("epoch", 0)) + 1
        elapsed = float(stats.get("elapsed_s", 0.0))
        if epoch != self.epoch:
            self.epoch, self.last_s = epoch, 0.0
        if self.interval_s <= 0 or elapsed - self.last_s < self.interval_s:
            return
        if total and step >= total:  # the epoch line follows at once
            return
        self.last_s = elapsed
        self.lines += 1
        self.emit(format_line(epoch, step, total, stats))


class BarRenderer:
    """The driver's tqdm bar made from forwarded progress lines; other lines print above it."""

    BAR_FORMAT = "{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix}"  # postfix: ", stats"

    def __init__(self, file=None) -> None:
        self.file = file or sys.stdout
        self.bar = None
        self.epoch: int | None = None
        self.lock = threading.RLock()

    def feed(self, fields: dict) -> None:
        from tqdm import tqdm

        with self.lock:
            if self.bar is None or fields["epoch"] != self.epoch:
                self.close()
                self.epoch = fields["epoch"]
                self.bar = tqdm(total=fields["total"], desc=f"epoch {fields['epoch']}", unit="step",
                                file=self.file, leave=False, bar_format=self.BAR_FORMAT, dynamic_ncols=True)
            self.bar.total = fields["total"]
            self.bar.n = fields["step"]
            self.bar.set_postfix_str(f"{fields['images_per_s']:.1f} img/s loss {fields['loss']} "
                                     f"data-wait {fields['data_wait']}% ETA {fields['eta']}", refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        with self.lock:
            if self.bar is not None:
                self.bar.close()
            self.bar, self.epoch = None, None

    def print_above(self, print_lines: Callable[[], None], ends_epoch: bool = False) -> None:
        """Run `print_lines` with the bar cleared, then draw it again (or drop it at an epoch's end)."""
        with self.lock:
            if self.bar is None:
                print_lines()
                return
            if ends_epoch:
                self.close()
                print_lines()
                return
            self.bar.clear()
            print_lines()
            self.bar.refresh()

    def handler(self, original: Callable[[dict], None]) -> Callable[[dict], None]:
        """Wrap Ray's handler of one forwarded batch ({"lines": [...], "pid": ..., ...})."""

        def handle(data: dict) -> None:
            rest, last = [], None
            for line in data.get("lines") or []:
                fields = parse_line(line)
                if fields is None:
                    rest.append(line)
                else:
                    last = fields
            # Always called, even with no lines left: Ray's handler also flushes its deduplicated lines.
            ends = any(EPOCH_LINE.match(line) for line in rest)
            self.print_above(lambda: original({**data, "lines": rest}), ends_epoch=ends)
            if last is not None:
                self.feed(last)

        return handle


RAY_PRINT_HANDLER = "ray_print_logs"  # the name ray.init gives its handler of forwarded lines


def attach_bar(stream=None) -> Callable[[], None] | None:
    """On a terminal, after ray.init: draw forwarded progress lines as a bar. Returns `detach`
    (call it before ray.shutdown), or None when nothing was attached (plain lines then)."""
    stream = stream or sys.stdout
    isatty = getattr(stream, "isatty", None)
    if isatty is None or not isatty() or interval_for(stream) <= 0:
        return None
    try:
        import tqdm  # noqa: F401
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return None
    return wrap_dispatcher(dispatcher, BarRenderer(stream))


def wrap_dispatcher(dispatcher, renderer: BarRenderer) -> Callable[[], None] | None:
    """Replace the dispatcher's RAY_PRINT_HANDLER by `renderer`'s wrapper of it; returns `detach`."""
    originals = [h for name, h in getattr(dispatcher, "handlers", []) if name == RAY_PRINT_HANDLER]
    if not originals:
        return None
    original = originals[0]
    wrapped = renderer.handler(original)
    dispatcher.remove_handler(RAY_PRINT_HANDLER)
    dispatcher.add_handler(RAY_PRINT_HANDLER, wrapped)

    def detach() -> None:
        renderer.close()
        if any(h is wrapped for _, h in dispatcher.handlers):  # ray.shutdown removes it by name
            dispatcher.remove_handler(RAY_PRINT_HANDLER)
            dispatcher.add_handler(RAY_PRINT_HANDLER, original)

    return detach
