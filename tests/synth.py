"""Helpers for tests: small synthetic K-class volumes (NIfTI images/ + labels/), each foreground class a box of
its own intensity at a jittered position, so that every class is present in every case and is learnable."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from cfrseg.data.datasets import manifest_from_folders
from cfrseg.data.io import write_volume
from cfrseg.data.manifest import Manifest
from cfrseg.data.volume import Volume


def synthetic_case(k: int, shape=(48, 48, 20), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(image float32, label uint8) [x, y, z]: K-1 boxes on an in-plane grid of cells (a cell per class),
    class c with mean intensity c / (K - 1), Gaussian noise 0.08, background 0."""
    rng = np.random.default_rng(seed)
    n = math.ceil(math.sqrt(k - 1))
    cx, cy = shape[0] // n, shape[1] // n
    if min(cx, cy) < 6:
        raise ValueError(f"shape {shape} too small for {k - 1} boxes")
    lab = np.zeros(shape, np.uint8)
    for c in range(1, k):
        i, j = divmod(c - 1, n)
        w, h = max(3, cx - 4), max(3, cy - 4)
        x0 = i * cx + int(rng.integers(1, cx - w + 1))
        y0 = j * cy + int(rng.integers(1, cy - h + 1))
        z0 = int(rng.integers(1, max(2, shape[2] // 4)))
        z1 = shape[2] - int(rng.integers(1, max(2, shape[2] // 4)))
        lab[x0:x0 + w, y0:y0 + h, z0:z1] = c
    img = lab.astype(np.float32) / (k - 1) + rng.normal(0, 0.08, shape).astype(np.float32)
    return img.astype(np.float32), lab


def write_synthetic(dest: Path, k: int, n_cases: int, shape=(48, 48, 20), spacing=(1.0, 1.0, 2.0)) -> Path:
    """dest/images/case_XX.nii.gz and dest/labels/case_XX.nii.gz for ``n_cases`` cases."""
    for sub in ("images", "labels"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_cases):
        img, lab = synthetic_case(k, shape, seed=i)
        write_volume(Volume(img, spacing), dest / "images" / f"case_{i:02d}.nii.gz", label=False)
        write_volume(Volume(lab, spacing), dest / "labels" / f"case_{i:02d}.nii.gz", label=True)
    return dest


def synthetic_manifest(dest: Path, k: int, n_cases: int = 4, labeled: int = 1, holdout: int = 1,
                       shape=(48, 48, 20)) -> Manifest:
    """A manifest over :func:`write_synthetic` files: the first ``labeled`` cases labeled, the last ``holdout``
    test, the rest unlabeled (their labels kept for scoring pseudo-labels)."""
    write_synthetic(dest, k, n_cases, shape)
    return manifest_from_folders(dest / "images", dest / "labels", labeled, k, holdout=holdout, name=f"synth{k}")
