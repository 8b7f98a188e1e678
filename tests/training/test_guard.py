"""NonFiniteGuard: skips non-finite steps, counts them, stops with a clear reason."""

from __future__ import annotations

import math

import pytest
import torch

from rtrain.training.guard import NonFiniteGuard, NonFiniteLossError, is_finite, non_finite_terms


def _losses(box=1.0, cls=0.5):
    return {"loss": torch.tensor(box + cls), "loss_box": torch.tensor(box), "loss_cls": torch.tensor(cls)}


def test_finite_steps_pass_and_reset_consecutive():
    g = NonFiniteGuard(max_consecutive=3)
    assert g.check(_losses())
    assert not g.check(_losses(box=math.nan))
    assert not g.check(_losses(cls=math.inf))
    assert (g.consecutive, g.total) == (2, 2)
    assert g.check(_losses())
    assert (g.consecutive, g.total) == (0, 2)


def test_consecutive_limit_raises_with_the_bad_term_named():
    g = NonFiniteGuard(max_consecutive=20)
    for _ in range(19):
        assert not g.check(_losses(box=math.nan, cls=0.1))
    with pytest.raises(NonFiniteLossError) as e:
        g.check(_losses(box=math.nan, cls=0.1))
    msg = str(e.value)
    assert "20 consecutive steps" in msg and "loss_box=nan" in msg and "lower train.lr" in msg
    assert "loss_cls" not in msg and "\n" not in msg


def test_total_limit_counts_across_good_steps():
    g = NonFiniteGuard(max_consecutive=100, max_total=3)
    assert not g.check({"loss": float("inf")})
    assert g.check({"loss": 1.0})
    assert not g.check({"loss": float("nan")})
    assert g.check({"loss": 2.0})
    with pytest.raises(NonFiniteLossError, match="non-finite in 3 steps"):
        g.check({"loss": float("-inf")})


def test_agreed_decision_overrides_local_losses():
    # DDP: another rank saw NaN, so this rank must skip too although its own loss is finite.
    g = NonFiniteGuard(max_consecutive=5)
    assert not g.check(_losses(), all_finite=False)
    assert g.total == 1
    assert g.check(_losses(box=math.nan), all_finite=True)


def test_helpers_and_state_round_trip():
    assert is_finite(_losses())
    assert list(non_finite_terms(_losses(box=math.inf))) == ["loss", "loss_box"]
    g = NonFiniteGuard(max_consecutive=5)
    g.check({"loss": math.nan})
    h = NonFiniteGuard(max_consecutive=5)
    h.load_state_dict(g.state_dict())
    assert h.state_dict() == {"consecutive": 1, "total": 1}
    with pytest.raises(ValueError):
        NonFiniteGuard(max_consecutive=0)
