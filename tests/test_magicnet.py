"""MagicNet / CFR_MagicNet as a re-training method: losses, pseudo-label blending state, exact resume, learning,
and the method registry seen by the CLI and the gateway."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cfrseg.errors import Cancelled
from cfrseg.models import build_network
from cfrseg.ssl.losses import seg_loss
from cfrseg.ssl.methods import METHODS, SSLParams, build_method
from cfrseg.stages.retrain import RetrainConfig, load_checkpoint, run_retrain
from cfrseg.store import LocalStore
from tests.synth import synthetic_manifest

pytestmark = pytest.mark.usefixtures("one_thread")



def _net(k: int = 3):
    torch.manual_seed(0)
    return build_network("vnet_magic", 1, k, n_filters=2, patch=(32, 32, 16), grid=(2, 2, 1), fc_hidden=8,
                         normalization="batchnorm")


def _batch(k: int = 3, pl: bool = False):
    g = torch.Generator().manual_seed(1)
    b = {"image_l": torch.randn(2, 1, 32, 32, 16, generator=g), "label_l": torch.randint(0, k, (2, 32, 32, 16), generator=g),
         "image_u": torch.randn(2, 1, 32, 32, 16, generator=g)}
    if pl:
        b["pl_u"] = torch.randint(0, k, (2, 32, 32, 16), generator=g)
        b["pl_mask"] = torch.tensor([True, True])
    return b


def _teacher(net):
    def fn(x, noise=True, stochastic=False):
        with torch.no_grad():
            return net.eval()(x) if not noise else net.eval()(x + 0.01)
    return fn


def test_class_weights_follow_the_official_formula():
    m = build_method("magicnet", SSLParams(iterations=10, num_classes=3, magic_grid=(2, 2, 1)))
    assert m.class_weights(torch.tensor([100.0, 10.0, 1.0])).tolist() == pytest.approx([1.0, 0.1, 0.01])
    m2 = build_method("magicnet", SSLParams(iterations=10, num_classes=3, magic_grid=(2, 2, 1), magic_blend_T=2.0))
    assert m2.class_weights(torch.tensor([100.0, 25.0, 0.0])).tolist() == pytest.approx([1.0, 0.5, 0.0])


def test_step_losses_blending_schedule_and_pseudo_label_term():
    k = 3
    p = SSLParams(iterations=20, num_classes=k, magic_grid=(2, 2, 1), magic_blend_start=2, magic_blend_window=2)
    m = build_method("magicnet", p)
    net, teacher = _net(k), _net(k)
    b = _batch(k)
    x = torch.cat([b["image_l"], b["image_u"]])
    blends = []
    for step in range(5):
        d = m.step_loss(net.train(), x, 2, _teacher(teacher), b, step)
        blends.append(d["blend"].item())
        assert {"loss", "sup", "cons", "loc", "loc_acc", "w_cons", "pl_agree"} <= set(d) and "pl" not in d
        assert torch.isfinite(d["loss"])
    # distribution refreshed after steps 0, 2, 4; blending strictly after step 2, once a distribution exists
    assert blends == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert m.dist is not None and m.dist.max().item() == 1.0 and m.counts is None    # refreshed at step 4
    st = m.state_dict()
    m2 = build_method("magicnet", p)
    m2.load_state_dict(json.loads(json.dumps(st)))
    assert m2.state_dict() == st
    d["loss"].backward()
    assert all(q.grad is not None for q in net.location.parameters())         # the location head is trained
    # CFR_MagicNet: the same step plus w_pl * 0.5 (CE + Dice) of the plain forward vs the SAM label
    bp = _batch(k, pl=True)
    m3, m4 = build_method("magicnet", p), build_method("magicnet", p)
    torch.manual_seed(5)
    with_pl = m3.step_loss(net.eval(), x, 2, _teacher(teacher), bp, 0)
    torch.manual_seed(5)
    without = m4.step_loss(net.eval(), x, 2, _teacher(teacher), b, 0)
    with torch.no_grad():
        expect = seg_loss(net(x[2:]), bp["pl_u"])
    torch.testing.assert_close(with_pl["pl"], expect)
    torch.testing.assert_close(with_pl["loss"] - without["loss"], with_pl["w_pl"] * expect)


@pytest.fixture(scope="module")
def synth4(tmp_path_factory):
    root = tmp_path_factory.mktemp("mn")
    m = synthetic_manifest(root / "data", 4, 4, labeled=2, holdout=0)
    # the unlabeled cases' own labels stand in for SAM pseudo-labels
    return m.with_pseudo_labels({c.case_id: c.label for c in m.unlabeled})


def _cfg(**kw) -> RetrainConfig:
    base = {"network": "tiny", "network_kwargs": {"has_dropout": False}, "ssl": "magicnet", "patch": (32, 32, 16),
            "zoom": None, "lr": 0.05, "lr_schedule": "constant", "seed": 11, "device": "cpu",
            "magic_blend_start": 2, "magic_blend_window": 2, "magic_fc_hidden": 16, "checkpoint_interval_s": 3600.0}
    base.update(kw)
    return RetrainConfig(**base)


class _CancelAfter:
    """Set once the stage reported training iteration ``n`` (other cancel polls, e.g. while planning, do not
    count), so the stage stops right after that iteration."""

    def __init__(self, n: int) -> None:
        self.n, self.done = n, 0

    def progress(self, ev) -> None:
        if ev.stage == "retrain":
            self.done = max(self.done, ev.step)

    def is_set(self) -> bool:
        return self.done >= self.n


def test_resume_is_bit_exact_with_blending_state(synth4, tmp_path):
    cfg = _cfg(iterations=8)
    run_retrain(cfg, synth4, LocalStore(tmp_path / "a"))
    crashed = LocalStore(tmp_path / "b")
    with pytest.raises(Cancelled):
        stop = _CancelAfter(5)
        run_retrain(cfg, synth4, crashed, cancel=stop, progress=stop.progress)
    ck = load_checkpoint(crashed)
    assert ck["iteration"] == 5 and ck["method"]["dist"] is not None      # blending state is checkpointed
    torch.manual_seed(999)
    run_retrain(cfg.replace(resume=True), synth4, crashed)
    a, b = load_checkpoint(LocalStore(tmp_path / "a")), load_checkpoint(crashed)
    assert all(torch.equal(a["student"][k], b["student"][k]) for k in a["student"])
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert any(h["blend"] == 1.0 for h in a["history"]) and "pl" in a["history"][-1]
    assert any(k.startswith("location.") for k in a["student"])              # trained with the head ...
    art = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    assert art["network"] == "tiny" and not any(k.startswith("location.") for k in art["teacher"])  # ... kept without


def test_checkpoints_written_before_the_magic_fields_still_resume():
    """A saved config without the magic_* fields (older versions) means their defaults."""
    from cfrseg.stages.retrain import _config_diff

    cfg = _cfg(ssl="mt", iterations=5, magic_blend_start=100, magic_blend_window=20, magic_fc_hidden=4096)
    old = {k: v for k, v in cfg.to_dict().items() if not k.startswith("magic_")}
    assert _config_diff(old, cfg) == []
    assert _config_diff(old, cfg.replace(magic_loc_weight=0.5)) == ["magic_loc_weight"]
    assert _config_diff(old, _cfg(iterations=5)) == ["magic_blend_start", "magic_blend_window",
                                                     "magic_fc_hidden", "ssl"]


def test_magicnet_learns_on_synthetic_data(synth4, tmp_path):
    run_retrain(_cfg(iterations=24), synth4, LocalStore(tmp_path))
    hist = json.loads((tmp_path / "history.json").read_text(encoding="utf-8"))
    first = sum(h["sup"] for h in hist[:6]) / 6
    last = sum(h["sup"] for h in hist[-6:]) / 6
    assert last < 0.9 * first, (first, last)


def test_cli_and_gateway_offer_every_method():
    from cfrseg.cli import SSL_METHODS

    assert SSL_METHODS == METHODS and "magicnet" in METHODS
    gw = pytest.importorskip("services.gateway.runs")
    assert gw.SSL_METHODS == METHODS


def test_bf16_precision_runs_magicnet(synth4, tmp_path):
    """retrain.precision='bf16' autocasts MagicNet's passes; the small within-image cubes (< 48 voxels wide)
    run in float32 (oneDNN's bf16 weight gradient is wrong at a 2-voxel-wide deepest level)."""
    res = run_retrain(_cfg(iterations=2, precision="bf16", patch=(64, 64, 48)), synth4, LocalStore(tmp_path))
    hist = json.loads((tmp_path / "history.json").read_text(encoding="utf-8"))
    assert res.iterations == 2 and all(math.isfinite(h["loss"]) and math.isfinite(h["loc"]) for h in hist)
    art = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in art["student"].values() if v.is_floating_point())
