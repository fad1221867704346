"""Two-stream batch sampling and random cropping with a resumable state.

:class:`TwoStreamSampler` draws ``batch_labeled`` labeled and ``batch_unlabeled`` unlabeled case indices per step
from two independent streams. Each stream walks through shuffled permutations of its cases and continues into the
next permutation when one is used up, so a batch may be larger than the number of cases (L = 1 with
``batch_labeled = 2`` repeats the case; no assertion as in the reference's B7). Everything (the permutations,
the crop positions, the augmentation draws) comes from one ``numpy.random.Generator`` whose state is part of
:meth:`state_dict`, so a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cfrseg.ssl.augment import Aug, apply_aug, sample_aug, source_patch


class _Stream:
    def __init__(self, n: int) -> None:
        self.n = n
        self.perm: list[int] = []
        self.pos = 0

    def take(self, rng: np.random.Generator, count: int) -> list[int]:
        out: list[int] = []
        while len(out) < count:
            if self.pos >= len(self.perm):
                self.perm = [int(i) for i in rng.permutation(self.n)]
                self.pos = 0
            out.append(self.perm[self.pos])
            self.pos += 1
        return out


class TwoStreamSampler:
    """Independent labeled / unlabeled index streams plus per-sample crop and augmentation draws."""

    def __init__(self, n_labeled: int, n_unlabeled: int, batch_labeled: int, batch_unlabeled: int,
                 seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.lab, self.unl = _Stream(n_labeled), _Stream(n_unlabeled)
        self.batch_labeled, self.batch_unlabeled = batch_labeled, batch_unlabeled

    def next(self) -> tuple[list[int], list[int]]:
        """Case indices of the next step: (labeled, unlabeled); unlabeled is empty when there is none."""
        lab = self.lab.take(self.rng, self.batch_labeled)
        unl = self.unl.take(self.rng, self.batch_unlabeled) if self.unl.n and self.batch_unlabeled else []
        return lab, unl

    def draw_crop(self, shape: tuple[int, ...], patch: tuple[int, int, int], augment: bool,
                  p_flip: float = 0.5, foreground: np.ndarray | None = None,
                  foreground_prob: float = 0.0) -> tuple[Aug, tuple[int, int, int]]:
        """An augmentation and the crop start (in the un-rotated volume, may be negative = padding).

        With probability ``foreground_prob`` (and a non-empty ``foreground``: (N, 3) voxel indices, e.g. from
        :func:`foreground_voxels`) the crop is placed so that it contains one of those voxels drawn at random
        (nnU-Net's foreground oversampling); otherwise uniformly. With ``foreground_prob`` 0 no extra random
        number is drawn, so such runs see exactly the crops they saw before the option existed."""
        aug = sample_aug(self.rng, p_flip=p_flip) if augment else Aug()
        src = source_patch(patch, aug)
        fg = None
        use_fg = foreground_prob > 0 and foreground is not None and len(foreground) > 0
        if use_fg and float(self.rng.random()) < foreground_prob:   # the draw happens only when use_fg
            fg = foreground[int(self.rng.integers(len(foreground)))]
        start = []
        for a, (s, p) in enumerate(zip(shape, src)):
            if s >= p:
                lo, hi = 0, s - p
                if fg is not None:
                    lo, hi = max(lo, int(fg[a]) - p + 1), min(hi, int(fg[a]))
                start.append(int(self.rng.integers(lo, hi + 1)))
            else:  # pad symmetrically (centred), as the reference's RandomCrop does
                start.append(-((p - s) // 2))
        return aug, tuple(start)  # type: ignore[return-value]

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state,
                "lab": (list(self.lab.perm), self.lab.pos), "unl": (list(self.unl.perm), self.unl.pos)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.lab.perm, self.lab.pos = list(state["lab"][0]), int(state["lab"][1])
        self.unl.perm, self.unl.pos = list(state["unl"][0]), int(state["unl"][1])


def foreground_voxels(label: np.ndarray, limit: int = 100_000, seed: int = 0) -> np.ndarray:
    """(N, 3) int32 indices of the label's foreground voxels (value > 0); at most ``limit`` of them, a fixed
    subsample (``seed``) when there are more, so memory stays small for large structures."""
    flat = np.flatnonzero(label > 0)
    if flat.size > limit:
        flat = np.sort(np.random.default_rng(seed).choice(flat, limit, replace=False))
    return np.stack(np.unravel_index(flat, label.shape), axis=1).astype(np.int32)


def crop(arr: np.ndarray, start: tuple[int, int, int], size: tuple[int, int, int], fill: float = 0) -> np.ndarray:
    """Cut ``size`` voxels at ``start`` from an [x, y, z] array, padding with ``fill`` outside the array."""
    out = np.full(size, fill, dtype=arr.dtype)
    src, dst = [], []
    for st, sz, n in zip(start, size, arr.shape):
        a, b = max(st, 0), min(st + sz, n)
        src.append(slice(a, b))
        dst.append(slice(a - st, b - st))
    out[tuple(dst)] = arr[tuple(src)]
    return out


def crop_aug(arr: np.ndarray, aug: Aug, start: tuple[int, int, int], patch: tuple[int, int, int],
             fill: float = 0) -> np.ndarray:
    """Crop the source region for ``aug`` at ``start`` and transform it to shape ``patch``."""
    return apply_aug(crop(arr, start, source_patch(patch, aug), fill), aug)
