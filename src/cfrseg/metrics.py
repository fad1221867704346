"""Segmentation metrics per case and class (Dice, Jaccard, ASD, HD95; distances in millimetres) and their
summary over cases. Pure functions; the conventions are written down in docs/metrics.md.

- Metric order is fixed everywhere: :data:`METRICS` = dice, jaccard, asd, hd95.
- Classes: foreground classes ``1 .. num_classes - 1``, one value each, in lists indexed by ``class - 1``.
- Surfaces: a mask's surface is its voxels removed by one binary erosion with the 3x3x3 *connectivity-1*
  (6-neighbour) structure, the image border counting as outside (as medpy). Distances are Euclidean in mm
  (``scipy.ndimage.distance_transform_edt`` with ``sampling=spacing``).
- ASD = mean distance from each *prediction* surface voxel to the nearest ground-truth surface voxel (medpy's
  ``asd(pred, gt)``, the one the reference reports); HD95 = 95th percentile of the distances pooled over both
  directions (medpy's ``hd95``).
- Empty policy: both masks empty -> the case-class pair is **excluded** (all four metrics NaN, flagged in
  ``both_empty``; counted as ``n_excluded``, never as a perfect 1); exactly one empty -> dice = jaccard = 0
  (a missed or invented structure counts in the mean), asd = hd95 = NaN (a distance to nothing is undefined;
  counted as ``n_nan`` and reported next to every ASD / HD95 mean).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from cfrseg.errors import InputError

METRICS = ("dice", "jaccard", "asd", "hd95")
UNITS = {"dice": "", "jaccard": "", "asd": "mm", "hd95": "mm"}
_STRUCTURE = ndimage.generate_binary_structure(3, 1)


def _check(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], num_classes: int) -> None:
    if pred.shape != gt.shape:
        raise InputError(f"metrics: prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    if pred.ndim != 3:
        raise InputError(f"metrics: expected 3D label maps (X, Y, Z), got shape {pred.shape}")
    if len(spacing) != 3 or any(not (float(s) > 0) for s in spacing):
        raise InputError(f"metrics: spacing must be three positive numbers (mm), got {tuple(spacing)}")
    if num_classes < 2:
        raise InputError(f"metrics: num_classes counts the background and must be >= 2, got {num_classes}")
    for name, a in (("prediction", pred), ("ground truth", gt)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise InputError(
                f"metrics: {name} has labels outside 0..{num_classes - 1} ({a.min()}..{a.max()})"
            )


def surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels of a mask (X, Y, Z): the mask minus its connectivity-1 erosion (border = outside)."""
    return mask & ~ndimage.binary_erosion(mask, structure=_STRUCTURE, border_value=0)


