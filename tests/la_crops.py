"""Helpers for tests: small real LA cases, cropped around the atrium and written as NIfTI (images/, labels/)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cfrseg.data.io import read_la_h5, write_volume


def write_cropped_la(la_dir: Path, ids: list[str], dest: Path, size=(64, 64, 32)) -> Path:
    """Writes dest/images/<id>.nii.gz and dest/labels/<id>.nii.gz, each cropped to ``size`` around the label's
    centre (real voxels, real geometry: spacing 0.625 mm, origin shifted to the crop)."""
    (dest / "images").mkdir(parents=True, exist_ok=True)
    (dest / "labels").mkdir(parents=True, exist_ok=True)
    for cid in ids:
        h5 = la_dir / cid / "mri_norm2.h5"
        img, lab = read_la_h5(h5, "image"), read_la_h5(h5, "label")
        centre = np.round(np.argwhere(lab.array > 0).mean(0)).astype(int)
        lo = [int(min(max(c - s // 2, 0), n - s)) for c, s, n in zip(centre, size, lab.shape)]
        sl = tuple(slice(a, a + s) for a, s in zip(lo, size))
        origin = tuple(o + a * sp for o, a, sp in zip(img.origin, lo, img.spacing))
        for vol, sub, is_label in ((img, "images", False), (lab, "labels", True)):
            v = vol.with_array(np.ascontiguousarray(vol.array[sl]))
            v.origin = origin
            write_volume(v, dest / sub / f"{cid}.nii.gz", label=is_label)
    return dest
