"""Elastic runs without a cluster: the fixed global batch and LR, the stream cut for every group size,
a mid-epoch checkpoint continued by a group of another size, and Ray's sizing of rtrain's workers."""

from __future__ import annotations

import pytest
from fit_configs import stream_shards

from rtrain.config import load_config
from rtrain.data.epoch_stream import StreamPlan, emit_items
from rtrain.training.elastic import global_batch, per_worker_batch, resume_skip
from rtrain.training.runner import scaling_config, stream_batch_rows
from rtrain.training.schedule import LRSchedule, scale_lr

GIB = 1024**3


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return stream_shards(tmp_path_factory.mktemp("stream"))  # 50 rows in 3 shards


def _elastic(workers: str = "1:4", batch: int = 6, optimizer: str = "sgd", *extra: str):
    return load_config(None, [f"run.workers={workers}", f"train.batch_size={batch}",
                              f"train.optimizer={optimizer}", *extra])


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_global_batch_lr_and_schedule_are_the_same_at_every_group_size(optimizer):
    cfg = _elastic("1:4", 6, optimizer)  # 24 = 1 x 24 = 2 x 12 = 3 x 8 = 4 x 6
    assert global_batch(cfg) == 24
    assert {w: per_worker_batch(cfg, w) for w in range(1, 5)} == {1: 24, 2: 12, 3: 8, 4: 6}
    # what the loop derives from (per-worker batch, world size), as train_loop does: the same LR
    # scaled to the global batch, the same steps per epoch, so the same LR at every step
    rows_per_epoch, curves = 480, set()
    for w in range(1, 5):
        batch = per_worker_batch(cfg, w)
        base_lr = scale_lr(cfg.train.lr, batch * w, cfg.train.nominal_batch_size, optimizer)
        total = cfg.train.epochs * (rows_per_epoch // (batch * w))
        warmup = round(cfg.train.warmup_epochs * total / cfg.train.epochs)
        schedule = LRSchedule(base_lr=base_lr, total_steps=total, warmup_steps=warmup)
        curves.add((base_lr, total, tuple(schedule.lr_at(step) for step in range(0, total, 7))))
    assert len(curves) == 1
    # a fixed count scales as before: the global batch is batch x workers, the LR follows it
    fixed = load_config(None, ["run.workers=2", "train.batch_size=6"])
    assert global_batch(fixed) == 12 and per_worker_batch(fixed, 2) == 6
    with pytest.raises(ValueError, match="does not split over 5 workers"):
        per_worker_batch(cfg, 5)


def test_the_stream_splits_every_epoch_into_whole_blocks_at_every_size(shards):
    cfg = _elastic("1:4", 6)
    rows = stream_batch_rows(cfg)  # whole per-worker batches at MAX, at least 16 rows: 18
    plan = StreamPlan.from_shards(shards, batch_rows=rows, world_size=4, min_world_size=1, seed=0)
    assert plan.epoch_unit == 18 * 12 and plan.rows_per_epoch == 216  # 50 rows repeated up to one unit
    for w in range(1, 5):
        share = plan.rows_per_epoch // w
        assert share % rows == 0  # each worker's share of an epoch is whole blocks
        assert share % per_worker_batch(cfg, w) == 0  # ... and whole batches of its size
        assert share // per_worker_batch(cfg, w) == plan.rows_per_epoch // global_batch(cfg)
    # a fixed group cuts epochs exactly as before the elastic option existed
    fixed = StreamPlan.from_shards(shards, batch_rows=4, world_size=2, seed=0)
    assert fixed.epoch_unit == 8 and fixed.rows_per_epoch == 48 and fixed.steps_per_epoch == 6


def _blocks(plan: StreamPlan, start: tuple[int, int]) -> list[list[int]]:
    """Epoch `start[0]`'s blocks (image ids) from block `start[1]` on, as the stream emits them."""
    items = {"id": list(range(start[0] * plan.windows_per_epoch, (start[0] + 1) * plan.windows_per_epoch))}
    return [b["image_id"].to_pylist() for b in emit_items(items, plan=plan, clock=start)]


def _deal(blocks: list[list[int]], world: int, batch: int) -> list[list[list[int]]]:
    """Ray's OutputSplitter under preserve_order: block j to worker j mod world; each worker's rows
    in batches of `batch` (iter_torch_batches)."""
    out = []
    for rank in range(world):
        rows = [i for block in blocks[rank::world] for i in block]
        assert len(rows) % batch == 0, "a worker's share of the epoch is not whole batches"
        out.append([rows[k:k + batch] for k in range(0, len(rows), batch)])
    return out


@pytest.mark.parametrize(("then", "now"), [((4, 2), (8, 1)), ((8, 1), (4, 2))], ids=["shrink", "grow"])
def test_a_mid_epoch_checkpoint_continues_at_its_step_in_a_group_of_another_size(shards, then, now):
    # global batch 8; blocks of 4 rows; 48 rows per epoch = 6 steps at either size
    plan = StreamPlan.from_shards(shards, batch_rows=4, world_size=2, min_world_size=1, seed=3,
                                  window_rows=16)
    spe = plan.rows_per_epoch // 8
    whole = _blocks(plan, (1, 0))
    k = 2  # steps of epoch 1 done before the loss (a resumable point at both sizes)
    before = [row for worker in _deal(whole, then[1], then[0]) for batch in worker[:k] for row in batch]
    skip = resume_skip(k, then, now, batch_rows=4, steps_per_epoch=spe)
    assert skip == k * 8 // 4
    after = _deal(_blocks(plan, (1, skip)), now[1], now[0])
    assert all(len(worker) == spe - k for worker in after)  # every new worker: the epoch's remaining steps
    trained = before + [row for worker in after for batch in worker for row in batch]
    assert sorted(trained) == sorted(i for block in whole for i in block)  # the epoch's rows, each once


def test_a_new_workers_share_may_end_inside_a_block_and_no_row_is_lost_or_repeated(shards):
    # blocks of 8 rows, global batch 8: one worker takes a block a step, each of two half a block
    plan = StreamPlan.from_shards(shards, batch_rows=8, world_size=2, min_world_size=1, seed=3,
                                  window_rows=16)
    spe = plan.rows_per_epoch // 8  # 6
    epoch1, epoch2 = _blocks(plan, (1, 0)), _blocks(plan, (2, 0))
    skip = resume_skip(1, (8, 1), (4, 2), batch_rows=8, steps_per_epoch=spe)  # 1 step at 1 worker
    assert skip == 1  # 5 blocks left for 2 workers: 2.5 each
    rest = _blocks(plan, (1, skip)) + epoch2  # the stream from the restart to the run's end
    dealt = [[i for block in rest[rank::2] for i in block] for rank in (0, 1)]
    need = (spe - 1 + spe) * 4  # the rest of epoch 1 and epoch 2, per worker
    assert sorted(i for worker in dealt for i in worker) == sorted(i for block in rest for i in block)
    assert sum(len(w) for w in dealt) == 2 * need  # Ray's equal split evens the last block out
    assert abs(len(dealt[0]) - len(dealt[1])) == 8  # ... of at most one block between the workers
    trained = epoch1[0] + dealt[0] + dealt[1]
    assert sorted(trained) == sorted(i for block in epoch1 + epoch2 for i in block)  # each once


def test_a_mid_epoch_checkpoint_is_replayed_only_when_it_cannot_be_continued():
    assert resume_skip(2, (4, 2), (4, 2), batch_rows=4, steps_per_epoch=6) == 4  # same shape: as before
    assert resume_skip(3, (8, 1), (4, 2), batch_rows=16, steps_per_epoch=6) is None  # 24 rows: 1.5 blocks
    assert resume_skip(2, (4, 2), (4, 1), batch_rows=4, steps_per_epoch=6) is None  # another global batch
    assert resume_skip(6, (4, 2), (8, 1), batch_rows=4, steps_per_epoch=6) is None  # nothing left of it


def test_ray_sizes_the_group_by_the_workers_each_node_holds():
    from ray.train.v2._internal.execution.scaling_policy.elastic import ElasticScalingPolicy

    node = {"CPU": 2.0, "memory": 4.0 * GIB}
    cfg = _elastic("1:2", 8, "sgd", "run.cpus_per_worker=0.5", "run.memory_per_worker_gb=3")
    scaling = scaling_config(cfg)
    assert scaling.num_workers == (1, 2) and scaling.resources_per_worker == {"CPU": 0.5, "memory": 3 * GIB}
    count = ElasticScalingPolicy(scaling)._count_possible_workers  # Ray 2.60's decision, without a cluster
    assert count({"head": node}) == 1  # a node lost: the group restarts with one worker
    assert count({"head": node, "new": node}) == 2  # a node back: two again
    assert count({"a": node, "b": node, "c": node}) == 2  # never above MAX
    # without a memory reservation two 0.5-CPU workers fit on one node: nothing would shrink
    no_memory = _elastic("1:2", 8, "sgd", "run.cpus_per_worker=0.5")
    assert ElasticScalingPolicy(scaling_config(no_memory))._count_possible_workers({"head": node}) == 2
    # a fixed count is Ray's fixed group, as before
    fixed = scaling_config(load_config(None, ["run.workers=2"]))
    assert fixed.num_workers == 2 and not fixed.elasticity_enabled
    assert fixed.resources_per_worker == {"CPU": 1.0}


def test_the_fit_command_takes_min_max_and_refuses_bad_forms_in_one_line(capsys):
    from rtrain.fit import build_parser, main

    parser = build_parser()
    assert parser.parse_args(["--workers", "1:2"]).workers == "1:2"
    assert parser.parse_args(["--gpus", "4"]).gpus == 4  # a fixed count is the int it always was
    for bad, why in (("3:2", "MIN 3 is above MAX 2"), ("0:4", "MIN must be at least 1"),
                     ("1:two", "MIN and MAX must be whole numbers")):
        with pytest.raises(SystemExit) as info:
            main(["--workers", bad])
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.count("\n") == 1
        assert f"argument --workers: '{bad}': {why}" in err


def test_fit_refuses_an_uneven_range_before_ray_starts(tmp_path, monkeypatch):
    import rtrain.ray_session
    from rtrain.training.runner import FitError, fit

    started = []  # fit must refuse before it starts or joins Ray (in the suite a session cluster may be up)
    monkeypatch.setattr(rtrain.ray_session, "start_ray", lambda *a, **k: started.append(a) or True)
    config = {"data": {"train": str(tmp_path / "none"), "val": str(tmp_path / "none")},
              "train": {"batch_size": 8}}
    with pytest.raises(FitError, match=r"^run.workers=2:4: the global batch train.batch_size x 4 = 32 does "
                                       r"not split evenly over 3 workers"):
        fit(config, workers="2:4", storage=tmp_path / "runs")
    assert started == []
