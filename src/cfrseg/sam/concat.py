"""Concatenate module: a 3D volume <-> a 2D mosaic of its slices (F_C and its inverse F_C^-1).

Layout (see docs/sam.md): the D slices along the LAST axis of an (X, Y, D) volume become tiles of a row-major
``n_rows x n_cols`` grid (slot = row * n_cols + col), slice order kept. A tile is ``vol[:, :, z]`` as is (tile
rows = x, tile columns = y; the reference code transposes it, we do not). Each tile may get ``pad`` pixels of
fill on every side. Empty slots go at the end (``empty="end"``, default) or are split front/back
(``empty="split"``, the reference code's choice). Non-square slices keep rectangular tiles; the rectangular grid
is padded at the bottom/right to a square. That square is then either padded (bottom/right) to the model's
canvas size when it fits (no scaling), or resized to the canvas (bilinear for images/probabilities, nearest for
labels) when it is larger (or always, with ``upscale=True``).

Everything is a reshape/permute on torch tensors of any leading shape ``(*lead, X, Y, D) -> (*lead, S, S)``,
on the input's device. The inverse is bit-exact for labels when no scaling happens.

Also here: the patch-mode helpers (:func:`tile_starts`, :func:`grid_starts`) and the fine-tune augmentations
(:func:`random_bezier`, :func:`rot_flip`), which act on the 3D volume before mosaicking so that fine-tuning and
pseudo-labelling see the same orientation family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from cfrseg.errors import InputError

EmptyPolicy = Literal["end", "split"]
Mode = Literal["auto", "bilinear", "nearest"]


@dataclass(frozen=True)
class MosaicLayout:
    """Where every voxel of an (X, Y, D) volume lands on an S x S canvas. Build it with :func:`plan_mosaic`.

    Unscaled geometry: tile pitch ``pitch_h x pitch_w`` = slice size + 2 * pad; the grid is
    ``grid_h x grid_w`` = (n_rows * pitch_h) x (n_cols * pitch_w), anchored top-left in a ``square x square``
    image. That square is resized by ``scale`` to ``inner x inner`` (inner = square when scale == 1) and placed
    top-left on the ``canvas x canvas`` output.
    """

    shape: tuple[int, int, int]   # (X, Y, D) of the volume
    n_rows: int
    n_cols: int
    pad: int                      # fill pixels on every side of each tile
    front: int                    # empty slots before the first slice
    canvas: int                   # output side S
    scale: float                  # inner / square (1.0 = no resizing)
    inner: int                    # side of the (resized) square on the canvas

    @property
    def tile_h(self) -> int:
        return self.shape[0]

    @property
    def tile_w(self) -> int:
        return self.shape[1]

    @property
    def depth(self) -> int:
        return self.shape[2]

    @property
    def pitch_h(self) -> int:
        return self.tile_h + 2 * self.pad

    @property
    def pitch_w(self) -> int:
        return self.tile_w + 2 * self.pad

    @property
    def grid_h(self) -> int:
        return self.n_rows * self.pitch_h

    @property
    def grid_w(self) -> int:
        return self.n_cols * self.pitch_w

    @property
    def square(self) -> int:
        return max(self.grid_h, self.grid_w)

    @property
    def slots(self) -> int:
        return self.n_rows * self.n_cols

    @property
    def scaled(self) -> bool:
        return self.inner != self.square

    def slot_of(self, z: int) -> tuple[int, int]:
        """(row, col) of slice z in the grid."""
        s = self.front + z
        return divmod(s, self.n_cols)


def plan_mosaic(
    shape: tuple[int, ...],
    canvas: int,
    *,
    n_rows: int | None = None,
    n_cols: int | None = None,
    pad: int = 0,
    empty: EmptyPolicy = "end",
    upscale: bool = False,
) -> MosaicLayout:
    """Compute the layout for volumes whose last three dims are ``shape`` = (X, Y, D) on a canvas x canvas image.

    Grid: n x n with n = ceil(sqrt(D)) unless ``n_rows``/``n_cols`` are given (one given: the other is
    ceil(D / given)). Raises InputError when the grid cannot hold all D slices (never drops slices).
    ``upscale``: also resize grids smaller than the canvas up to it (default: pad them, no interpolation).
    """
    if len(shape) < 3:
        raise InputError(f"plan_mosaic: need a shape (..., X, Y, D), got {tuple(shape)}")
    x, y, d = (int(v) for v in shape[-3:])
    if min(x, y, d) < 1:
        raise InputError(f"plan_mosaic: empty volume shape {(x, y, d)}")
    if canvas < 1 or pad < 0:
        raise InputError(f"plan_mosaic: canvas must be >= 1 and pad >= 0 (got {canvas}, {pad})")
    if empty not in ("end", "split"):
        raise InputError(f"plan_mosaic: empty must be 'end' or 'split', got {empty!r}")
    if n_rows is None and n_cols is None:
        n_rows = n_cols = math.ceil(math.sqrt(d))
    elif n_rows is None:
        n_rows = math.ceil(d / n_cols)  # type: ignore[operator]
    elif n_cols is None:
        n_cols = math.ceil(d / n_rows)
    assert n_rows is not None and n_cols is not None
    if n_rows < 1 or n_cols < 1 or n_rows * n_cols < d:
        raise InputError(f"plan_mosaic: a {n_rows}x{n_cols} grid cannot hold {d} slices")
    free = n_rows * n_cols - d
    front = free // 2 if empty == "split" else 0
    square = max(n_rows * (x + 2 * pad), n_cols * (y + 2 * pad))
    if square > canvas or (upscale and square < canvas):
        inner, scale = canvas, canvas / square
    else:
        inner, scale = square, 1.0
    return MosaicLayout((x, y, d), n_rows, n_cols, pad, front, canvas, scale, inner)


def _resolve_mode(t: torch.Tensor, mode: Mode) -> str:
    if mode == "auto":
        return "bilinear" if t.is_floating_point() else "nearest"
    if mode not in ("bilinear", "nearest"):
        raise InputError(f"mode must be 'auto', 'bilinear' or 'nearest', got {mode!r}")
    return mode


def _resize(img: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Resize the last two dims (square) of ``img`` (*lead, H, W) to size x size."""
    lead = img.shape[:-2]
    flat = img.reshape(-1, 1, *img.shape[-2:])
    if mode == "nearest":
        out = F.interpolate(flat.float(), size=(size, size), mode="nearest-exact").to(img.dtype)
    else:
        shrink = size < img.shape[-1]
        out = F.interpolate(flat.float(), size=(size, size), mode="bilinear", align_corners=False,
                            antialias=shrink).to(img.dtype)
    return out.reshape(*lead, size, size)


