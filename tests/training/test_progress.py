"""rtrain.training.progress without Ray: the line, its throttle, the pace, and the driver's bar."""

from __future__ import annotations

import io
import os

import pytest

from rtrain.training import progress
from rtrain.training.progress import BarRenderer, ProgressReporter, format_line, parse_line, wrap_dispatcher

STATS = {"epoch": 2, "images_per_s": 31.54, "loss": 2.31049, "data_wait_frac": 0.041, "elapsed_s": 14.0}


def test_line_has_step_speed_loss_wait_and_eta():
    line = format_line(3, 40, 120, STATS)
    assert line == "epoch 3 step 40/120 31.5 img/s loss 2.310 data-wait 4% ETA 0:00:28"
    assert parse_line(line) == {"epoch": 3, "step": 40, "total": 120, "images_per_s": 31.5, "loss": "2.310",
                                "data_wait": 4, "eta": "0:00:28"}
    unknown = format_line(1, 5, None, STATS)
    assert unknown.endswith("ETA ?") and "step 5/? " in unknown
    assert parse_line(unknown)["total"] is None


def test_other_lines_are_not_progress():
    epoch_line = ("epoch 3/9  25.1s  loss 2.3100 (cls 1.000 box 0.500 dfl 0.800)  mAP -  lr 0.00100  "
                  "19.0 img/s  data-wait 4%  ETA 0:02:10")
    assert parse_line(epoch_line) is None
    assert progress.EPOCH_LINE.match(epoch_line)
    assert not progress.EPOCH_LINE.match(format_line(3, 40, 120, STATS))
    assert parse_line("Started training worker group of size 2:") is None


def _stats(epoch: int, elapsed: float) -> dict:
    return {**STATS, "epoch": epoch, "elapsed_s": elapsed}


def test_reporter_writes_one_line_per_interval_of_each_epoch():
    lines: list[str] = []
    r = ProgressReporter(interval_s=1.0, emit=lines.append)
    for step, elapsed in [(1, 0.3), (2, 0.9), (3, 1.2), (4, 1.8), (5, 2.3), (6, 2.6)]:
        r(step, 10, _stats(0, elapsed))
    assert [parse_line(x)["step"] for x in lines] == [3, 5]
    # A new epoch starts its own interval (its clock restarts at 0).
    r(1, 10, _stats(1, 0.5))
    r(2, 10, _stats(1, 1.0))
    assert [(parse_line(x)["epoch"], parse_line(x)["step"]) for x in lines[2:]] == [(2, 2)]
    # The last step writes nothing: the epoch line says it.
    r(10, 10, _stats(1, 9.0))
    assert len(lines) == 3 and r.lines == 3
    off = ProgressReporter(interval_s=0.0, emit=lines.append)
    off(3, 10, _stats(0, 100.0))
    assert len(lines) == 3


def test_pace_follows_the_drivers_output(monkeypatch):
    monkeypatch.delenv(progress.ENV_INTERVAL, raising=False)
    assert progress.interval_for(io.StringIO()) == progress.LOG_INTERVAL_S
    master, slave = os.openpty()
    try:
        with open(slave, "w", closefd=False) as tty:
            assert tty.isatty()
            assert progress.interval_for(tty) == progress.TERMINAL_INTERVAL_S
            monkeypatch.setenv(progress.ENV_INTERVAL, "0")
            assert progress.interval_for(tty) == 0.0
            assert progress.attach_bar(tty) is None  # progress off: nothing to draw
            monkeypatch.setenv(progress.ENV_INTERVAL, "5")
            assert progress.interval_for(io.StringIO()) == 5.0
    finally:
        os.close(master)
        os.close(slave)
    assert progress.attach_bar(io.StringIO()) is None  # not a terminal: plain lines


def test_reads_every_step_on_cpu_and_at_the_guard_interval_on_gpu():
    assert progress.read_every("cpu") == 1
    assert progress.read_every("cuda:0") == progress.GUARD_EVERY == 50


def _batch(*lines: str, pid: int = 7) -> dict:
    return {"lines": list(lines), "pid": pid, "ip": "127.0.0.1", "is_err": True}


def test_bar_draws_forwarded_progress_lines_and_prints_other_lines_above_it():
    from ray._private.ray_logging import WorkerStandardStreamDispatcher

    printed: list[list[str]] = []
    dispatcher = WorkerStandardStreamDispatcher()  # Ray's own dispatcher class; no Ray started
    original = lambda data: printed.append(list(data["lines"]))  # noqa: E731
    dispatcher.add_handler(progress.RAY_PRINT_HANDLER, original)
    screen = io.StringIO()
    renderer = BarRenderer(screen)
    detach = wrap_dispatcher(dispatcher, renderer)
    assert detach is not None

    dispatcher.emit(_batch(format_line(1, 10, 30, STATS), "data: 480 images"))
    assert printed == [["data: 480 images"]]  # the progress line went to the bar, not the print
    assert renderer.bar is not None and renderer.bar.n == 10 and renderer.bar.total == 30
    dispatcher.emit(_batch(format_line(1, 20, 30, STATS)))
    assert printed == [["data: 480 images"], []] and renderer.bar.n == 20  # [] lets Ray flush its dedup
    drawn = screen.getvalue()
    assert "epoch 1" in drawn and "20/30" in drawn and "31.5 img/s loss 2.310 data-wait 4% ETA" in drawn

    # The epoch's line ends the bar; the next epoch's progress starts a new one.
    dispatcher.emit(_batch("epoch 1/3  25.1s  loss 2.3100 (cls 1 box 1 dfl 1)  mAP -  lr 0.001  ETA 0:00:50"))
    assert renderer.bar is None and printed[-1][0].startswith("epoch 1/3")
    dispatcher.emit(_batch(format_line(2, 5, 30, STATS)))
    assert renderer.bar.desc == "epoch 2" and renderer.bar.n == 5

    detach()
    assert renderer.bar is None
    assert [h for _, h in dispatcher.handlers] == [original]  # Ray's handler is back
    dispatcher.emit(_batch(format_line(2, 6, 30, STATS)))
    assert printed[-1] == [format_line(2, 6, 30, STATS)]


def test_nothing_is_wrapped_without_rays_print_handler():
    from ray._private.ray_logging import WorkerStandardStreamDispatcher

    dispatcher = WorkerStandardStreamDispatcher()  # ray.init(log_to_driver=False) adds none
    assert wrap_dispatcher(dispatcher, BarRenderer(io.StringIO())) is None
    assert dispatcher.handlers == []


@pytest.mark.parametrize("elapsed,step,total,eta", [(10.0, 10, 40, "0:00:30"), (3600.0, 1, 3, "2:00:00")])
def test_eta_is_the_epochs_remaining_steps_at_its_pace(elapsed, step, total, eta):
    assert parse_line(format_line(1, step, total, {**STATS, "elapsed_s": elapsed}))["eta"] == eta
