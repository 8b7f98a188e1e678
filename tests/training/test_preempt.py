"""Preemption without Ray: pause requests, the driver's SIGTERM grace, the mid-epoch stream skip,
the engine's pause points, mid-epoch checkpoint contents, and the forced non-finite test hook."""

from __future__ import annotations

import copy
import os
import signal
import threading
import time

import pytest
import torch
from fit_configs import stream_shards
from test_engine import TinyBoxRegressor, make_batches, to_targets

from rtrain.data.epoch_stream import StreamPlan, emit_items, pause_every, resume_skip_blocks
from rtrain.errors import PREEMPTED
from rtrain.runs import run_dir
from rtrain.runs.checkpoint import load_checkpoint, read_marker, save_checkpoint
from rtrain.training import preempt
from rtrain.training.ema import ModelEMA
from rtrain.training.engine import train_one_epoch
from rtrain.training.guard import NonFiniteGuard, force_nonfinite, forced_nonfinite_steps
from rtrain.training.optim import build_optimizer
from rtrain.training.runner import preempted_line
from rtrain.training.schedule import LRSchedule
from rtrain.training.train_loop import EPOCH_SHAPE, EPOCH_STEPS, _resume_state, _write_epoch_files

pytestmark = pytest.mark.usefixtures("one_thread_module")  # small steps: one thread, given back after


# ------------------------------------------------------------------------------- pause requests


def test_pause_codes_interval_and_requests():
    pauses = preempt.PauseRequests(checkpoint_every_s=0.2)
    assert pauses.code() == preempt.NONE
    time.sleep(0.25)
    assert pauses.code() == preempt.CHECKPOINT
    pauses.checkpointed()
    assert pauses.code() == preempt.NONE
    pauses.request("SIGTERM to the driver")
    pauses.request("a later reason")
    assert pauses.code() == preempt.STOP and pauses.reason == "SIGTERM to the driver"
    assert preempt.PauseRequests().code() == preempt.NONE  # 0 = no mid-epoch checkpoints


def test_a_polled_source_turns_into_a_stop_and_a_failing_one_is_ignored():
    calls = []

    def broken():
        raise ConnectionError("the clock actor died")

    def driver():
        calls.append(1)
        return "SIGTERM to the driver" if len(calls) >= 3 else None

    pauses = preempt.PauseRequests(sources=[broken, driver], poll_s=0.05)
    deadline = time.monotonic() + 5
    while pauses.code() != preempt.STOP and time.monotonic() < deadline:
        time.sleep(0.02)
    pauses.close()
    assert pauses.code() == preempt.STOP and pauses.reason == "SIGTERM to the driver" and len(calls) == 3


def _driver_stop(grace_s, told, exits, timeouts):
    return preempt.DriverStop(told.append, grace_s, on_timeout=lambda: timeouts.append(time.monotonic()),
                              exit_fn=exits.append)


def test_driver_sigterm_tells_the_workers_and_a_run_that_ends_in_time_does_not_exit():
    told, exits, timeouts = [], [], []
    previous = signal.getsignal(signal.SIGTERM)
    with _driver_stop(5.0, told, exits, timeouts) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not told and time.monotonic() < deadline:
            time.sleep(0.02)
        assert stop.requested == "SIGTERM to the driver"
    assert told == ["SIGTERM to the driver"] and exits == [] and timeouts == []
    assert signal.getsignal(signal.SIGTERM) is previous  # handed back


def test_driver_past_grace_exits_with_the_preempted_code_and_says_so():
    told, exits, timeouts = [], [], []
    with _driver_stop(1.0, told, exits, timeouts):
        sent = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not exits and time.monotonic() < deadline:
            time.sleep(0.05)
    assert exits == [PREEMPTED] and len(timeouts) == 1
    assert 0.9 <= timeouts[0] - sent < 3.0  # the grace, not sooner and not much later


def test_second_sigterm_ends_the_wait_at_once():
    told, exits, timeouts = [], [], []
    with _driver_stop(60.0, told, exits, timeouts):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.3)
        sent = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not exits and time.monotonic() < deadline:
            time.sleep(0.05)
    assert exits == [PREEMPTED] and timeouts[0] - sent < 2.0


def test_driver_stop_outside_the_main_thread_leaves_signals_alone():
    got = []

    def run():
        with preempt.DriverStop(print, 1.0, on_timeout=lambda: None) as stop:
            got.append(stop._previous)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert got == [None]


