"""Prior calibration of pseudo-label probabilities (cfrseg.sam.calibrate) and its use in the pseudo-label stage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cfrseg.errors import ConfigError, InputError
from cfrseg.sam.calibrate import apply_class_weights, class_fractions, fit_class_weights, subsample
from cfrseg.stages.pseudolabel import PseudolabelConfig, evaluate_sam, probs_to_label, run_pseudolabel
from cfrseg.store import LocalStore
from tests.test_pseudolabel import la_small  # noqa: F401  (module fixture: 3 real LA crops + tiny SAM)


def _binary(p1: torch.Tensor) -> torch.Tensor:
    return torch.stack([1 - p1, p1], dim=1)


def test_class_fractions_pool_voxels():
    a, b = np.zeros((4, 4, 4), np.uint8), np.zeros((2, 2, 2), np.uint8)
    a[:2] = 1          # 32 of 64
    b[0, 0, 0] = 2     # 1 of 8
    f = class_fractions([a, b], 3)
    np.testing.assert_allclose(f, [39 / 72, 32 / 72, 1 / 72])
    with pytest.raises(InputError, match="no voxel"):
        class_fractions([np.zeros((0,), np.uint8)], 2)


def test_binary_weights_hit_the_prior_exactly_and_keep_the_order():
    g = torch.Generator().manual_seed(0)
    p1 = torch.rand(100_000, generator=g) ** 3                # skewed towards background: argmax fg ~ 21%
    s = _binary(p1)
    assert abs(float((p1 > 0.5).double().mean()) - 0.206) < 0.01
    w = fit_class_weights(s, [0.6, 0.4])
    lab = apply_class_weights(s.T, w).argmax(0)
    assert abs(float(lab.double().mean()) - 0.4) < 1e-3
    # a monotone re-labelling: every voxel labelled fg before stays fg (threshold only moved down)
    assert bool(lab[p1 > 0.5].all())
    thr = 1 / (1 + w[1])
    assert torch.equal(lab.bool(), p1 > thr)


def test_multiclass_weights_converge_to_the_prior():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(50_000, 4, generator=g) + torch.tensor([2.0, 0.0, -0.5, -1.0])
    s = torch.softmax(logits, 1)
    prior = [0.55, 0.25, 0.12, 0.08]
    w = fit_class_weights(s, prior)
    assert w[0] == pytest.approx(1.0)
    frac = torch.bincount(apply_class_weights(s.T, w).argmax(0), minlength=4).double() / s.shape[0]
    np.testing.assert_allclose(frac.numpy(), prior, atol=0.01)


def test_absent_class_and_identity_weights():
    s = _binary(torch.linspace(0, 1, 101))
    assert fit_class_weights(s, [1.0, 0.0]) == [1.0, 1.0]
    p = torch.rand(2, 3, 3, 3)
    assert apply_class_weights(p, None) is p and apply_class_weights(p, [1.0, 1.0]) is p
    with pytest.raises(InputError, match="3 class weights for 2"):
        apply_class_weights(p, [1.0, 2.0, 3.0])
    with pytest.raises(InputError, match="prior has 3 classes"):
        fit_class_weights(s, [0.5, 0.25, 0.25])


def test_subsample_is_seeded_and_bounded():
    p = torch.rand(2, 10, 10, 10)
    a, b = subsample(p, 100, seed=3), subsample(p, 100, seed=3)
    assert a.shape == (100, 2) and torch.equal(a, b)
    assert subsample(p, 5000).shape == (1000, 2)


def test_probs_to_label_with_weights():
    p1 = torch.tensor([0.1, 0.3, 0.6]).view(1, 3, 1, 1)
    probs = torch.cat([1 - p1, p1])[:, :, 0, 0][..., None, None]   # (2, 3, 1, 1)
    lab, conf = probs_to_label(probs)
    assert lab.ravel().tolist() == [0, 0, 1]
    lab, conf = probs_to_label(probs, [1.0, 0.8 / 0.2])             # threshold 0.2
    assert lab.ravel().tolist() == [0, 1, 1]
    assert float(conf.min()) >= 0.5


def test_config_rejects_unknown_calibration():
    with pytest.raises(ConfigError, match="calibration must be one of"):
        PseudolabelConfig(calibration="platt")
    with pytest.raises(ConfigError, match="calibration_cases"):
        PseudolabelConfig(calibration_cases=0)


@pytest.mark.la
def test_stage_fits_once_matches_the_prior_and_refuses_mixed_stores(la_small, tmp_path):  # noqa: F811
    m, ft = la_small
    cfg = PseudolabelConfig(calibration="prior", calibration_cases=2, calibration_voxels=20_000,
                            calibration_min_labeled=1)
    out = LocalStore(tmp_path / "pl")
    res = run_pseudolabel(cfg, m, out, finetuned=ft)
    cal = json.loads(out.get_bytes("calibration.json"))
    assert res.calibration == cal and res.class_weights == cal["weights"]
    assert cal["cases"] == [c.case_id for c in m.unlabeled]
    # the prior is the labeled case's foreground fraction; the calibrated fraction on the samples matches it
    assert cal["fractions_calibrated"][1] == pytest.approx(cal["prior"][1], abs=2e-3)
    assert cal["threshold"] == pytest.approx(1 / (1 + cal["weights"][1]))
    # the written labels use the weights: their foreground fraction is near the prior too
    from cfrseg.data.io import read_volume

    fg = np.mean([float((read_volume(p).array > 0).mean()) for p in res.paths.values()])
    assert fg == pytest.approx(cal["prior"][1], rel=0.25)
    # rerun: the stored weights are reused, nothing is recomputed
    again = run_pseudolabel(cfg.replace(resume=True), m, out, finetuned=ft)
    assert again.calibration == cal and sorted(again.skipped) == sorted(res.labels)
    # labels made with another calibration are never mixed in
    with pytest.raises(ConfigError, match="settings: calibration 'prior'->'none'"):
        run_pseudolabel(PseudolabelConfig(resume=True), m, out, finetuned=ft)
    # SAM alone, scored with and without the weights: both valid, on the same case
    ev = evaluate_sam(PseudolabelConfig(roles=("labeled",)), m, ft, class_weights=res.class_weights)
    assert list(ev["cases"]) == [m.labeled[0].case_id]


@pytest.mark.la
def test_too_few_labeled_volumes_keep_the_argmax(la_small, tmp_path):  # noqa: F811
    m, ft = la_small                                   # one labeled case
    res = run_pseudolabel(PseudolabelConfig(calibration="prior"), m, LocalStore(tmp_path / "pl"), finetuned=ft)
    plain = run_pseudolabel(PseudolabelConfig(), m, LocalStore(tmp_path / "plain"), finetuned=ft)
    assert res.class_weights is None and "calibration_min_labeled" in res.calibration["reason"]
    from cfrseg.data.io import read_volume

    for cid in res.paths:
        assert np.array_equal(read_volume(res.paths[cid]).array, read_volume(plain.paths[cid]).array)
