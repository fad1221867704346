"""Geometry transforms between a volume's source grid and the plan's working grid.

Two steps, both invertible:

1. **Reorientation** (:class:`AxisMap`): a permutation and flips of the array axes, exact (no interpolation).
   :func:`canonical_map` turns any direction matrix into the canonical orientation **LPS**: array axis 0 runs
   towards the patient's Left, axis 1 towards Posterior, axis 2 towards Superior, i.e. the direction matrix
   becomes the identity (ITK's physical space is LPS). An oblique volume is permuted/flipped to the nearest
   axis-aligned orientation; its residual rotation (< 45 degrees) stays in the direction matrix, nothing is
   interpolated. :meth:`AxisMap.then` composes maps (the plan moves the slice axis last after this).
2. **Resampling** to a target spacing: :func:`target_shape` gives ``round(size * spacing / target)`` per axis
   (an axis whose spacing already matches keeps its size exactly), :func:`resize_image` (trilinear or area)
   and :func:`resize_label` (nearest, half-voxel centred, or one-hot averaging) do the work on torch tensors.

Arrays are indexed ``[x, y, z]`` as everywhere in cfrseg; functions accept leading (batch / class) dims.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from cfrseg.data.volume import Volume
from cfrseg.errors import InputError

Triple = tuple[int, int, int]
A = TypeVar("A", np.ndarray, torch.Tensor)
#: the canonical orientation: ITK direction = identity (array axes towards Left, Posterior, Superior)
CANONICAL = "LPS"
_AXIS_LETTERS = (("L", "R"), ("P", "A"), ("S", "I"))   # (+, -) world direction of ITK's x, y, z


def orientation_code(direction: Sequence[float]) -> str:
    """Three letters naming where each array axis points (ITK/DICOM convention: ``"LPS"`` for the identity,
    ``"RAS"`` for nibabel's canonical), from the dominant component of each direction column."""
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    out = []
    for j in range(3):
        w = int(np.argmax(np.abs(d[:, j])))
        out.append(_AXIS_LETTERS[w][0 if d[w, j] >= 0 else 1])
    return "".join(out)


def obliqueness(direction: Sequence[float]) -> float:
    """Largest angle (degrees) between an array axis and its nearest world axis (0 for axis-aligned)."""
    d = np.abs(np.asarray(direction, dtype=float).reshape(3, 3))
    cos = np.clip(d.max(axis=0) / np.maximum(np.linalg.norm(d, axis=0), 1e-12), -1, 1)
    return float(np.degrees(np.arccos(cos)).max())


@dataclass(frozen=True)
class AxisMap:
    """New array axis k is old axis ``perm[k]``, reversed when ``flip[k]``. Exact and invertible."""

    perm: Triple = (0, 1, 2)
    flip: tuple[bool, bool, bool] = (False, False, False)

    @property
    def identity(self) -> bool:
        return self.perm == (0, 1, 2) and not any(self.flip)

    def shape(self, shape: Sequence[int]) -> Triple:
        """The shape (or spacing, any per-axis triple) of the mapped array."""
        return tuple(shape[p] for p in self.perm)  # type: ignore[return-value]

    def unshape(self, shape: Sequence[int]) -> Triple:
        """Inverse of :meth:`shape`: a per-axis triple of the mapped array back in source axis order."""
        out = [0, 0, 0]
        for k, p in enumerate(self.perm):
            out[p] = shape[k]
        return tuple(out)  # type: ignore[return-value]

    def apply(self, a: A) -> A:
        """Map an array (*lead, X, Y, Z) to the new axis order (numpy or torch; a view where possible)."""
        if self.identity:
            return a
        lead = a.ndim - 3
        order = list(range(lead)) + [lead + p for p in self.perm]
        t = a.transpose(order) if isinstance(a, np.ndarray) else a.permute(order)
        dims = [lead + k for k in range(3) if self.flip[k]]
        if not dims:
            return t
        return np.flip(t, axis=dims) if isinstance(t, np.ndarray) else torch.flip(t, dims=dims)

    def invert(self, a: A) -> A:
        """Bring a mapped array back to the source axis order (the exact inverse of :meth:`apply`)."""
        if self.identity:
            return a
        lead = a.ndim - 3
        dims = [lead + k for k in range(3) if self.flip[k]]
        if dims:
            a = np.flip(a, axis=dims) if isinstance(a, np.ndarray) else torch.flip(a, dims=dims)
        inv = [0, 0, 0]
        for k, p in enumerate(self.perm):
            inv[p] = k
        order = list(range(lead)) + [lead + i for i in inv]
        return a.transpose(order) if isinstance(a, np.ndarray) else a.permute(order)

    def then(self, other: "AxisMap") -> "AxisMap":
        """The map that applies ``self`` and then ``other``."""
        perm = tuple(self.perm[other.perm[k]] for k in range(3))
        flip = tuple(self.flip[other.perm[k]] != other.flip[k] for k in range(3))
        return AxisMap(perm, flip)  # type: ignore[arg-type]

    def volume(self, v: Volume) -> Volume:
        """The same physical voxels with the array mapped: direction columns permuted/negated, spacing
        permuted, origin moved to the voxel that becomes index (0, 0, 0)."""
        d = np.asarray(v.direction, dtype=float).reshape(3, 3)
        corner = [0, 0, 0]
        for k, p in enumerate(self.perm):
            if self.flip[k]:
                corner[p] = v.shape[p] - 1
        origin = np.asarray(v.origin, float) + d @ (np.asarray(v.spacing, float) * np.asarray(corner, float))
        cols = [d[:, p] * (-1.0 if self.flip[k] else 1.0) for k, p in enumerate(self.perm)]
        nd = np.stack(cols, axis=1)
        return Volume(np.ascontiguousarray(self.apply(v.array)),
                      self.shape(v.spacing),  # type: ignore[arg-type]
                      tuple(float(x) for x in origin), tuple(float(x) for x in nd.reshape(-1)))

    def to_dict(self) -> dict:
        return {"perm": list(self.perm), "flip": list(self.flip)}


def canonical_map(direction: Sequence[float]) -> AxisMap:
    """The permutation + flips that bring ``direction`` closest to the identity (canonical LPS): the
    permutation maximising the summed |cosine| between new axes and world axes (ties: the first in
    lexicographic order), each axis flipped when it points the negative way."""
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    if not np.all(np.isfinite(d)) or abs(np.linalg.det(d)) < 1e-6:
        raise InputError(f"direction matrix {d.round(4).tolist()} is singular or not finite")
    best, score = (0, 1, 2), -1.0
    for perm in itertools.permutations(range(3)):
        s = sum(abs(d[k, p]) for k, p in enumerate(perm))
        if s > score + 1e-9:
            best, score = perm, s
    flip = tuple(bool(d[k, p] < 0) for k, p in enumerate(best))
    return AxisMap(best, flip)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- resampling

def target_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> Triple:
    """Size per axis after resampling from ``spacing`` to ``target`` (mm): round(n * spacing / target), at
    least 1; an axis whose spacing equals the target (relative 1e-6) keeps its size exactly."""
    out = []
    for n, s, t in zip(shape, spacing, target):
        if t <= 0 or s <= 0:
            raise InputError(f"spacings must be positive, got {tuple(spacing)} -> {tuple(target)}")
        r = s / t
        out.append(int(n) if abs(r - 1.0) < 1e-6 else max(1, int(round(n * r))))
    return tuple(out)  # type: ignore[return-value]


def resize_image(t: torch.Tensor, size: Sequence[int], mode: str = "linear") -> torch.Tensor:
    """Resample a float (C, X, Y, Z) tensor to (C, *size). ``mode``: "linear" = trilinear
    (align_corners=False, the 3D network's path), "area" = area averaging when every axis shrinks and
    trilinear otherwise (the SAM path). Same size: returned as is."""
    if tuple(t.shape[-3:]) == tuple(size):
        return t
    x = t[None].float()
    if mode == "area" and all(o <= i for o, i in zip(size, t.shape[-3:])):
        return F.interpolate(x, size=tuple(size), mode="area")[0]
    if mode not in ("linear", "area"):
        raise InputError(f"resize_image: mode must be 'linear' or 'area', got {mode!r}")
    return F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=False)[0]


def resize_label(t: torch.Tensor, size: Sequence[int], num_classes: int | None = None) -> torch.Tensor:
    """Resample an integer label map (X, Y, Z) to ``size``: nearest neighbour, half-voxel centred
    ("nearest-exact"); with ``num_classes``, by area-averaging the one-hot maps and taking the argmax (no
    class vanishes by aliasing when shrinking). Returns uint8 (uint16 above 256 classes); same size: as is."""
    if tuple(t.shape) == tuple(size):
        return t
    dtype = torch.uint8 if (num_classes or 256) <= 256 else torch.int32
    if num_classes is not None:
        onehot = F.one_hot(t.long(), num_classes).permute(3, 0, 1, 2).float()
        return resize_image(onehot, size, "area").argmax(0).to(dtype)
    out = F.interpolate(t[None, None].float(), size=tuple(size), mode="nearest-exact")[0, 0]
    return out.to(dtype)
