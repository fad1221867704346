"""Dataset fingerprint (as nnU-Net's, own code): the facts about a dataset that the plan is derived from.

Computed over the **training** cases (labeled and unlabeled; test cases never influence training):

- per case: shape, spacing, orientation (ITK/DICOM letters, e.g. ``LPS``, ``RAS``), obliqueness, and shape and
  spacing in the canonical orientation (:mod:`cfrseg.data.resample`);
- intensity statistics of the labeled foreground (up to 10,000 voxels sampled per labeled case with a fixed
  seed): mean, std, min, max, median and the 0.5 / 99.5 percentiles (for CT these are HU: the plan clips to
  them);
- voxel counts per class over the labeled cases. A declared class without any labeled voxel is an error
  naming it (:func:`cfrseg.data.datasets.class_presence_error`).

Unlabeled cases are read for their header only where the format allows (NIfTI, NRRD, MHA, LA h5).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cfrseg.data.manifest import Manifest
from cfrseg.data.resample import canonical_map, obliqueness, orientation_code
from cfrseg.progress import CancelFlag, ProgressEvent, ProgressFn, check_cancel, emit

VERSION = 1
FG_SAMPLES = 10_000        # foreground voxels sampled per labeled case (nnU-Net's number)
PERCENTILES = (0.5, 99.5)


def _case_geometry(case_id: str, role: str, shape, spacing, direction) -> dict[str, Any]:
    amap = canonical_map(direction)
    return {"case_id": case_id, "role": role, "shape": [int(s) for s in shape],
            "spacing": [float(s) for s in spacing], "orientation": orientation_code(direction),
            "oblique_deg": round(obliqueness(direction), 3),
            "canonical_shape": list(amap.shape([int(s) for s in shape])),
            "canonical_spacing": [float(s) for s in amap.shape(spacing)]}


def compute_fingerprint(data: Manifest, *, progress: ProgressFn | None = None,
                        cancel: CancelFlag | None = None, stage: str = "plan") -> dict[str, Any]:
    """The fingerprint of ``data``'s training cases (plain JSON-able dict, see the module docstring).

    Labeled cases are loaded and validated with :func:`cfrseg.data.datasets.load_case`. Raises InputError
    (unreadable case, no training case, a class without labeled voxels)."""
    from cfrseg.data.datasets import class_presence_error, load_case
    from cfrseg.data.io import read_geometry
    from cfrseg.errors import InputError
    from cfrseg.provenance import digest, manifest_record

    cases = data.training
    if not cases:
        raise InputError(f"manifest {data.name!r} has no training case to plan from")
    geoms, samples = [], []
    counts = np.zeros(data.num_classes, dtype=np.int64)
    for i, c in enumerate(cases):
        check_cancel(cancel, stage)
        if c.role == "labeled":
            image, label = load_case(c, data, check_pseudo=False)
            assert label is not None
            lab = label.array
            flat = lab.reshape(-1).astype(np.int64)
            counts += np.bincount(flat, minlength=data.num_classes)[: data.num_classes]
            fg = image.array[lab > 0]
            if fg.size > FG_SAMPLES:
                fg = np.random.default_rng(i).choice(fg, FG_SAMPLES, replace=False)
            samples.append(fg.astype(np.float64))
            geom = image
        else:
            geom = read_geometry(c.image)
        spacing = data.spacing or geom.spacing
        geoms.append(_case_geometry(c.case_id, c.role, geom.shape, spacing, geom.direction))
        emit(progress, ProgressEvent(stage, i + 1, len(cases), message=f"fingerprint {c.case_id}"))
    err = class_presence_error(counts, data.names, f"dataset {data.name!r}")
    if err is not None:
        raise err
    fg = np.concatenate(samples) if samples else np.zeros(0)
    stats: dict[str, Any] = {"n": int(fg.size)}
    if fg.size:
        lo, hi = np.percentile(fg, PERCENTILES)
        stats.update(mean=float(fg.mean()), std=float(fg.std()), min=float(fg.min()), max=float(fg.max()),
                     median=float(np.median(fg)), p00_5=float(lo), p99_5=float(hi))
    return {"version": VERSION, "manifest": digest(manifest_record(data, cases)), "modality": data.modality,
            "num_classes": data.num_classes, "class_names": list(data.names), "cases": geoms,
            "class_voxels": [int(v) for v in counts], "foreground": stats}


def distance_unit(fingerprint: dict[str, Any]) -> str:
    """The unit to print next to surface distances (ASD, HD95): "mm", or "mm = voxels" when every case carries a
    1 mm isotropic spacing. Such data often has no real spacing (e.g. the shared ACDC copy: a nominal 1 mm), and
    then its distances are voxel steps; with a real 1 mm grid both readings give the same numbers."""
    cases = fingerprint.get("cases") or []
    if cases and all(all(float(s) == 1.0 for s in c["spacing"]) for c in cases):
        return "mm = voxels"
    return "mm"
