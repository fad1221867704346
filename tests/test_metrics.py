"""Metric values on hand-made cases, the empty policy and the summary."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cfrseg.errors import InputError
from cfrseg.metrics import (METRICS, case_mean, compute_case, format_table, paired_difference, paired_stats,
                            summarize, surface)


def cube(shape: tuple[int, int, int], lo: tuple[int, int, int], size: int) -> np.ndarray:
    a = np.zeros(shape, np.uint8)
    a[lo[0] : lo[0] + size, lo[1] : lo[1] + size, lo[2] : lo[2] + size] = 1
    return a


def brute_force(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...]) -> tuple[float, float]:
    """ASD (pred -> gt) and HD95 (pooled) by explicit pairwise distances between surface voxel centres."""
    sp = np.array(spacing)
    pp = np.argwhere(surface(pred.astype(bool))) * sp
    gg = np.argwhere(surface(gt.astype(bool))) * sp
    d = np.sqrt(((pp[:, None, :] - gg[None, :, :]) ** 2).sum(-1))
    d_pg, d_gp = d.min(1), d.min(0)
    return float(d_pg.mean()), float(np.percentile(np.concatenate([d_pg, d_gp]), 95))


def test_overlapping_cubes_exact_dice_jaccard() -> None:
    gt = cube((20, 20, 20), (2, 2, 2), 10)
    pred = cube((20, 20, 20), (7, 2, 2), 10)  # overlap 5x10x10 = 500 of 1000 each
    r = compute_case(pred, gt, (1.0, 1.0, 1.0), 2)
    assert list(r) == [*METRICS, "both_empty"] and r["both_empty"] == [False]
    assert r["dice"] == [pytest.approx(2 * 500 / 2000)]
    assert r["jaccard"] == [pytest.approx(500 / 1500)]


def test_shifted_cube_distances_anisotropic() -> None:
    spacing = (0.5, 0.5, 2.0)
    gt = cube((12, 12, 12), (3, 3, 3), 5)
    # 5^3 cube: 98 surface voxels. Shifted by one voxel along z (2 mm): the 25 voxels of the leading face are
    # 2 mm from the other surface; the 9 interior voxels of the trailing face are nearer to the side faces in
    # x/y (8 at one voxel = 0.5 mm, the centre at 1.0 mm) than to the face 2 mm below; all others lie on it.
    pred = np.roll(gt, 1, axis=2)
    r = compute_case(pred, gt, spacing, 2)
    assert r["asd"][0] == pytest.approx((25 * 2.0 + 8 * 0.5 + 1 * 1.0) / 98)
    assert r["hd95"][0] == pytest.approx(2.0)  # 50 of the 196 pooled distances are 2 mm
    # the same shift along x is 0.5 mm: 25 + 9 surface voxels at 0.5 mm
    r = compute_case(np.roll(gt, 1, axis=0), gt, spacing, 2)
    assert r["asd"][0] == pytest.approx(34 * 0.5 / 98)
    assert r["hd95"][0] == pytest.approx(0.5)


def test_distances_match_brute_force_on_irregular_shapes() -> None:
    rng = np.random.default_rng(0)
    gt = np.zeros((16, 14, 10), np.uint8)
    gt[3:11, 2:12, 2:8] = 1
    gt[rng.random(gt.shape) < 0.05] = 0
    pred = np.roll(gt, (2, -1, 1), axis=(0, 1, 2))
    pred[12:15, 1:4, 0:3] = 1  # a stray blob touching the image border
    spacing = (0.7, 1.1, 2.5)
    r = compute_case(pred, gt, spacing, 2)
    asd, hd95 = brute_force(pred, gt, spacing)
    assert r["asd"][0] == pytest.approx(asd)
    assert r["hd95"][0] == pytest.approx(hd95)


def test_empty_policy() -> None:
    gt = cube((8, 8, 8), (2, 2, 2), 3)
    empty = np.zeros_like(gt)
    for pred, truth in ((empty, gt), (gt, empty)):
        r = compute_case(pred, truth, (1, 1, 1), 2)
        assert r["dice"] == [0.0] and r["jaccard"] == [0.0]
        assert math.isnan(r["asd"][0]) and math.isnan(r["hd95"][0])
    # both empty: excluded (NaN, flagged), never a perfect 1
    r = compute_case(empty, empty, (1, 1, 1), 2)
    assert r["both_empty"] == [True] and all(math.isnan(r[m][0]) for m in METRICS)


def test_both_empty_is_excluded_and_missing_structures_count() -> None:
    """Multi-class: a class absent from a case's truth and prediction does not flatter the class mean (it is
    excluded, not 1); a structure the prediction misses counts as Dice 0 and as one n_nan for the distances."""
    gt = cube((12, 12, 12), (1, 1, 1), 4) + 2 * cube((12, 12, 12), (6, 6, 6), 4)
    only1 = cube((12, 12, 12), (1, 1, 1), 4)             # truth without class 2
    cases = [compute_case(gt, gt, (1, 1, 1), 3),           # perfect on both classes
             compute_case(only1, only1, (1, 1, 1), 3),     # class 2 absent from both: excluded
             compute_case(only1, gt, (1, 1, 1), 3)]        # class 2 missed: Dice 0, distances NaN
    s = summarize(cases)["metrics"]
    assert s["dice"]["mean"][1] == pytest.approx(0.5) and s["dice"]["n"][1] == 2
    assert s["dice"]["n_excluded"] == [0, 1] and s["dice"]["n_nan"] == [0, 0]
    assert s["hd95"]["n_nan"] == [0, 1] and s["hd95"]["n"] == [3, 1]
    table = format_table(summarize(cases), cases={"a": cases[1]})
    assert "excluded" in table and "(n_nan 1)" in table


def test_multiclass_per_class_values() -> None:
    gt = cube((10, 10, 10), (1, 1, 1), 3) + 2 * cube((10, 10, 10), (5, 5, 5), 3)
    pred = gt.copy()
    pred[pred == 2] = 0  # class 2 missed entirely
    r = compute_case(pred, gt, (1, 1, 1), 3)
    assert r["dice"] == [1.0, 0.0] and r["asd"][0] == 0.0 and math.isnan(r["hd95"][1])


def test_summary_excludes_and_counts_nans() -> None:
    perfect = {"dice": [1.0], "jaccard": [1.0], "asd": [0.0], "hd95": [0.0]}
    half = {"dice": [0.5], "jaccard": [1 / 3], "asd": [2.0], "hd95": [4.0]}
    missed = {"dice": [0.0], "jaccard": [0.0], "asd": [math.nan], "hd95": [math.nan]}
    s = summarize([perfect, half, missed])
    assert s["n_cases"] == 3 and s["classes"] == [1] and list(s["metrics"]) == list(METRICS)
    assert s["metrics"]["dice"]["mean"] == [pytest.approx(0.5)]
    assert s["metrics"]["dice"]["std"] == [pytest.approx(np.std([1, 0.5, 0], ddof=1))]
    assert s["metrics"]["asd"]["mean"] == [pytest.approx(1.0)]
    assert s["metrics"]["asd"]["std"] == [pytest.approx(np.std([0.0, 2.0], ddof=1))]
    assert s["metrics"]["asd"]["n"] == [2] and s["metrics"]["asd"]["n_nan"] == [1]
    table = format_table(s, class_names=["LA"], cases={"c1": perfect, "c3": missed})
    assert "0.5000 ± 0.5000" in table and "asd (mm)" in table and "LA" in table and "NaN" in table


def test_bad_inputs() -> None:
    a = np.zeros((4, 4, 4), np.uint8)
    with pytest.raises(InputError, match="shape"):
        compute_case(a, np.zeros((4, 4, 5), np.uint8), (1, 1, 1), 2)
    with pytest.raises(InputError, match="labels outside"):
        compute_case(a + 2, a, (1, 1, 1), 2)
    with pytest.raises(InputError, match="spacing"):
        compute_case(a, a, (1, 0, 1), 2)
    with pytest.raises(InputError):
        summarize([])


def test_case_mean_leaves_out_undefined_classes() -> None:
    assert case_mean({"dice": [0.5, math.nan, 1.0]}) == pytest.approx(0.75)
    assert case_mean({"hd95": [None, 4.0]}, "hd95") == 4.0
    assert math.isnan(case_mean({"dice": [math.nan, math.nan]}))
    assert case_mean({"dice": 0.3}) == 0.3


def test_paired_difference_counts_and_signs() -> None:
    # A is better on c1 and c2, worse on c3, equal on c4; c5 exists only in A; c6 has no defined Dice in B
    a = {"c1": {"dice": [0.9, 0.7]}, "c2": {"dice": [0.6, math.nan]}, "c3": {"dice": [0.2, 0.2]},
         "c4": {"dice": [0.5, 0.5]}, "c5": {"dice": [1.0, 1.0]}, "c6": {"dice": [0.4, 0.4]}}
    b = {"c1": {"dice": [0.5, 0.5]}, "c2": {"dice": [0.1, 0.9]}, "c3": {"dice": [0.4, 0.6]},
         "c4": {"dice": [0.5, 0.5]}, "c6": {"dice": [math.nan, math.nan]}}
    r = paired_difference(a, b)
    diffs = [0.8 - 0.5, 0.6 - 0.5, 0.2 - 0.5, 0.0]
    assert r["n_cases"] == 4 and (r["wins"], r["losses"], r["ties"]) == (2, 1, 1)
    assert r["mean_diff"] == pytest.approx(np.mean(diffs))
    assert r["mean_a"] == pytest.approx(np.mean([0.8, 0.6, 0.2, 0.5]))
    assert r["mean_b"] == pytest.approx(np.mean([0.5, 0.5, 0.5, 0.5]))
    assert r["mean_a"] - r["mean_b"] == pytest.approx(r["mean_diff"])
    assert 0.0 < r["wilcoxon_p"] <= 1.0
    # swapping the models flips the sign and the wins, not the p-value
    s = paired_difference(b, a)
    assert s["mean_diff"] == pytest.approx(-r["mean_diff"]) and (s["wins"], s["losses"]) == (1, 2)
    assert s["wilcoxon_p"] == pytest.approx(r["wilcoxon_p"])


def test_paired_stats_edge_cases() -> None:
    assert paired_stats([0.0, 0.0])["wilcoxon_p"] == 1.0
    empty = paired_stats([math.nan])
    assert empty["n_cases"] == 0 and math.isnan(empty["mean_diff"]) and empty["wilcoxon_p"] == 1.0
    # ten consistent wins: the signed-rank test sees them (exact two-sided p = 2 / 2**10)
    assert paired_stats(np.linspace(0.01, 0.1, 10))["wilcoxon_p"] == pytest.approx(2 / 2 ** 10)