def _check_vol(vol: torch.Tensor, layout: MosaicLayout) -> None:
    if vol.dim() < 3 or tuple(vol.shape[-3:]) != layout.shape:
        raise InputError(f"volume shape {tuple(vol.shape)} does not end with the layout's {layout.shape}")


def to_mosaic(vol: torch.Tensor, layout: MosaicLayout, *, mode: Mode = "auto", fill: float = 0) -> torch.Tensor:
    """Volume (*lead, X, Y, D) -> mosaic (*lead, S, S) on the same device and dtype.

    ``mode``: "auto" = bilinear for floating tensors (images, probabilities), nearest for integer/bool (labels);
    only used when the layout scales. ``fill`` is the value of tile padding, empty slots and canvas padding.
    """
    _check_vol(vol, layout)
    lo = layout
    lead = vol.shape[:-3]
    t = vol.reshape(-1, *lo.shape).permute(0, 3, 1, 2)                       # (N, D, X, Y)
    back = lo.slots - lo.depth - lo.front
    t = F.pad(t, (lo.pad, lo.pad, lo.pad, lo.pad), value=fill) if lo.pad else t
    if lo.front or back:
        t = F.pad(t.permute(0, 2, 3, 1), (lo.front, back), value=fill).permute(0, 3, 1, 2)  # (N, slots, ph, pw)
    n = t.shape[0]
    t = t.reshape(n, lo.n_rows, lo.n_cols, lo.pitch_h, lo.pitch_w).permute(0, 1, 3, 2, 4)
    t = t.reshape(n, lo.grid_h, lo.grid_w)
    t = F.pad(t, (0, lo.square - lo.grid_w, 0, lo.square - lo.grid_h), value=fill)
    if lo.scaled:
        t = _resize(t, lo.inner, _resolve_mode(vol, mode))
    if lo.inner < lo.canvas:
        t = F.pad(t, (0, lo.canvas - lo.inner, 0, lo.canvas - lo.inner), value=fill)
    return t.reshape(*lead, lo.canvas, lo.canvas)


