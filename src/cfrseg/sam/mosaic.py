"""Volume -> SAM input, shared by fine-tuning and pseudo-labelling so both see exactly the same thing.

One :class:`MosaicSpec` fixes how a 3D volume becomes model inputs: per-volume intensity normalisation to
[0, 1] (percentile clip; :class:`cfrseg.sam.model.CfrSam` takes [0, 1] images and applies the model's own
pixel mean/std), an
optional 3D zoom (e.g. x0.5 in-plane for LiteMedSAM's 256 px input), the 3D window (``crop``: X, Y, D slices)
that one mosaic holds, the grid (ceil(sqrt(D)) squared by default), tile padding, and the in-plane orientation
family (rot90 / flip) used for augmentation at fine-tune time and for test-time augmentation at pseudo-label
time. The spec is stored inside ``finetune.pt``, so the pseudo-label stage uses the fine-tune settings by
construction.

Uses of the same window (``mode``; chosen by :mod:`cfrseg.sam.window`):
- the paper's "volume" mode: ``crop = (112, 112, 80)``, 9x9 grid on a 1024 canvas (the whole crop in one image);
- the paper's "scale" mode (Fig. 5b): ``crop = (X, Y, s*s)``, an s x s grid of contiguous slices;
- the paper's "patch" mode (BTCV/MACT): 96^3 patches of volumes whose slices are too large for one mosaic.
At prediction time the whole (zoomed) volume is covered by such windows (in-plane overlap averaged, slice
groups along D; in patch mode windows overlap along D too), see :func:`plan_windows`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cfrseg.errors import ConfigError, InputError
from cfrseg.sam import concat

Orientation = tuple[int, bool]   # (quarter turns in the (X, Y) plane, flip along X afterwards)


@dataclass(frozen=True)
class MosaicSpec:
    """How volumes become mosaics. All sizes are in voxels of the zoomed volume."""

    image_size: int                               # model input side S (256 LiteMedSAM, 1024 SAM ViT)
    crop: tuple[int, int, int]                    # (X, Y, D) of the 3D window one mosaic holds
    grid: int = 0                                 # grid side; 0 = ceil(sqrt(D))
    tile_pad: int = 1                             # fill pixels around every tile
    zoom: tuple[float, float, float] = (1.0, 1.0, 1.0)   # legacy resample factors (used only without a plan)
    spacing_factor: tuple[float, float, float] = (1.0, 1.0, 1.0)  # working grid = plan target spacing x this
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    rot90: bool = True                            # orientation family: quarter turns in-plane
    flip: bool = True                             # orientation family: mirror in-plane
    mode: str = "fixed"                           # fixed | volume | patch (cfrseg.sam.window); patch: windows
                                                  # also overlap along the slice axis at prediction time

    def check(self) -> None:
        """Raise ConfigError on impossible values (also checks that the mosaic plan exists)."""
        if self.image_size < 16:
            raise ConfigError(f"image_size must be >= 16, got {self.image_size}")
        if len(self.crop) != 3 or min(self.crop) < 1:
            raise ConfigError(f"crop must be 3 positive sizes (X, Y, D), got {self.crop}")
        if self.grid < 0 or (self.grid and self.grid * self.grid < self.crop[2]):
            raise ConfigError(f"a {self.grid}x{self.grid} grid cannot hold {self.crop[2]} slices")
        if self.tile_pad < 0:
            raise ConfigError(f"tile_pad must be >= 0, got {self.tile_pad}")
        if len(self.zoom) != 3 or min(self.zoom) <= 0 or max(self.zoom) > 4:
            raise ConfigError(f"zoom factors must lie in (0, 4], got {self.zoom}")
        if len(self.spacing_factor) != 3 or min(self.spacing_factor) < 0.05 or max(self.spacing_factor) > 20:
            raise ConfigError(f"spacing_factor must be three factors in [0.05, 20], got {self.spacing_factor}")
        lo, hi = self.clip_percentiles
        if not 0 <= lo < hi <= 100:
            raise ConfigError(f"clip_percentiles must satisfy 0 <= lo < hi <= 100, got {self.clip_percentiles}")
        if self.mode not in ("fixed", "volume", "patch"):
            raise ConfigError(f"mosaic mode must be fixed, volume or patch, got {self.mode!r}")
        if self.rot90 and self.crop[0] != self.crop[1]:
            raise ConfigError(f"rot90 augmentation needs a square in-plane crop, got {self.crop[:2]}")

    def layout(self) -> concat.MosaicLayout:
        """The mosaic layout of one window (always the same shape, whatever the orientation)."""
        n = self.grid or math.ceil(math.sqrt(self.crop[2]))
        return concat.plan_mosaic(self.crop, self.image_size, n_rows=n, n_cols=n, pad=self.tile_pad)

    def orientations(self) -> list[Orientation]:
        """The orientation family: the same list at fine-tune time (sampled) and at predict time (TTA)."""
        return orientation_family(self.rot90, self.flip)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict) -> MosaicSpec:
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


# ------------------------------------------------------------------------------------------------ orientation

def orientation_family(rot90: bool, flip: bool) -> list[Orientation]:
    """All (k, flip) pairs allowed by the flags; the identity (0, False) is always first (1, 2, 4 or 8 items).
    With both flags it is the full dihedral group of the square (every rotation and reflection)."""
    ks = range(4) if rot90 else range(1)
    fs = (False, True) if flip else (False,)
    return [(k, f) for f in fs for k in ks]


def orient(vol: torch.Tensor, o: Orientation) -> torch.Tensor:
    """Apply orientation ``o`` to the (X, Y) plane of (*lead, X, Y, D)."""
    return concat.rot_flip(vol, o[0], o[1])


def unorient(vol: torch.Tensor, o: Orientation) -> torch.Tensor:
    """Inverse of :func:`orient`."""
    return concat.undo_rot_flip(vol, o[0], o[1])


# ------------------------------------------------------------------------------------------------- intensity

def unit_range(array: np.ndarray | torch.Tensor, percentiles: tuple[float, float] = (0.5, 99.5)) -> torch.Tensor:
    """Clip a volume to its own [lo, hi] percentiles and scale to [0, 1] (float32 tensor, same shape).
    A constant volume becomes all zeros."""
    t = torch.as_tensor(np.asarray(array, dtype=np.float32)) if not torch.is_tensor(array) else array.float()
    flat = t.reshape(-1)
    if flat.numel() > 2_000_000:   # quantile on a strided subsample: exact enough and bounded cost
        flat = flat[:: flat.numel() // 1_000_000]
    q = torch.quantile(flat, torch.tensor([percentiles[0] / 100, percentiles[1] / 100]))
    lo, hi = float(q[0]), float(q[1])
    if hi - lo < 1e-8:
        return torch.zeros_like(t)
    return ((t - lo) / (hi - lo)).clamp_(0, 1)


@dataclass
class PreparedVolume:
    """A volume ready for windows: [0, 1] image (X', Y', Z') after zoom, optional label."""

    image: torch.Tensor                 # float32 (X', Y', Z'), values in [0, 1]
    label: torch.Tensor | None          # uint8 (X', Y', Z') or None
    source_shape: tuple[int, int, int]  # (X, Y, Z) before zoom


def zoomed_shape(shape: tuple[int, ...], zoom: tuple[float, float, float]) -> tuple[int, int, int]:
    return tuple(max(1, round(s * z)) for s, z in zip(shape, zoom))  # type: ignore[return-value]


def _resample(img: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Resample (C, X, Y, Z) float to ``size``: area averaging when every axis shrinks, trilinear otherwise."""
    if tuple(img.shape[-3:]) == tuple(size):
        return img
    shrink = all(o <= i for o, i in zip(size, img.shape[-3:]))
    if shrink:
        return F.interpolate(img[None], size=size, mode="area")[0]
    return F.interpolate(img[None], size=size, mode="trilinear", align_corners=False)[0]


def prepare_volume(
    image: np.ndarray, label: np.ndarray | None, spec: MosaicSpec, num_classes: int, device: torch.device,
    *, size: tuple[int, int, int] | None = None, window: tuple[float, float] | None = None,
) -> PreparedVolume:
    """Normalise to [0, 1] (per-volume percentiles, or the fixed ``window`` (lo, hi), e.g. CT HU), resample
    to ``size`` (default: ``spec.zoom``), move to ``device``. Labels are resampled by averaging their one-hot
    maps and taking the argmax (no class vanishes by nearest-neighbour aliasing)."""
    if image.ndim != 3:
        raise InputError(f"expected a 3D image, got shape {image.shape}")
    if window is None:
        unit = unit_range(image, spec.clip_percentiles).to(device)
    else:
        lo, hi = window
        t = torch.as_tensor(np.ascontiguousarray(image, dtype=np.float32))
        unit = ((t.clamp(lo, hi) - lo) / max(hi - lo, 1e-8)).to(device)
    size = tuple(size) if size is not None else zoomed_shape(image.shape, spec.zoom)
    unit = _resample(unit[None], size)[0].clamp_(0, 1).contiguous()
    lab = None
    if label is not None:
        if label.shape != image.shape:
            raise InputError(f"label shape {label.shape} differs from image shape {image.shape}")
        lt = torch.as_tensor(np.asarray(label, dtype=np.int64), device=device)
        if int(lt.max()) >= num_classes or int(lt.min()) < 0:
            raise InputError(f"label values must lie in [0, {num_classes - 1}], found {int(lt.min())}..{int(lt.max())}")
        if size == tuple(image.shape):
            lab = lt.to(torch.uint8)
        else:
            onehot = F.one_hot(lt, num_classes).permute(3, 0, 1, 2).float()
            lab = _resample(onehot, size).argmax(0).to(torch.uint8)
    return PreparedVolume(unit, lab, tuple(image.shape))  # type: ignore[arg-type]


def prepare_case(plan, spec: MosaicSpec, image, label, num_classes: int, device: torch.device,
                 spacing: tuple[float, float, float] | None = None):
    """A case through the plan for SAM: reoriented to the working axes (exact; slice axis last), [0, 1]
    normalised (:meth:`cfrseg.data.plan.Plan.unit_window`), resampled to the plan's working grid at
    ``spec.spacing_factor``. ``image``/``label`` are Volumes (label may be None). Returns
    (PreparedVolume, CaseGeometry)."""
    geo = plan.geometry(image, spec.spacing_factor, spacing)
    img = np.ascontiguousarray(geo.amap.apply(image.array))
    lab = None if label is None else np.ascontiguousarray(geo.amap.apply(label.array))
    pv = prepare_volume(img, lab, spec, num_classes, device, size=geo.working_shape, window=plan.unit_window())
    return pv, geo


# --------------------------------------------------------------------------------------------------- windows

def crop_padded(vol: torch.Tensor, start: tuple[int, int, int], size: tuple[int, int, int],
                fill: float = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Window ``size`` at ``start`` of (*lead, X, Y, Z), padded with ``fill`` where it leaves the volume.

    Returns (window (*lead, *size), inside (size) bool: True where the window covers a real voxel)."""
    shp = vol.shape[-3:]
    sl, pads = [], []
    for s, n, L in zip(start, size, shp):
        a, b = max(s, 0), min(s + n, L)
        sl.append(slice(a, b))
        pads.append((a - s, s + n - b))
    w = vol[(..., *sl)]
    inside = torch.ones(tuple(b.stop - b.start for b in sl), dtype=torch.bool, device=vol.device)
    if any(p for pr in pads for p in pr):
        flat = [p for pr in reversed(pads) for p in pr]        # F.pad wants last dim first
        w = F.pad(w, flat, value=fill) if w.is_floating_point() else F.pad(w.float(), flat, value=fill).to(w.dtype)
        inside = F.pad(inside, flat, value=False)
    return w, inside


def plan_windows(shape: tuple[int, int, int], crop: tuple[int, int, int], overlap: float,
                 depth_overlap: float = 0.0) -> list[tuple[int, int, int]]:
    """Start corners of the windows covering a (zoomed) volume, sorted by slice start: in-plane with ``overlap``
    (fraction), along the slice axis with ``depth_overlap`` (0: contiguous groups of ``crop[2]`` slices, evenly
    spread; the last group ends at the last slice, so groups may share a few slices; patch mode passes the
    in-plane overlap). A window larger than the volume starts at 0 (padded)."""
    xs = concat.tile_starts(shape[0], crop[0], overlap)
    ys = concat.tile_starts(shape[1], crop[1], overlap)
    zs = concat.tile_starts(shape[2], crop[2], depth_overlap)
    return [(x, y, z) for z in zs for x in xs for y in ys]


def sample_start(shape: tuple[int, int, int], size: tuple[int, int, int], g: torch.Generator,
                 label: torch.Tensor | None = None, foreground_prob: float = 0.0) -> tuple[int, int, int]:
    """Random window corner: uniform over positions (centred when the window is larger than the volume); with
    probability ``foreground_prob`` the window is placed so that it contains a random foreground voxel."""
    fg = None
    if label is not None and foreground_prob > 0 and float(torch.rand(1, generator=g)) < foreground_prob:
        idx = torch.nonzero(label.cpu() > 0)
        if len(idx):
            fg = idx[int(torch.randint(len(idx), (1,), generator=g))].tolist()
    out = []
    for a, (L, n) in enumerate(zip(shape, size)):
        if n >= L:
            out.append(-((n - L) // 2))
            continue
        lo, hi = 0, L - n
        if fg is not None:
            lo, hi = max(lo, fg[a] - n + 1), min(hi, fg[a])
        out.append(int(torch.randint(lo, hi + 1, (1,), generator=g)))
    return tuple(out)  # type: ignore[return-value]


def make_batch(
    volumes: list[PreparedVolume],
    spec: MosaicSpec,
    batch_size: int,
    g: torch.Generator,
    *,
    bezier_p: float = 0.0,
    foreground_prob: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One fine-tuning batch: for each sample a random case, a random window ``spec.crop``, a random
    orientation of ``spec.orientations()``, and (with probability ``bezier_p``) a random Bezier curve on the
    [0, 1] intensities; then mosaicked on the volumes' device. All randomness comes from ``g`` (CPU).

    Returns (images (B, 3, S, S) float, target (B, S, S) long, valid (B, S, S) bool); ``valid`` is False on
    tile padding, empty grid slots, canvas margins and on window parts outside the volume."""
    layout = spec.layout()
    fam = spec.orientations()
    imgs, labs, ins = [], [], []
    for _ in range(batch_size):
        pv = volumes[int(torch.randint(len(volumes), (1,), generator=g))]
        if pv.label is None:
            raise InputError("fine-tuning needs labeled volumes")
        o = fam[int(torch.randint(len(fam), (1,), generator=g))]
        start = sample_start(tuple(pv.image.shape), spec.crop, g, pv.label, foreground_prob)
        im, inside = crop_padded(pv.image, start, spec.crop)
        lb, _ = crop_padded(pv.label, start, spec.crop)
        imgs.append(orient(im, o))
        labs.append(orient(lb, o))
        ins.append(orient(inside, o))
    img = torch.stack(imgs)                                                  # (B, X, Y, D) in [0, 1]
    if bezier_p > 0:
        img = concat.random_bezier(img, bezier_p, generator=g)
    dev = img.device
    inside_t = torch.stack(ins)
    img = torch.where(inside_t, img, torch.zeros((), device=dev))           # outside the volume: fill 0
    mosaic = concat.to_mosaic(img, layout)                                   # (B, S, S)
    target = concat.to_mosaic(torch.stack(labs), layout).long()
    valid = concat.to_mosaic(inside_t.to(torch.uint8), layout, mode="nearest").bool()
    valid &= concat.validity_mask(layout, dev)
    return mosaic[:, None].expand(-1, 3, -1, -1).contiguous(), target, valid
