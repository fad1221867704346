"""Which 3D window one SAM mosaic holds: fixed in voxels, physical (``crop_mm``), or chosen by the dataset plan.

The paper (section III-B) uses two ways of turning a volume into mosaics: **volume mode** (LA: the slices of the
whole crop in one mosaic) and **patch mode** (BTCV, MACT: slices are large, so the volume is cut into 96^3
patches that are mosaicked, fine-tuned on, pseudo-labelled patch by patch and stitched back). A fine-tune config
picks its window in one of three ways (:func:`resolve_window`); the result is a :class:`Window` whose crop, grid
and mode go into the :class:`~cfrseg.sam.mosaic.MosaicSpec` stored in ``finetune.pt``, so pseudo-labelling uses
exactly the same windows.

- ``crop`` in voxels (mode ``"fixed"``): as given, whatever the data (the shipped profiles).
- ``crop_mm`` (mode ``"patch"``): a physical window (working axes: in-plane, in-plane, slice; mm) turned into
  voxels of the fine-tune working grid by :meth:`cfrseg.data.plan.Plan.patch_voxels` (no rounding multiple,
  capped by the median case), like the re-train stage's ``patch_mm``.
- ``crop = "auto"``, the **auto window rule** (:func:`auto_window`), from the plan's median working shape
  (wx, wy, wd) (the median case at the fine-tune working grid) and the model canvas ``image_size``:

  1. *volume mode* when the whole median volume, as one mosaic (in-plane side ``max(wx, wy)`` when rot90
     augmentation needs square windows, all ``wd`` slices, grid ceil(sqrt(wd))), fits the canvas shrunk by at
     most ``max_shrink`` (default 1.5): window = that whole volume;
  2. otherwise *patch mode*: cubic patches, each side capped by the median volume's extent; along the slice
     axis of a plan with few thick slices (``keep_slices``, e.g. ACDC) the window takes all ``wd`` slices
     instead. The cube side is ``patch_side`` when it is set (> 0); with ``patch_side = 0`` (the default) it is
     the paper's 96 (:data:`PAPER_SIDE`) or, when a 96 patch's mosaic would need more than ``max_shrink``, the
     largest side that fits (e.g. 49 on LiteMedSAM's 256 px canvas). A set ``patch_side`` whose mosaic does not
     fit is a :class:`~cfrseg.errors.ConfigError` that names the largest side that would.

The mosaic grid is the config's ``grid`` when it holds the window's slices, else ceil(sqrt(D)). "Shrink" is the
factor by which :func:`cfrseg.sam.concat.plan_mosaic` resizes the tiled grid down to the canvas (1 = unscaled).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cfrseg.errors import ConfigError

MODES = ("fixed", "volume", "patch")
PAPER_SIDE = 96          # the paper's patch side (BTCV, MACT): the auto rule's largest cube
Triple = tuple[int, int, int]


@dataclass(frozen=True)
class Window:
    """A resolved window: ``crop`` (X, Y, D) voxels of the working grid, mosaic ``grid`` side, ``mode`` (one of
    :data:`MODES`), ``shrink`` (canvas downscale of its mosaic, >= 1) and a one-line ``reason``."""

    crop: Triple
    grid: int
    mode: str
    shrink: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"crop": list(self.crop), "grid": self.grid, "mode": self.mode, "shrink": round(self.shrink, 4),
                "reason": self.reason}


def grid_for(grid: int, depth: int) -> int:
    """The mosaic grid side for ``depth`` slices: ``grid`` when it is set (> 0) and holds them, else
    ceil(sqrt(depth))."""
    return grid if grid > 0 and grid * grid >= depth else math.ceil(math.sqrt(depth))


def mosaic_shrink(crop: Sequence[int], image_size: int, grid: int, pad: int) -> float:
    """By how much the mosaic of a ``crop`` window is shrunk onto the ``image_size`` canvas (1.0 = not at all):
    the tiled square (grid x (side + 2 pad)) over the canvas, as :func:`cfrseg.sam.concat.plan_mosaic` does."""
    n = grid_for(grid, int(crop[2]))
    square = n * (max(int(crop[0]), int(crop[1])) + 2 * pad)
    return max(1.0, square / image_size)


def working_median(plan: Any, factor: Sequence[float]) -> Triple:
    """The plan's median case shape at the working grid of ``factor`` (working axes, voxels; rounded up)."""
    med = [plan.median_shape[a] for a in plan.working_order]
    if min(med) < 1:
        raise ConfigError("the dataset plan has no median case shape (made by an older cfrseg?): the window "
                          "cannot be chosen from it; set finetune.crop in voxels")
    return tuple(max(1, math.ceil(m / f)) for m, f in zip(med, plan.stage_factor(factor)))  # type: ignore[return-value]