def from_mosaic(mosaic: torch.Tensor, layout: MosaicLayout, *, mode: Mode = "auto") -> torch.Tensor:
    """Mosaic (*lead, S, S) -> volume (*lead, X, Y, D): the exact inverse of :func:`to_mosaic`.

    Labels (integer dtype) come back bit-exact when the layout does not scale (nearest resize otherwise).
    Probabilities/logits: pass (*lead, K, S, S) floats; resized bilinearly when the layout scales.
    """
    lo = layout
    if mosaic.dim() < 2 or tuple(mosaic.shape[-2:]) != (lo.canvas, lo.canvas):
        raise InputError(f"mosaic shape {tuple(mosaic.shape)} does not end with ({lo.canvas}, {lo.canvas})")
    lead = mosaic.shape[:-2]
    t = mosaic.reshape(-1, lo.canvas, lo.canvas)[:, : lo.inner, : lo.inner]
    if lo.scaled:
        t = _resize(t, lo.square, _resolve_mode(mosaic, mode))
    n = t.shape[0]
    t = t[:, : lo.grid_h, : lo.grid_w].reshape(n, lo.n_rows, lo.pitch_h, lo.n_cols, lo.pitch_w)
    t = t.permute(0, 1, 3, 2, 4).reshape(n, lo.slots, lo.pitch_h, lo.pitch_w)
    t = t[:, lo.front : lo.front + lo.depth, lo.pad : lo.pad + lo.tile_h, lo.pad : lo.pad + lo.tile_w]
    return t.permute(0, 2, 3, 1).reshape(*lead, *lo.shape)


def validity_mask(layout: MosaicLayout, device: torch.device | str | None = None) -> torch.Tensor:
    """(S, S) bool: True on pixels that carry a real slice voxel, False on tile padding, empty slots and canvas
    padding. Without scaling its sum is X * Y * D; with scaling it is the nearest-resized footprint."""
    ones = torch.ones(layout.shape, dtype=torch.uint8, device=device)
    return to_mosaic(ones, layout, mode="nearest", fill=0).bool()


# ---------------------------------------------------------------- patch mode: in-plane tiling with overlap

def tile_starts(length: int, tile: int, overlap: float = 0.25) -> list[int]:
    """Start offsets of windows of size ``tile`` covering [0, length) with at least ``overlap`` (fraction) overlap.

    The last window ends exactly at ``length``; a tile >= length gives [0] (the caller pads or keeps the
    short crop). Overlapping predictions are meant to be averaged by the pseudo-label stage.
    """
    if tile < 1 or length < 1 or not 0 <= overlap < 1:
        raise InputError(f"tile_starts: need length, tile >= 1 and 0 <= overlap < 1 (got {length}, {tile}, {overlap})")
    if tile >= length:
        return [0]
    stride = max(1, int(tile * (1 - overlap)))
    n = math.ceil((length - tile) / stride) + 1
    if n == 1:
        return [0]
    # spread the windows evenly between 0 and length - tile
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def grid_starts(shape: tuple[int, ...], tile: tuple[int, ...], overlap: float = 0.25) -> list[tuple[int, ...]]:
    """All start corners (per axis, row-major) of windows ``tile`` over ``shape`` (e.g. (X, Y) in-plane or
    (X, Y, D)), each axis by :func:`tile_starts`."""
    if len(shape) != len(tile):
        raise InputError(f"grid_starts: shape {shape} and tile {tile} differ in length")
    axes = [tile_starts(s, t, overlap) for s, t in zip(shape, tile)]
    out: list[tuple[int, ...]] = [()]
    for starts in axes:
        out = [o + (s,) for o in out for s in starts]
    return out


