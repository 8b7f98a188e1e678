"""Training in channels_last: the same numbers as contiguous, and checkpoints cross between the two."""

from __future__ import annotations

import copy

import pytest
import torch

from rtrain.models import build_model
from rtrain.training.ema import ModelEMA
from rtrain.training.engine import train_one_epoch
from rtrain.training.memory_format import contiguous_state, match_optimizer_state, resolve, to_memory_format
from rtrain.training.optim import build_optimizer

pytestmark = pytest.mark.usefixtures("one_thread_module")
CL = torch.channels_last


def _batches(n: int, batch: int = 2, size: int = 64, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        xy = torch.rand(batch, 3, 2, generator=g) * size * 0.6
        wh = 6 + torch.rand(batch, 3, 2, generator=g) * size * 0.3
        out.append({
            "images": (torch.rand(batch, 3, size, size, generator=g) * 255).to(torch.uint8),
            "boxes": torch.cat([xy, (xy + wh).clamp(max=size)], -1),
            "labels": torch.randint(0, 3, (batch, 3), generator=g),
            "iscrowd": torch.zeros(batch, 3, dtype=torch.bool),
        })
    return out


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("compact_n", num_classes=3).train()


def test_auto_is_channels_last_on_cpu_and_contiguous_on_cuda():
    assert resolve("auto", "cpu") == CL
    assert resolve("auto", "cuda") == torch.contiguous_format
    assert resolve("contiguous", "cpu") == torch.contiguous_format
    assert resolve("channels_last", "cuda") == CL
    with pytest.raises(ValueError, match="got 'nhwc'"):
        resolve("nhwc", "cpu")


def test_the_model_keeps_its_parameters_and_outputs_in_channels_last():
    model = _model().eval()
    before = list(model.parameters())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = model.forward_raw(x)
    to_memory_format(model, CL)
    assert [id(p) for p in model.parameters()] == [id(p) for p in before]  # an optimizer's refs hold
    # a depthwise [C, 1, k, k] or 1x1 weight is laid out alike in both: check the full convolutions
    convs = [p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[-1] > 1]
    assert convs and all(p.is_contiguous(memory_format=CL) and not p.is_contiguous() for p in convs)
    with torch.no_grad():
        out = model.forward_raw(x)
    for a, b in zip(torch.utils._pytree.tree_leaves(ref), torch.utils._pytree.tree_leaves(out), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _train(model, fmt, batches, optimizer_state=None, optimizer="sgd"):
    # SGD: its step is linear in the gradient, so the two layouts' float rounding stays ~1e-6 apart
    # (AdamW's first steps are ~lr x sign(g) and turn a 1e-9 difference on a near-zero gradient into lr).
    opt = build_optimizer(model, optimizer, lr=0.002, momentum=0.9, weight_decay=5e-4)
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
        match_optimizer_state(opt)
    ema = ModelEMA(model)
    metrics = train_one_epoch(model, opt, batches, device="cpu", ema=ema, grad_clip=10.0, memory_format=fmt)
    return metrics, opt, ema


def test_channels_last_trains_to_the_same_losses_and_weights_as_contiguous():
    batches = _batches(4)
    runs = {}
    for fmt in (torch.contiguous_format, CL):
        model = to_memory_format(_model(), fmt)
        runs[fmt] = (_train(model, fmt, batches), model)
    (m_nchw, _, ema_nchw), model_nchw = runs[torch.contiguous_format]
    (m_nhwc, opt_nhwc, ema_nhwc), model_nhwc = runs[CL]
    assert m_nhwc["steps"] == m_nchw["steps"] == 4 and m_nhwc["skipped"] == 0
    assert m_nhwc["loss"] == pytest.approx(m_nchw["loss"], rel=1e-3)
    for (k, a), b in zip(model_nchw.state_dict().items(), model_nhwc.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=k)
    # the momentum and the EMA live in the parameters' layout
    name, conv = next((k, p) for k, p in model_nhwc.named_parameters()
                      if p.dim() == 4 and p.shape[1] > 1 and p.shape[-1] > 1)
    assert opt_nhwc.state[conv]["momentum_buffer"].stride() == conv.stride()
    ema_strides = [e.module.state_dict()[name].stride() for e in (ema_nhwc, ema_nchw)]
    assert ema_strides[0] == conv.stride() != ema_strides[1]


def test_adamw_moments_from_a_contiguous_checkpoint_take_the_channels_last_strides():
    model = _model()
    _, opt, _ = _train(model, torch.contiguous_format, _batches(1), optimizer="adamw")
    resumed = to_memory_format(_model(), CL)
    opt2 = build_optimizer(resumed, "adamw", lr=0.002, momentum=0.9, weight_decay=5e-4)
    opt2.load_state_dict(opt.state_dict())
    conv = next(p for p in resumed.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[-1] > 1)
    assert opt2.state[conv]["exp_avg"].stride() != conv.stride()  # what load_state_dict leaves
    match_optimizer_state(opt2)
    for p in resumed.parameters():
        for k in ("exp_avg", "exp_avg_sq"):
            assert opt2.state[p][k].stride() == p.stride()
    torch.testing.assert_close(opt2.state[conv]["exp_avg"], opt.state_dict()["state"][
        next(i for i, q in enumerate(model.parameters()) if q.shape == conv.shape)]["exp_avg"])
    metrics = train_one_epoch(resumed, opt2, _batches(2), device="cpu", memory_format=CL)
    assert metrics["steps"] == 2 and metrics["skipped"] == 0


def test_a_contiguous_checkpoint_resumes_in_channels_last_and_back():
    first, rest = _batches(2, seed=1), _batches(3, seed=2)
    model = _model()
    _, opt, _ = _train(model, torch.contiguous_format, first)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())

    finals = {}
    for fmt in (torch.contiguous_format, CL):
        resumed = to_memory_format(_model(), fmt)
        resumed.load_state_dict(saved_model)
        # a copy each: torch's load_state_dict keeps the given tensors, and the steps update them in place
        metrics, opt2, _ = _train(resumed, fmt, rest, optimizer_state=copy.deepcopy(saved_opt))
        for p in resumed.parameters():
            for v in opt2.state[p].values():
                if torch.is_tensor(v) and v.shape == p.shape:
                    assert v.stride() == p.stride()
        finals[fmt] = (metrics["loss"], resumed.state_dict())
    assert finals[CL][0] == pytest.approx(finals[torch.contiguous_format][0], rel=1e-3)
    for a, b in zip(finals[CL][1].values(), finals[torch.contiguous_format][1].values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    # and a channels_last state dict loads back into a contiguous model
    back = _model()
    back.load_state_dict(finals[CL][1])
    assert all(p.is_contiguous() for p in back.parameters())


def test_weights_files_are_written_contiguous():
    model = to_memory_format(_model(), CL)
    state = model.state_dict()
    assert any(not v.is_contiguous() for v in state.values())
    flat = contiguous_state(state)
    assert all(v.is_contiguous() for v in flat.values())
    for k, v in state.items():
        torch.testing.assert_close(flat[k], v)
    untouched = next(k for k, v in state.items() if v.dim() == 1)
    assert flat[untouched].data_ptr() == state[untouched].data_ptr()  # no copy where none is needed