def _patch(side: int, med: Triple, keep_slices: bool, square: bool) -> Triple:
    wx, wy, wd = med
    if square:
        px = py = min(side, max(wx, wy))
    else:
        px, py = min(side, wx), min(side, wy)
    return (px, py, wd if keep_slices else min(side, wd))


def auto_window(plan: Any, factor: Sequence[float], *, image_size: int, tile_pad: int, grid: int,
                patch_side: int, max_shrink: float, square: bool) -> Window:
    """The auto window rule (module docstring). ``square``: windows must be square in-plane (rot90)."""
    med = working_median(plan, factor)
    wx, wy, wd = med
    vol = (max(wx, wy), max(wx, wy), wd) if square else med
    g = grid_for(grid, wd)
    s = mosaic_shrink(vol, image_size, g, tile_pad)
    if s <= max_shrink:
        return Window(vol, g, "volume", s, f"volume mode: the median working volume {med} fits the "
                      f"{image_size} px canvas (shrink {s:.2f} <= {max_shrink:g})")
    side = patch_side or PAPER_SIDE
    crop = _patch(side, med, plan.keep_slices, square)
    g = grid_for(grid, crop[2])
    sp = mosaic_shrink(crop, image_size, g, tile_pad)
    if sp > max_shrink:
        fits = [c for c in range(side - 1, 0, -1)
                if mosaic_shrink(_patch(c, med, plan.keep_slices, square), image_size, grid, tile_pad)
                <= max_shrink]
        if patch_side or not fits:
            hint = (f"set finetune.patch_side <= {fits[0]}" if fits else "no patch side fits (too many slices "
                    "are kept): raise finetune.max_shrink or set finetune.crop")
            raise ConfigError(f"finetune.crop='auto': the median working volume {med} needs shrink {s:.2f} and a "
                              f"{crop} patch needs shrink {sp:.2f} on the {image_size} px canvas, more than "
                              f"max_shrink {max_shrink:g}; {hint}")
        crop = _patch(fits[0], med, plan.keep_slices, square)       # patch_side 0: the largest cube that fits
        g = grid_for(grid, crop[2])
        sp = mosaic_shrink(crop, image_size, g, tile_pad)
    slices = " (all slices: few thick slices)" if plan.keep_slices else ""
    return Window(crop, g, "patch", sp, f"patch mode: the median working volume {med} would need shrink "
                  f"{s:.2f} > {max_shrink:g}; {crop} patches{slices}, shrink {sp:.2f}")


def mm_window(plan: Any, factor: Sequence[float], crop_mm: Sequence[float], *, image_size: int, tile_pad: int,
              grid: int, max_shrink: float) -> Window:
    """``crop_mm`` (working axes, mm) as voxels of the working grid (capped by the median case), patch mode."""
    crop = plan.patch_voxels(crop_mm, factor, multiple=1)
    g = grid_for(grid, crop[2])
    s = mosaic_shrink(crop, image_size, g, tile_pad)
    if s > max_shrink:
        raise ConfigError(f"finetune.crop_mm {tuple(crop_mm)} is a {crop} voxel window whose {g}x{g} mosaic "
                          f"needs shrink {s:.2f} on the {image_size} px canvas, more than max_shrink "
                          f"{max_shrink:g}: take a smaller crop_mm or raise finetune.max_shrink")
    return Window(crop, g, "patch", s, f"patch mode: crop_mm {tuple(crop_mm)} = {crop} voxels, shrink {s:.2f}")


def resolve_window(crop: Sequence[int] | str, crop_mm: Sequence[float] | None, plan: Any, factor: Sequence[float],
                   *, image_size: int, tile_pad: int, grid: int, patch_side: int, max_shrink: float,
                   square: bool) -> Window:
    """The window of a fine-tune config (module docstring). ``plan`` may be None only for a voxel ``crop``."""
    if crop == "auto" and crop_mm is not None:
        raise ConfigError("finetune: crop='auto' and crop_mm both choose the window; set only one")
    if crop_mm is None and crop != "auto":
        c = tuple(int(v) for v in crop)
        g = grid_for(grid, c[2]) if grid == 0 else grid
        return Window(c, grid, "fixed", mosaic_shrink(c, image_size, g, tile_pad), "crop set in voxels")  # type: ignore[arg-type]
    if plan is None:
        raise ConfigError("finetune: crop='auto' / crop_mm are resolved through the dataset plan; none given")
    if crop_mm is not None:
        return mm_window(plan, factor, crop_mm, image_size=image_size, tile_pad=tile_pad, grid=grid,
                         max_shrink=max_shrink)
    return auto_window(plan, factor, image_size=image_size, tile_pad=tile_pad, grid=grid, patch_side=patch_side,
                       max_shrink=max_shrink, square=square)
