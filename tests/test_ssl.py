"""SSL building blocks: ramps, EMA, losses and the method interface (no data, fast)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cfrseg.errors import ConfigError
from cfrseg.ssl import build_method, linear_rampup, sigmoid_rampup, update_ema
from cfrseg.ssl.ema import ema_alpha
from cfrseg.ssl.losses import dice_loss, entropy, masked_mean, seg_loss, softmax_mse
from cfrseg.ssl.methods import SSLParams


def test_sigmoid_rampup_exact_values():
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))          # 0.006738
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-1.25))     # 0.286505
    assert sigmoid_rampup(100, 100) == 1.0
    assert sigmoid_rampup(1000, 100) == 1.0
    assert sigmoid_rampup(-5, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(3, 0) == 1.0
    # the reference's w(3000) = 0.1 * exp(-5 (1 - 20/40)^2) ~= 0.029
    assert 0.1 * sigmoid_rampup(3000 // 150, 40) == pytest.approx(0.02865, abs=1e-5)


def test_linear_rampup():
    assert linear_rampup(0, 10) == 0.0 and linear_rampup(5, 10) == 0.5 and linear_rampup(20, 10) == 1.0


def _toy() -> nn.Module:
    m = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1))
    return m


def test_ema_exact_values():
    student, teacher = _toy(), _toy()
    with torch.no_grad():
        teacher[0].weight.fill_(0.0)
        teacher[1].running_mean.fill_(0.0)
        student[0].weight.fill_(1.0)
        student[1].running_mean.fill_(2.0)
        student[1].num_batches_tracked.fill_(7)
    assert ema_alpha(0, 0.99) == 0.0
    assert ema_alpha(1, 0.99) == 0.5
    assert ema_alpha(9, 0.99) == pytest.approx(0.9)
    assert ema_alpha(10_000, 0.99) == 0.99
    # step 0: alpha 0 -> exact copy
    assert update_ema(teacher, student, 0, 0.99) == 0.0
    assert teacher[0].weight.item() == 1.0 and teacher[1].running_mean.item() == 2.0
    assert teacher[1].num_batches_tracked.item() == 7
    # step 1: alpha 0.5 -> halfway to the new student value
    with torch.no_grad():
        student[0].weight.fill_(3.0)
        student[1].running_mean.fill_(4.0)
    update_ema(teacher, student, 1, 0.99)
    assert teacher[0].weight.item() == pytest.approx(2.0)
    assert teacher[1].running_mean.item() == pytest.approx(3.0)   # BN buffers are averaged too
    # late: alpha = decay
    update_ema(teacher, student, 500, 0.99)
    assert teacher[0].weight.item() == pytest.approx(0.99 * 2.0 + 0.01 * 3.0)
    assert not teacher[0].weight.requires_grad or teacher[0].weight.grad is None


def test_losses_basic():
    torch.manual_seed(0)
    target = torch.randint(0, 2, (2, 4, 4, 4))
    perfect = torch.nn.functional.one_hot(target, 2).movedim(-1, 1).float() * 20 - 10
    assert seg_loss(perfect, target).item() < 1e-3
    assert dice_loss(torch.softmax(perfect, 1), target).item() < 1e-3
    assert seg_loss(-perfect, target).item() > 1.0
    a = torch.randn(2, 2, 4, 4, 4)
    assert softmax_mse(a, a).abs().max().item() == 0.0
    assert softmax_mse(a, -a).shape == (2, 4, 4, 4)
    uniform = torch.full((1, 2, 2, 2, 2), 0.5)
    assert entropy(uniform, normalized=True).mean().item() == pytest.approx(1.0, abs=1e-4)
    assert masked_mean(torch.ones(3), torch.zeros(3, dtype=torch.bool)).item() == 0.0


def _batch(pl: bool = False) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    b = {"image_l": torch.randn(1, 1, 8, 8, 8), "label_l": torch.randint(0, 2, (1, 8, 8, 8)),
         "image_u": torch.randn(2, 1, 8, 8, 8)}
    if pl:
        b["pl_u"] = torch.randint(0, 2, (2, 8, 8, 8))
        b["pl_mask"] = torch.tensor([True, False])
    return b


def _teacher_fn(x, noise=True, stochastic=False):
    return torch.cat([x, -x], dim=1) + (0.1 * torch.randn_like(torch.cat([x, x], 1)) if stochastic else 0)


@pytest.mark.parametrize("name", ["none", "mt", "st", "uamt", "acmt"])
def test_method_interface(name):
    p = SSLParams(iterations=100, uamt_T=2, st_threshold=0.5)
    m = build_method(name, p)
    b = _batch(pl=True)
    out_l = torch.randn(1, 2, 8, 8, 8, requires_grad=True)
    out_u = torch.randn(2, 2, 8, 8, 8, requires_grad=True)
    d = m.loss(out_l, out_u, _teacher_fn, b, step=10)
    assert {"loss", "sup", "pl", "w_pl"} <= set(d)
    if name != "none":
        assert {"cons", "w_cons"} <= set(d)
        assert d["w_cons"].item() == pytest.approx(0.1 * sigmoid_rampup(10, 100))
    d["loss"].backward()
    assert out_u.grad is not None and torch.isfinite(d["loss"])


def test_consistency_on_labeled_covers_all_crops():
    seen = []

    def tfn(x, noise=True, stochastic=False):
        seen.append(x.shape[0])
        return torch.zeros(x.shape[0], 2, *x.shape[2:])

    for on, n in ((False, 2), (True, 3)):
        m = build_method("mt", SSLParams(iterations=10, consistency_on_labeled=on))
        m.loss(torch.randn(1, 2, 8, 8, 8), torch.randn(2, 2, 8, 8, 8), tfn, _batch(), 0)
        assert seen[-1] == n


def test_pl_weight_follows_ramp():
    m = build_method("none", SSLParams(iterations=100, pl_weight=0.5, pl_ramp="sigmoid", pl_rampup=0.5))
    assert m.pl_weight(0) == pytest.approx(0.5 * math.exp(-5))
    assert m.pl_weight(25) == pytest.approx(0.5 * math.exp(-1.25))
    assert m.pl_weight(50) == 0.5 and m.pl_weight(99) == 0.5
    assert build_method("mt", SSLParams(iterations=100)).pl_weight(0) == 1.0   # reference code: constant 1


def test_acmt_selects_ambiguous_voxels():
    m = build_method("acmt", SSLParams(iterations=100))
    out = torch.zeros(1, 2, 2, 2, 2)
    out[0, 0, 0] = 10.0                      # confident half (x = 0), ambiguous half (x = 1)
    d = m.unsup(out, torch.zeros(1, 1, 2, 2, 2), lambda x, noise=True, stochastic=False: torch.zeros(1, 2, 2, 2, 2), 0)
    assert d["mask_frac"].item() == 0.5


def test_unknown_method():
    with pytest.raises(ConfigError, match="unknown SSL method"):
        build_method("magic", SSLParams(iterations=1))
