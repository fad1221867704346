"""The in-memory volume: a 3D array plus the geometry that places it in patient space.

Axis convention (used everywhere in cfrseg): ``array`` is indexed ``[x, y, z]`` (ITK index order, the same as
nibabel and the LA h5 files); the last axis is the slice axis. ``spacing`` and ``origin`` are in the same
(x, y, z) order, in millimetres; ``direction`` is ITK's 3x3 direction matrix, row-major, 9 floats.
SimpleITK's ``GetArrayFromImage`` returns ``[z, y, x]``; :mod:`cfrseg.data.io` transposes on read and write.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass
class Volume:
    array: np.ndarray                                   # (X, Y, Z)
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = field(default=IDENTITY)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    def with_array(self, array: np.ndarray) -> "Volume":
        """Same geometry, new voxels (e.g. a label map predicted for this image)."""
        return Volume(array, self.spacing, self.origin, self.direction)

    def same_geometry(self, other: "Volume", tol: float = 1e-4) -> bool:
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, rtol=tol, atol=tol)
            and np.allclose(self.origin, other.origin, rtol=tol, atol=1e-3)
            and np.allclose(self.direction, other.direction, atol=tol)
        )
