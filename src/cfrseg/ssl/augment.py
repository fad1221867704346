"""Training augmentations: random rot90 in the (x, y) plane and a random flip (reference-doc section 9.3).

``k`` is drawn from {0, 1, 2, 3} and the flip happens with probability ``p_flip`` along x or y, so the identity is
reachable (the reference always flips). One :class:`Aug` is drawn per training sample and applied identically to
the image, the label and the pseudo-label of that sample.

The transform is applied to the *crop*: :func:`source_patch` gives the size of the region to cut from the
un-rotated volume so that the transformed crop has the requested patch shape. Cropping a uniformly placed
window and then rotating it has the same distribution as rotating the volume first, and is much cheaper.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Aug:
    k: int = 0                     # number of 90-degree rotations in the (x, y) plane
    flip_axis: int | None = None   # 0 (x) or 1 (y), applied after the rotation; None = no flip

    @property
    def is_identity(self) -> bool:
        return self.k == 0 and self.flip_axis is None


IDENTITY = Aug()


def sample_aug(rng: np.random.Generator, rotate: bool = True, flip: bool = True, p_flip: float = 0.5) -> Aug:
    """Draw one transform (always consumes the same number of random numbers, for reproducibility)."""
    k, f, axis = int(rng.integers(0, 4)), float(rng.random()), int(rng.integers(0, 2))
    return Aug(k=k if rotate else 0, flip_axis=axis if (flip and f < p_flip) else None)


def source_patch(patch: tuple[int, int, int], aug: Aug) -> tuple[int, int, int]:
    """Shape of the region to crop before ``aug`` so that the result has shape ``patch``."""
    return (patch[1], patch[0], patch[2]) if aug.k % 2 else tuple(patch)  # type: ignore[return-value]


def apply_aug(arr: np.ndarray, aug: Aug) -> np.ndarray:
    """Apply ``aug`` to an [x, y, z] array (contiguous copy)."""
    out = np.rot90(arr, aug.k, axes=(0, 1)) if aug.k else arr
    if aug.flip_axis is not None:
        out = np.flip(out, axis=aug.flip_axis)
    return np.ascontiguousarray(out)