# ---------------------------------------------------------------- fine-tune augmentations (3D, before mosaicking)

def normalize01(vol: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Min-max scale each volume (last three dims) of (*lead, X, Y, D) to [0, 1] (a constant volume -> 0)."""
    flat = vol.reshape(*vol.shape[:-3], -1).float()
    lo = flat.amin(-1, keepdim=True)
    hi = flat.amax(-1, keepdim=True)
    return ((flat - lo) / (hi - lo).clamp_min(eps)).reshape(vol.shape)


def bezier_curves(n: int, points: int = 256, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random monotone cubic Bezier curves from (0,0) to (1,1), sampled at ``points`` parameter values.

    Control points P1, P2 are uniform in [0,1]^2 with their x and y coordinates each sorted (x1 <= x2,
    y1 <= y2), which makes x(t) and y(t) non-decreasing, so y(x) is monotone. P1, P2 on the diagonal gives the
    identity. Returns (xs, ys), each (n, points), xs non-decreasing from 0 to 1.
    """
    c = torch.rand(n, 2, 2, generator=generator).sort(dim=1).values.to(device)   # (n, [P1,P2], [x,y])
    t = torch.linspace(0, 1, points, device=device)[None, :]
    b1, b2, b3 = 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3
    xs = b1 * c[:, 0, 0:1] + b2 * c[:, 1, 0:1] + b3
    ys = b1 * c[:, 0, 1:2] + b2 * c[:, 1, 1:2] + b3
    return xs, ys


def apply_curves(x: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Map values of x (B, ...) in [0,1] through per-sample piecewise-linear curves (B, P) by interpolation."""
    b = x.shape[0]
    flat = x.reshape(b, -1).clamp(0, 1).contiguous()
    xs = xs.to(flat).contiguous()
    ys = ys.to(flat)
    p = xs.shape[1]
    hi = torch.searchsorted(xs, flat).clamp(1, p - 1)
    lo = hi - 1
    x0, x1 = xs.gather(1, lo), xs.gather(1, hi)
    y0, y1 = ys.gather(1, lo), ys.gather(1, hi)
    w = ((flat - x0) / (x1 - x0).clamp_min(1e-12)).clamp(0, 1)
    return (y0 + w * (y1 - y0)).reshape(x.shape)


def random_bezier(x: torch.Tensor, p: float = 0.5, points: int = 256,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample random monotone Bezier intensity curve on a batch x (B, ...) of values in [0, 1] (normalise
    each volume with :func:`normalize01` first). Each sample gets a curve with probability ``p`` and is left
    unchanged otherwise. Vectorised: one LUT per sample, applied by torch interpolation."""
    b = x.shape[0]
    xs, ys = bezier_curves(b, points, generator, x.device)
    keep = torch.rand(b, generator=generator).to(x.device) >= p
    ident = torch.linspace(0, 1, points, device=x.device).expand(b, -1)
    xs = torch.where(keep[:, None], ident, xs)
    ys = torch.where(keep[:, None], ident, ys)
    return apply_curves(x, xs, ys).to(x.dtype)


def sample_rot_flip(generator: torch.Generator | None = None) -> tuple[int, bool]:
    """Random in-plane orientation: k in {0, 1, 2, 3} quarter turns and a flip with probability 0.5 (8 outcomes,
    identity included)."""
    k = int(torch.randint(0, 4, (1,), generator=generator))
    flip = bool(torch.rand(1, generator=generator) < 0.5)
    return k, flip


def rot_flip(vol: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """Rotate (*lead, X, Y, D) by k quarter turns in the (X, Y) plane, then flip along X if ``flip``. Apply the
    same (k, flip) to image and label; odd k swaps X and Y."""
    t = torch.rot90(vol, k, dims=(-3, -2)) if k % 4 else vol
    return torch.flip(t, dims=(-3,)) if flip else t


def undo_rot_flip(vol: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """Inverse of :func:`rot_flip` (e.g. to bring a prediction back to the original orientation)."""
    t = torch.flip(vol, dims=(-3,)) if flip else vol
    return torch.rot90(t, -k, dims=(-3, -2)) if k % 4 else t