def test_worker_sigterm_asks_for_a_stop_and_a_second_one_reaches_the_previous_handler():
    got = []
    original = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    pauses = preempt.PauseRequests()
    try:
        assert preempt.install_worker_sigterm(pauses)  # the main thread: installed directly
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        assert pauses.code() == preempt.STOP and pauses.reason.startswith("SIGTERM to a worker process")
        assert got == []  # the first one is ours: no exit
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        assert got == [signal.SIGTERM]  # the second: Ray's handler (here a recorder) runs
    finally:
        preempt.uninstall_worker(pauses)
        signal.signal(signal.SIGTERM, original)
        preempt._RAY_HANDLER.clear()
        preempt._RECEIVED.clear()


# ------------------------------------------------------------------------------- stream skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return stream_shards(tmp_path_factory.mktemp("stream"))


def _blocks(plan, clock, epochs):
    items = {"id": list(range(epochs * plan.windows_per_epoch))}
    return [(int(b["epoch"][0].as_py()), b["image_id"].to_pylist()) for b in emit_items(items, plan=plan,
                                                                                          clock=clock)]


def test_mid_epoch_start_skips_exactly_the_trained_blocks_and_keeps_each_workers_batches(shards):
    # 48 rows per epoch in blocks of 4 rows, 2 workers: 12 blocks, 6 steps per worker per epoch
    plan = StreamPlan.from_shards(shards, batch_rows=4, world_size=2, seed=3, window_rows=16)
    whole = _blocks(plan, 1, 3)  # a restart at epoch 1
    assert len(whole) == 24 and {e for e, _ in whole} == {1, 2}
    for steps_done in (1, 2, 5):  # batch 4 = one block per step: every step is a resume point
        skip = resume_skip_blocks(steps_done, 4, 2, 4)
        assert skip == 2 * steps_done
        resumed = _blocks(plan, (1, skip), 3)
        assert resumed == whole[skip:]  # the same blocks, in the same order, from block `skip` on
        # block j goes to worker j mod 2: after an even skip each worker gets its own rest
        for rank in (0, 1):
            assert resumed[rank::2] == whole[rank::2][steps_done:]
    # a skip that covers whole windows reads nothing for them, and a later epoch is never cut
    assert _blocks(plan, (1, 8), 3) == whole[8:]
    assert _blocks(plan, (2, 0), 3) == whole[12:]


def test_pause_points_are_where_batches_end_on_block_edges():
    assert pause_every(4, 16) == 4 and pause_every(16, 16) == 1 and pause_every(6, 16) == 8
    assert pause_every(32, 32) == 1
    assert resume_skip_blocks(8, 4, 2, 16) == 4
    assert resume_skip_blocks(0, 4, 2, 16) == 0
    with pytest.raises(ValueError, match="do not end on a block"):
        resume_skip_blocks(3, 4, 2, 16)


# ------------------------------------------------------------------------------- engine pauses


def _setup(seed=0):
    torch.manual_seed(seed)
    model = TinyBoxRegressor()
    opt = build_optimizer(model, "adamw", lr=0.01, momentum=0.9, weight_decay=0.0)
    ema = ModelEMA(model, decay=0.9, tau=2.0)
    sched = LRSchedule(base_lr=0.01, total_steps=10, warmup_steps=3, final_lr_ratio=0.1)
    return model, opt, ema, sched


def _epoch(model, opt, ema, sched, batches, **kw):
    return train_one_epoch(model, opt, batches, device="cpu", schedule=sched, ema=ema, amp=False,
                           to_targets=to_targets, guard=kw.pop("guard", None) or NonFiniteGuard(), **kw)


def test_stop_at_a_pause_point_then_resume_equals_the_uninterrupted_epoch():
    batches = make_batches(10, seed=5)
    model_a, opt_a, ema_a, sched_a = _setup()
    _epoch(model_a, opt_a, ema_a, sched_a, batches)

    model_b, opt_b, ema_b, sched_b = _setup()
    paused = []

    def on_pause(code, iters):  # what the train loop's checkpoint holds
        state = {"model": model_b.state_dict(), "opt": opt_b.state_dict(), "ema": ema_b.state_dict(),
                 "sched": sched_b.state_dict()}
        paused.append((code, iters, copy.deepcopy(state)))

    asked = iter([0, 0, preempt.STOP] + [preempt.STOP] * 20)  # asked before step 2; honoured at step 4
    m = _epoch(model_b, opt_b, ema_b, sched_b, batches, pause=lambda: next(asked), on_pause=on_pause,
               pause_every=4)
    assert m["preempted"] == 1.0 and m["steps"] == 4
    assert [(c, i) for c, i, _ in paused] == [(preempt.STOP, 4)]

    state = paused[0][2]
    model_c, opt_c, ema_c, sched_c = _setup(seed=99)  # other weights: all must come from the state
    model_c.load_state_dict(state["model"])
    opt_c.load_state_dict(state["opt"])
    ema_c.load_state_dict(state["ema"])
    sched_c.load_state_dict(state["sched"])
    m = _epoch(model_c, opt_c, ema_c, sched_c, batches[4:], step_offset=4, pause=lambda: preempt.NONE,
               pause_phase=4, pause_every=4)
    assert m["steps"] == 6 and m["preempted"] == 0.0
    for got, want in ((model_c, model_a), (ema_c.module, ema_a.module)):
        for (k, a), b in zip(got.state_dict().items(), want.state_dict().values(), strict=True):
            assert torch.equal(a, b), k