def _crop_box(a: np.ndarray, b: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of a | b grown by one voxel (clipped): surfaces and distances inside it equal the
    full-volume ones, since every surface voxel of either mask lies in it."""
    idx = np.nonzero(a | b)
    return tuple(slice(max(int(i.min()) - 1, 0), min(int(i.max()) + 2, n)) for i, n in zip(idx, a.shape))


def surface_distances(
    a: np.ndarray, b: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from every surface voxel of ``a`` to the surface of ``b``, and from ``b``'s to ``a``'s.
    Both masks must be non-empty."""
    box = _crop_box(a, b)
    sa, sb = surface(a[box]), surface(b[box])
    sampling = tuple(float(s) for s in spacing)
    d_to_b = ndimage.distance_transform_edt(~sb, sampling=sampling)
    d_to_a = ndimage.distance_transform_edt(~sa, sampling=sampling)
    return d_to_b[sa], d_to_a[sb]


def binary_metrics(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """dice, jaccard, asd, hd95 of two boolean masks (X, Y, Z), with the empty policy of this module."""
    p, g = pred.astype(bool, copy=False), gt.astype(bool, copy=False)
    np_, ng = int(p.sum()), int(g.sum())
    if np_ == 0 and ng == 0:
        return {"dice": math.nan, "jaccard": math.nan, "asd": math.nan, "hd95": math.nan}
    if np_ == 0 or ng == 0:
        return {"dice": 0.0, "jaccard": 0.0, "asd": math.nan, "hd95": math.nan}
    inter = int(np.logical_and(p, g).sum())
    d_pg, d_gp = surface_distances(p, g, spacing)
    return {
        "dice": 2.0 * inter / (np_ + ng),
        "jaccard": inter / (np_ + ng - inter),
        "asd": float(d_pg.mean()),
        "hd95": float(np.percentile(np.concatenate([d_pg, d_gp]), 95)),
    }


def compute_case(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], num_classes: int
) -> dict[str, list[float]]:
    """Metrics of one case: ``{"dice": [...], "jaccard": [...], "asd": [...], "hd95": [...], "both_empty":
    [...]}`` with one value per foreground class (index ``class - 1``); ``both_empty[j]`` marks a class absent
    from both maps (its metrics are NaN and :func:`summarize` excludes it). ``pred`` and ``gt`` are integer
    label maps (X, Y, Z) of the same shape; ``spacing`` is (x, y, z) in mm."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    _check(pred, gt, spacing, num_classes)
    out: dict[str, list] = {m: [] for m in (*METRICS, "both_empty")}
    for c in range(1, num_classes):
        p, g = pred == c, gt == c
        for m, v in binary_metrics(p, g, spacing).items():
            out[m].append(v)
        out["both_empty"].append(bool(not p.any() and not g.any()))
    return out


def _stats(values: np.ndarray, excluded: np.ndarray) -> tuple[float, float, int, int, int]:
    kept = values[~excluded]
    ok = kept[~np.isnan(kept)]
    mean = float(ok.mean()) if ok.size else math.nan
    std = float(ok.std(ddof=1)) if ok.size > 1 else math.nan
    return mean, std, int(ok.size), int(kept.size - ok.size), int(excluded.sum())


def summarize(cases: Sequence[Mapping[str, Sequence[float]]]) -> dict[str, Any]:
    """Summary over cases (each a :func:`compute_case` result; other keys are ignored).

    Returns ``{"n_cases": N, "classes": [1, ..], "metrics": {metric: {"mean": [..], "std": [..], "n": [..],
    "n_nan": [..], "n_excluded": [..], "class_mean": float}}}`` with per-class lists; std has ddof=1 (NaN with
    < 2 values). Pairs where both maps are empty (``both_empty``) are excluded and counted in ``n_excluded``;
    other NaNs (a distance to a missing structure) are left out and counted in ``n_nan``; ``n`` is the number
    of values used. ``class_mean`` is the mean of the per-class means. Metrics in :data:`METRICS` order.
    """
    if not cases:
        raise InputError("metrics: nothing to summarize (no cases)")
    n_cls = {len(c["dice"]) for c in cases}
    if len(n_cls) != 1:
        raise InputError(f"metrics: cases have different numbers of classes {sorted(n_cls)}")
    k = n_cls.pop()
    metrics: dict[str, Any] = {}
    empty = np.array([[bool(v) for v in c.get("both_empty", [False] * k)] for c in cases],
                     dtype=bool).reshape(len(cases), k)
    for m in METRICS:
        table = np.array([[float(v) for v in c[m]] for c in cases], dtype=np.float64).reshape(len(cases), k)
        cols = [_stats(table[:, j], empty[:, j]) for j in range(k)]
        means = [s[0] for s in cols]
        finite = [v for v in means if not math.isnan(v)]
        metrics[m] = {
            "mean": means,
            "std": [s[1] for s in cols],
            "n": [s[2] for s in cols],
            "n_nan": [s[3] for s in cols],
            "n_excluded": [s[4] for s in cols],
            "class_mean": float(np.mean(finite)) if finite else math.nan,
        }
    return {"n_cases": len(cases), "classes": list(range(1, k + 1)), "metrics": metrics}


def _header(m: str) -> str:
    return f"{m} ({UNITS[m]})" if UNITS[m] else m


def _fmt(v: float, digits: int) -> str:
    return "nan" if v is None or math.isnan(v) else f"{v:.{digits}f}"


def class_label(c: int, class_names: Mapping[int, str] | Sequence[str] | None = None) -> str:
    """Display name of class ``c``: ``class_names`` is a mapping class -> name or a sequence of the foreground
    names (index ``c - 1``); ``"class c"`` when not given."""
    if class_names is None:
        return f"class {c}"
    if isinstance(class_names, Mapping):
        return str(class_names.get(c, f"class {c}"))
    return str(class_names[c - 1]) if 0 < c <= len(class_names) else f"class {c}"


def format_table(
    summary: Mapping[str, Any],
    class_names: Mapping[int, str] | Sequence[str] | None = None,
    cases: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
    digits: int = 4,
) -> str:
    """A plain-text table for the CLI: optional per-case rows (``cases``: case id -> compute_case result),
    then one "mean ± std" row per class, with more than one foreground class a "mean over classes" row
    (``class_mean``), then the NaN counts. ``class_names``: names of the foreground classes, a sequence indexed
    by ``class - 1`` or a mapping class -> name."""
    classes = list(summary["classes"])

    def cname(c: int) -> str:
        return class_label(c, class_names)

    rows: list[list[str]] = [["case", "class", *(_header(m) for m in METRICS)]]
    for cid, res in (cases or {}).items():
        for j, c in enumerate(classes):
            empty = bool(res.get("both_empty", [False] * len(classes))[j])
            rows.append([str(cid), cname(c), *("excluded" if empty else _fmt(float(res[m][j]), digits)
                                               for m in METRICS)])
    mets = summary["metrics"]
    for j, c in enumerate(classes):
        cells = []
        for m in METRICS:
            cell = f"{_fmt(mets[m]['mean'][j], digits)} ± {_fmt(mets[m]['std'][j], digits)}"
            if UNITS[m]:
                cell += f" (n_nan {mets[m]['n_nan'][j]})"
            cells.append(cell)
        rows.append([f"mean (n={summary['n_cases']})", cname(c), *cells])
    if len(classes) > 1:   # multi-class: the mean over classes (of the per-class means), as multi-organ papers report
        rows.append([f"mean (n={summary['n_cases']})", "mean over classes",
                     *(_fmt(mets[m]["class_mean"], digits) for m in METRICS)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    nan_notes = [
        f"{m} {cname(c)}: {mets[m]['n_nan'][j]}"
        for m in METRICS
        for j, c in enumerate(classes)
        if mets[m]["n_nan"][j]
    ]
    if nan_notes:
        lines.append("NaN (exactly one mask empty; left out of mean/std): " + ", ".join(nan_notes))
    excl = [f"{cname(c)}: {mets['dice'].get('n_excluded', [0] * len(classes))[j]}"
            for j, c in enumerate(classes) if mets["dice"].get("n_excluded", [0] * len(classes))[j]]
    if excl:
        lines.append("excluded (class absent from both prediction and truth): " + ", ".join(excl))
    return "\n".join(lines)


def case_mean(metrics: Mapping[str, Any], metric: str = "dice") -> float:
    """One case's figure: ``metric`` averaged over its foreground classes (a :func:`compute_case` result or a
    scalar), NaN / None (excluded or undefined pairs) left out; NaN when nothing is left."""
    v = metrics[metric]
    vals = [float(x) for x in (v if isinstance(v, (list, tuple)) else [v]) if x is not None]
    vals = [x for x in vals if not math.isnan(x)]
    return float(np.mean(vals)) if vals else math.nan


def paired_stats(diff: Sequence[float]) -> dict[str, Any]:
    """Summary of per-case differences A - B (NaN left out): their mean, wins / losses / ties of A, and the
    two-sided Wilcoxon signed-rank p-value (1.0 when every difference is zero or none is left)."""
    from scipy.stats import wilcoxon

    d = np.asarray(diff, dtype=np.float64)
    d = d[~np.isnan(d)]
    p = float(wilcoxon(d, alternative="two-sided").pvalue) if d.size and np.any(d != 0) else 1.0
    return {"n_cases": int(d.size), "mean_diff": float(d.mean()) if d.size else math.nan,
            "wins": int((d > 0).sum()), "losses": int((d < 0).sum()), "ties": int((d == 0).sum()),
            "wilcoxon_p": p}


def paired_difference(a: Mapping[str, Mapping[str, Any]], b: Mapping[str, Mapping[str, Any]],
                      metric: str = "dice") -> dict[str, Any]:
    """Paired per-case comparison of two models evaluated on the same cases (``a``, ``b``: case id ->
    :func:`compute_case` result): :func:`paired_stats` of the per-case :func:`case_mean` differences A - B over
    the cases both have, plus each model's mean over those cases (``mean_a``, ``mean_b``)."""
    ids = sorted(set(a) & set(b))
    va = np.array([case_mean(a[c], metric) for c in ids], dtype=np.float64)
    vb = np.array([case_mean(b[c], metric) for c in ids], dtype=np.float64)
    ok = ~(np.isnan(va) | np.isnan(vb))
    out = paired_stats(va[ok] - vb[ok])
    out.update(metric=metric, mean_a=float(va[ok].mean()) if ok.any() else math.nan,
               mean_b=float(vb[ok].mean()) if ok.any() else math.nan)
    return out
