"""Evaluation of label maps against ground truth: folders (``cfrseg evaluate``) and in-memory cases.

Writes a JSON with per-case values and the summary (mean/std, ddof=1, NaN counts) from :mod:`cfrseg.metrics`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from cfrseg.data.io import read_la_h5, read_volume, strip_suffix, volume_suffix
from cfrseg.data.volume import Volume
from cfrseg.errors import InputError
from cfrseg.metrics import compute_case, format_table, summarize


def evaluate_arrays(items: Iterable[tuple[str, np.ndarray, Volume]], num_classes: int) -> dict[str, Any]:
    """``items``: (case_id, predicted label map, ground-truth Volume). Returns {"cases", "summary", "table"}."""
    cases: dict[str, dict[str, list[float]]] = {}
    for cid, pred, gt in items:
        if pred.shape != gt.shape:
            raise InputError(f"case {cid}: prediction shape {pred.shape} differs from ground truth {gt.shape}")
        cases[cid] = compute_case(pred, gt.array, gt.spacing, num_classes)
    if not cases:
        raise InputError("nothing to evaluate: no cases")
    summary = summarize(list(cases.values()))
    return {"cases": cases, "summary": summary, "table": format_table(summary, cases=cases)}


def _gt_files(gt: Path) -> dict[str, Path]:
    """case id -> ground-truth file: a folder of label files, or the LA layout (<id>/mri_norm2.h5)."""
    out: dict[str, Path] = {}
    for p in sorted(gt.iterdir()):
        if p.is_dir() and (p / "mri_norm2.h5").is_file():
            out[p.name] = p / "mri_norm2.h5"
        elif p.is_file() and volume_suffix(p):
            out[strip_suffix(p)] = p
    return out


def _read_gt(path: Path) -> Volume:
    return read_la_h5(path, "label") if path.suffix == ".h5" else read_volume(path)


def evaluate_folders(pred: str | Path, gt: str | Path, num_classes: int | None = None,
                     json_path: str | Path | None = None) -> dict[str, Any]:
    """Compare every ``<case_id>.<ext>`` in ``pred`` with the same case in ``gt``. Geometry must match."""
    pred, gt = Path(pred), Path(gt)
    for name, d in (("--pred", pred), ("--gt", gt)):
        if not d.is_dir():
            raise InputError(f"{name} {d} is not a folder")
    preds = {strip_suffix(p): p for p in sorted(pred.iterdir()) if p.is_file() and volume_suffix(p)}
    if not preds:
        raise InputError(f"--pred {pred}: no label files (.nii.gz, .nii, .nrrd, .mha) found")
    gts = _gt_files(gt)
    missing = sorted(set(preds) - set(gts))
    if missing:
        raise InputError(f"--gt {gt}: no ground truth for predicted case(s) {missing[:5]}")
    loaded = []
    kmax = 1
    for cid, p in preds.items():
        pv, gv = read_volume(p), _read_gt(gts[cid])
        if not pv.same_geometry(gv) and pv.shape != gv.shape:
            raise InputError(f"case {cid}: prediction shape {pv.shape} differs from ground truth {gv.shape}")
        pa = np.asarray(pv.array)
        if pa.dtype.kind == "f":
            if not np.array_equal(pa, np.round(pa)):
                raise InputError(f"case {cid}: prediction {p} is not a label map (non-integer values)")
        pa = pa.astype(np.int64)
        kmax = max(kmax, int(pa.max(initial=0)), int(np.asarray(gv.array).max(initial=0)))
        loaded.append((cid, pa, gv.with_array(np.asarray(gv.array).astype(np.int64))))
    k = num_classes or max(2, kmax + 1)
    res = evaluate_arrays(loaded, k)
    if json_path:
        write_json(json_path, {"num_classes": k, "cases": res["cases"], "summary": res["summary"]})
    return res


def _clean(o: Any) -> Any:
    if isinstance(o, float) and math.isnan(o):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, (np.floating, np.integer)):
        return _clean(o.item())
    return o


def write_json(path: str | Path, obj: Any) -> None:
    """JSON with NaN written as null (strict JSON)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(_clean(obj), indent=2))
