"""Two CPU ranks (gloo, torch.multiprocessing) against one: the step loop's DDP contracts.

- the loss normaliser is averaged across ranks, so 2 ranks x batch b give the same gradients and
  updated weights as 1 rank x batch 2b (and without that averaging they do not);
- a loss that is non-finite on rank 1 only (its gradients finite) makes both ranks skip that step
  and stay identical, through the device-side agreement alone.

BatchNorm is kept in eval mode (running stats) in these models: per-rank batch statistics would
differ from whole-batch statistics whatever the normaliser does.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from rtrain.models import build_model
from rtrain.training.engine import train_one_epoch
from rtrain.training.guard import NonFiniteGuard
from rtrain.training.optim import build_optimizer

WORLD = 2
PER_RANK = 2


class FrozenBN(nn.Module):
    """A detector whose BatchNorm layers stay in eval mode in `train()`; optionally NaN on some calls.

    nan_calls: calls (0-based) whose loss parts get a NaN constant added: the loss is NaN but the
    gradients stay finite, so only the skip-flag agreement can make the other rank skip.
    """

    def __init__(self, detector: nn.Module, nan_calls: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.detector = detector
        self.nan_calls = nan_calls
        self.calls = 0

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def forward(self, images, targets):
        losses = self.detector(images, targets)
        if self.calls in self.nan_calls:
            nan = torch.tensor(float("nan"))
            losses = {k: v + nan for k, v in losses.items()}
        self.calls += 1
        return losses


def make_model(nan_calls=frozenset(), sync_norm=True) -> FrozenBN:
    torch.manual_seed(0)
    det = build_model("compact_n", num_classes=3)
    det.loss_fn.sync_norm = sync_norm
    return FrozenBN(det, frozenset(nan_calls))


def make_batches(n: int, batch: int, seed: int = 1) -> list[dict]:
    """Images of random noise with 3 boxes each (padded to 4 with label -1), 64 px."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        boxes = torch.zeros(batch, 4, 4)
        labels = torch.full((batch, 4), -1, dtype=torch.long)
        for i in range(batch):
            for j in range(3):
                x, y = torch.randint(0, 40, (2,), generator=g).tolist()
                w, h = torch.randint(12, 24, (2,), generator=g).tolist()
                boxes[i, j] = torch.tensor([x, y, min(x + w, 64), min(y + h, 64)], dtype=torch.float32)
                labels[i, j] = j
        images = (torch.rand(batch, 3, 64, 64, generator=g) * 255).to(torch.uint8)
        out.append({"images": images, "boxes": boxes, "labels": labels,
                    "iscrowd": torch.zeros(batch, 4, dtype=torch.bool)})
    return out


def shard(batch: dict, rank: int) -> dict:
    return {k: v[rank * PER_RANK : (rank + 1) * PER_RANK] for k, v in batch.items()}


def run(model: nn.Module, batches: list[dict], optimizer_name: str = "sgd") -> dict:
    opt = build_optimizer(model, optimizer_name, lr=0.05, momentum=0.9, weight_decay=5e-4)
    guard = NonFiniteGuard(max_consecutive=5)
    metrics = train_one_epoch(model, opt, batches, device="cpu", guard=guard, grad_clip=0.0)
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {
        "metrics": metrics,
        "guard_total": guard.total,
        "weights": {k: v.detach().clone() for k, v in inner.state_dict().items()},
        "grads": {n: p.grad.detach().clone() for n, p in inner.named_parameters() if p.grad is not None},
    }


def _worker(rank: int, port: int, out_dir: str, case: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        if case == "nan_on_rank1":
            model = make_model(nan_calls={1} if rank == 1 else set())
            batches = [shard(b, rank) for b in make_batches(3, WORLD * PER_RANK)]
            result = run(nn.parallel.DistributedDataParallel(model), batches)
            torch.save(result, f"{out_dir}/{case}_rank{rank}.pt")
        else:  # the averaged normaliser, then the per-rank one as the control
            batches = [shard(b, rank) for b in make_batches(1, WORLD * PER_RANK)]
            for name, sync in (("synced", True), ("unsynced", False)):
                ddp = nn.parallel.DistributedDataParallel(make_model(sync_norm=sync))
                torch.save(run(ddp, batches), f"{out_dir}/{name}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(tmp_path, case: str) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), case), nprocs=WORLD, join=True)


def _load(tmp_path, name: str) -> list[dict]:
    return [torch.load(tmp_path / f"{name}_rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def norm_runs(tmp_path_factory):
    """Both ranks' results with the averaged normaliser ("synced") and without ("unsynced")."""
    out = tmp_path_factory.mktemp("ddp_norm")
    _spawn(out, "norm")
    return {name: _load(out, name) for name in ("synced", "unsynced")}


def _max_rel(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-12)) for k in b)


@pytest.fixture(scope="module")
def one_rank_reference():
    torch.set_num_threads(1)
    return run(make_model(), make_batches(1, WORLD * PER_RANK))


def test_two_ranks_equal_one_rank_with_twice_the_batch(norm_runs, one_rank_reference):
    ref = one_rank_reference
    ranks = norm_runs["synced"]
    for r in ranks:
        assert r["metrics"]["steps"] == 1 and r["metrics"]["skipped"] == 0
        assert r["grads"].keys() == ref["grads"].keys()
        assert _max_rel(r["grads"], ref["grads"]) < 1e-4, _max_rel(r["grads"], ref["grads"])
        for k, w in ref["weights"].items():
            assert torch.allclose(r["weights"][k], w, atol=1e-5, rtol=1e-5), k
    assert all(torch.equal(ranks[0]["weights"][k], ranks[1]["weights"][k]) for k in ref["weights"])


def test_without_the_averaged_normaliser_the_ranks_do_not_match(norm_runs, one_rank_reference):
    # The control: per-rank normalisers give measurably different gradients.
    ranks = norm_runs["unsynced"]
    assert _max_rel(ranks[0]["grads"], one_rank_reference["grads"]) > 1e-3


def test_nan_on_one_rank_makes_both_skip_and_stay_identical(tmp_path):
    _spawn(tmp_path, "nan_on_rank1")
    ranks = _load(tmp_path, "nan_on_rank1")
    for r in ranks:
        assert r["metrics"]["steps"] == 2 and r["metrics"]["skipped"] == 1
        assert r["guard_total"] == 1
        assert torch.isfinite(torch.tensor(r["metrics"]["loss"]))
    for k in ranks[0]["weights"]:
        assert torch.equal(ranks[0]["weights"][k], ranks[1]["weights"][k]), k