def test_checkpoint_pauses_continue_the_epoch_at_every_aligned_step():
    batches = make_batches(9, seed=2)
    model, opt, ema, sched = _setup()
    seen = []
    m = _epoch(model, opt, ema, sched, batches, pause=lambda: preempt.CHECKPOINT,
               on_pause=lambda code, iters: seen.append((code, iters)), pause_every=3, pause_phase=1)
    # phase 1 (a resume one step into the epoch): positions 3 and 6 are iters 2 and 5, then 8
    assert seen == [(preempt.CHECKPOINT, 2), (preempt.CHECKPOINT, 5), (preempt.CHECKPOINT, 8)]
    assert m["steps"] == 9 and m["preempted"] == 0.0


def test_forced_nonfinite_steps_are_skipped_and_counted():
    assert forced_nonfinite_steps({}) == []
    assert forced_nonfinite_steps({"RTRAIN_TEST_NONFINITE_STEPS": " 7,2,7 "}) == [2, 7]
    with pytest.raises(ValueError, match="RTRAIN_TEST_NONFINITE_STEPS='x': expected comma-separated"):
        forced_nonfinite_steps({"RTRAIN_TEST_NONFINITE_STEPS": "x"})
    model, opt, ema, sched = _setup()
    before = copy.deepcopy(ema.module.state_dict())
    handle = force_nonfinite(model, [12, 14], first_step=10)  # a run resumed at step 10
    guard = NonFiniteGuard(max_consecutive=3)
    m = _epoch(model, opt, ema, sched, make_batches(6), guard=guard, step_offset=10)
    handle.remove()
    assert m["skipped"] == 2 and m["steps"] == 4 and guard.total == 2
    assert any(not torch.equal(a, b) for a, b in zip(ema.module.state_dict().values(), before.values(),
                                                        strict=True))


# ------------------------------------------------------------------------------- checkpoint contents


def test_mid_epoch_checkpoint_holds_the_position_and_no_metrics_row(tmp_path):
    model, opt, ema, sched = _setup()
    _epoch(model, opt, ema, sched, make_batches(3))
    out = tmp_path / "run"
    out.mkdir()
    extra = {"best_map": 0.5, "last_map": 0.4, "run_starts": 1, EPOCH_STEPS: 8, EPOCH_SHAPE: [4, 2]}
    ckpt = out / "checkpoint_mid"
    _write_epoch_files(ckpt, out, {"model": {}}, ["a", "b", "c"], model, ema, opt, sched, None,
                       NonFiniteGuard(), 2, 40, None, extra)
    state = load_checkpoint(ckpt)
    assert state["epoch"] == 2 and state["step"] == 40 and state["extra"] == extra
    assert {"model", "ema", "optimizer", "scheduler", "rng", "guard"} <= state.keys()
    assert read_marker(ckpt)["step"] == 40
    assert not (out / run_dir.METRICS_JSONL).exists() and not (out / run_dir.LAST_WEIGHTS).exists()

    # An epoch-end checkpoint of epoch 2 at step 32 that Ray registered is older than it: the
    # resume takes the mid-epoch one on disk (same epoch field, later step).
    older = save_checkpoint(out / "checkpoint_end", {**state, "step": 32, "extra": {}})

    class Registered:
        path = str(older)

        def as_directory(self):
            import contextlib

            return contextlib.nullcontext(str(older))

    got, source = _resume_state(Registered(), out, "cpu")
    assert source == str(ckpt) and got["extra"][EPOCH_STEPS] == 8


def test_preempted_line_says_where_and_how_to_resume(tmp_path):
    out = tmp_path / "runs" / "r1"
    report = {"epoch": 2, "step": 41, "mid_epoch": 1, "epoch_steps": 5}
    mid = preempted_line(report, out, "SIGTERM to the driver")
    assert mid == (f"preempted (SIGTERM to the driver) at epoch 3 step 41 (5 of the epoch's steps done); "
                   f"checkpoint saved; resume with: python -m rtrain.fit --resume --name r1 --storage "
                   f"{tmp_path / 'runs'}")
    end = preempted_line({"epoch": 0, "step": 12}, out, None)
    assert end.startswith("preempted after epoch 1 (step 12);")
