"""The plan: how every volume of a dataset is brought to one working grid, derived from its fingerprint.

A :class:`Plan` (JSON in every artifact: ``finetune.pt``, the pseudo-label store, ``model.pt``) fixes:

- **orientation**: every volume is reoriented to canonical **LPS** (ITK direction = identity) by exact axis
  permutation/flips, then the **slice axis** is moved last. The slice axis is the lowest-resolution axis
  (largest target spacing; ties go to the canonical z axis, so isotropic and axial data keep z). The SAM
  mosaics take their slices along it, the 3D network's patch is (in-plane, in-plane, slice).
- **target spacing** (canonical axes, mm): the per-axis median of the training cases' spacings, with nnU-Net's
  anisotropy exception: when the coarsest axis is more than 3x coarser than the finest and has fewer than a
  third of its voxels, its target is the 10th percentile of that axis's spacings (at least the other axes'
  targets). Each stage works at ``target x spacing_factor`` (its config: lite trains at coarser grids).
- **intensity normalisation** by modality: CT clips to the foreground 0.5 / 99.5 percentiles (HU) then
  z-scores with the dataset's foreground mean / std (the 3D network) or scales the clip window to [0, 1]
  (SAM); MR (any non-CT modality) z-scores each volume on its own (SAM: per-volume 0.5 / 99.5 percentiles to
  [0, 1]).
- **patch size** in voxels from a physical size (:meth:`Plan.patch_voxels`).
- **few thick slices** (``keep_slices``): when the slice axis of the median case holds fewer than a third of the
  voxels of its smaller in-plane axis at the target spacing (ACDC's 6-18 slices; any anisotropic plan), no stage
  coarsens it: a stage's ``spacing_factor`` along the slice axis is capped at 1 (:meth:`Plan.stage_factor`),
  since halving 9 slices to 5 throws away half of the through-plane information. Plans written before this rule
  (no ``keep_slices`` key) replay as they were made.

Replaying it at inference (:func:`prepare_image`) and streaming predictions back through
:class:`cfrseg.accumulate.Unorient` gives labels in each input's own source geometry (shape, spacing, origin,
direction).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from cfrseg.data.resample import CANONICAL, AxisMap, canonical_map, resize_image, resize_label, target_shape
from cfrseg.data.volume import Volume
from cfrseg.errors import ConfigError, InputError
from cfrseg.store import get_json, put_json

VERSION = 1
ANISOTROPY = 3.0
Triple = tuple[int, int, int]


@dataclass(frozen=True)
class CaseGeometry:
    """How one volume maps to the working grid: axis map, shape after reorientation and after resampling."""

    amap: AxisMap
    oriented_shape: Triple
    working_shape: Triple
    oriented_spacing: tuple[float, float, float]

    @property
    def resampled(self) -> bool:
        return self.oriented_shape != self.working_shape


@dataclass(frozen=True)
class Plan:
    modality: str                                   # "MR" | "CT"
    target_spacing: tuple[float, float, float]      # mm, canonical axes (L, P, S)
    slice_axis: int                                 # canonical axis of the mosaic slices (the coarsest)
    normalization: dict[str, Any] = field(default_factory=lambda: {"scheme": "per_volume"})
    median_shape: Triple = (0, 0, 0)                # canonical axes, at the target spacing
    anisotropic: bool = False
    fingerprint: str = ""                           # sha256 of the fingerprint the plan was made from
    orientation: str = CANONICAL
    version: int = VERSION
    keep_slices: bool = False                       # few thick slices: stages never coarsen the slice axis

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_spacing", tuple(float(s) for s in self.target_spacing))
        object.__setattr__(self, "median_shape", tuple(int(s) for s in self.median_shape))
        if len(self.target_spacing) != 3 or min(self.target_spacing) <= 0:
            raise ConfigError(f"plan: target_spacing must be three positive mm values, got "
                              f"{self.target_spacing}")
        if self.slice_axis not in (0, 1, 2):
            raise ConfigError(f"plan: slice_axis must be 0, 1 or 2, got {self.slice_axis}")
        scheme = self.normalization.get("scheme")
        if scheme not in ("per_volume", "ct"):
            raise ConfigError(f"plan: unknown normalization {self.normalization!r}")
        if scheme == "ct" and not all(k in self.normalization for k in ("clip", "mean", "std")):
            raise ConfigError(f"plan: CT normalization needs clip, mean and std, got {self.normalization!r}")
        if self.orientation != CANONICAL or self.version != VERSION:
            raise ConfigError(f"plan: orientation {self.orientation!r} / version {self.version} not "
                              f"supported "
                              f"(this cfrseg writes {CANONICAL} / {VERSION})")

    # ---- axes and grids
    @property
    def working_order(self) -> Triple:
        """Canonical axes in working order: the two in-plane axes (ascending), then the slice axis."""
        rest = [a for a in range(3) if a != self.slice_axis]
        return (rest[0], rest[1], self.slice_axis)

    def axis_map(self, direction: Sequence[float]) -> AxisMap:
        """Source array axes -> working axes: canonical LPS, then the slice axis last."""
        return canonical_map(direction).then(AxisMap(self.working_order))

    def stage_factor(self, factor: Sequence[float] = (1.0, 1.0, 1.0)) -> tuple[float, float, float]:
        """A stage's ``spacing_factor`` (working axes) as this plan applies it: with ``keep_slices`` the slice
        axis factor is capped at 1 (never coarsened; a factor below 1 still refines it)."""
        if len(factor) != 3:
            raise ConfigError(f"plan: spacing factor must have three values, got {tuple(factor)!r}")
        f = [float(v) for v in factor]
        if self.keep_slices:
            f[2] = min(f[2], 1.0)
        return tuple(f)  # type: ignore[return-value]

    def working_spacing(self, factor: Sequence[float] = (1.0, 1.0, 1.0)) -> tuple[float, float, float]:
        """The grid a stage works on (mm, working axes): target spacing x :meth:`stage_factor` of ``factor``."""
        t = [self.target_spacing[a] for a in self.working_order]
        return tuple(float(s * f) for s, f in zip(t, self.stage_factor(factor)))  # type: ignore[return-value]

    def geometry(self, volume: Volume, factor: Sequence[float] = (1.0, 1.0, 1.0),
                 spacing: Sequence[float] | None = None) -> CaseGeometry:
        """Where ``volume`` goes (``spacing`` overrides the volume's, as the LA manifest does)."""
        amap = self.axis_map(volume.direction)
        shape = amap.shape(volume.shape)
        sp = amap.shape(tuple(spacing) if spacing is not None else volume.spacing)
        return CaseGeometry(amap, shape, target_shape(shape, sp, self.working_spacing(factor)),
                            tuple(float(s) for s in sp))  # type: ignore[arg-type]

    def patch_voxels(self, patch_mm: Sequence[float], factor: Sequence[float] = (1.0, 1.0, 1.0),
                     multiple: int = 16) -> Triple:
        """A patch of ``patch_mm`` (working axes) in voxels of the working grid: rounded to a multiple of
        ``multiple`` (at least one), and no larger than the median case (rounded up to the multiple)."""
        sp = self.working_spacing(factor)
        med = [self.median_shape[a] for a in self.working_order]
        out = []
        for mm, s, m, f in zip(patch_mm, sp, med, self.stage_factor(factor)):
            n = max(multiple, int(round(mm / s / multiple)) * multiple)
            if m > 0:
                cap = math.ceil(m / f / multiple) * multiple
                n = min(n, max(cap, multiple))
            out.append(n)
        return tuple(out)  # type: ignore[return-value]

    # ---- intensities
    def zscore(self, array: np.ndarray) -> np.ndarray:
        """The 3D network's input (float32, source grid): CT clip + dataset z-score; MR per-volume z-score."""
        a = np.asarray(array, dtype=np.float32)
        if self.normalization["scheme"] == "ct":
            lo, hi = self.normalization["clip"]
            std = float(self.normalization["std"])
            mean = float(self.normalization["mean"])
            return ((np.clip(a, lo, hi) - mean) / (std if std > 0 else 1.0)).astype(np.float32)
        mean, std = float(a.mean()), float(a.std())
        return (a - mean) / (std if std > 0 else 1.0)

    def unit_window(self) -> tuple[float, float] | None:
        """SAM's [0, 1] window: the CT clip range, or None (MR: per-volume percentiles)."""
        if self.normalization["scheme"] == "ct":
            lo, hi = self.normalization["clip"]
            return float(lo), float(hi)
        return None

    # ---- serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``keep_slices`` only when true, so plans the rule does not touch keep the JSON (and
        digest) they had before it existed."""
        d = json.loads(json.dumps(asdict(self)))
        if not self.keep_slices:
            del d["keep_slices"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        try:
            return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})
        except TypeError as e:
            raise ConfigError(f"malformed plan: {e}") from None

    def digest(self) -> str:
        from cfrseg.provenance import digest

        return digest(self.to_dict())

    def describe(self) -> str:
        sp = ", ".join(f"{s:g}" for s in self.target_spacing)
        return (f"{self.modality}, {self.orientation}, target spacing ({sp}) mm, slice axis "
                f"{'xyz'[self.slice_axis]}{' (anisotropic)' if self.anisotropic else ''}"
                f"{' (few thick slices: never coarsened)' if self.keep_slices else ''}, "
                f"normalization {self.normalization['scheme']}")


def make_plan(fingerprint: dict[str, Any], anisotropy: float = ANISOTROPY) -> Plan:
    """The plan of a fingerprint (:func:`cfrseg.data.fingerprint.compute_fingerprint`); see the module
    docstring for the rules."""
    from cfrseg.provenance import digest

    cases = fingerprint["cases"]
    if not cases:
        raise InputError("plan: the fingerprint has no case")
    sp = np.array([c["canonical_spacing"] for c in cases], dtype=float)
    shp = np.array([c["canonical_shape"] for c in cases], dtype=float)
    target = np.median(sp, axis=0)
    top = target.max()
    ties = [a for a in range(3) if target[a] >= top * (1 - 1e-3)]
    w = 2 if 2 in ties else ties[-1]
    others = [a for a in range(3) if a != w]
    med_size = np.median(shp * sp / target, axis=0)
    aniso = bool(target[w] > anisotropy * target[others].min()
                 and med_size[w] * anisotropy < med_size[others].min())
    if aniso:
        t = float(np.percentile(sp[:, w], 10))
        target[w] = max(t, float(target[others].max()) + 1e-5)
    median_shape = np.median(np.array([target_shape(c["canonical_shape"], c["canonical_spacing"], target)
                                       for c in cases]), axis=0)
    # few thick slices (by spacing, or by count when the files' spacing is nominal as ACDC's): keep every slice
    keep = bool(aniso or median_shape[w] * anisotropy < median_shape[others].min())
    if fingerprint["modality"] == "CT":
        fg = fingerprint["foreground"]
        if not fg.get("n"):
            raise InputError("plan: CT normalisation needs labeled foreground voxels")
        norm = {"scheme": "ct", "clip": [fg["p00_5"], fg["p99_5"]], "mean": fg["mean"], "std": fg["std"]}
    else:
        norm = {"scheme": "per_volume"}
    return Plan(fingerprint["modality"], tuple(float(t) for t in target), w, norm,  # type: ignore[arg-type]
                tuple(int(round(m)) for m in median_shape), aniso,  # type: ignore[arg-type]
                digest(fingerprint), keep_slices=keep)


# ------------------------------------------------------------------------------ the 3D network's path

def prepare_image(plan: Plan, volume: Volume, factor: Sequence[float] = (1.0, 1.0, 1.0), *,
                  spacing: Sequence[float] | None = None, device: torch.device | str | None = None
                  ) -> tuple[torch.Tensor, CaseGeometry]:
    """The network input of ``volume`` (1, X', Y', Z') float32 on ``device``: normalised on the source grid
    (:meth:`Plan.zscore`), reoriented (exact), resampled trilinearly to the working grid."""
    geo = plan.geometry(volume, factor, spacing)
    arr = geo.amap.apply(plan.zscore(volume.array))
    t = torch.from_numpy(np.ascontiguousarray(arr))[None]
    if device is not None:
        t = t.to(device)
    return resize_image(t, geo.working_shape, "linear"), geo


def prepare_label(label: np.ndarray, geo: CaseGeometry) -> np.ndarray:
    """A label map (source grid) on the working grid: reoriented (exact), nearest-neighbour resampled."""
    t = torch.from_numpy(np.ascontiguousarray(geo.amap.apply(np.asarray(label))).astype(np.int64))
    dtype = np.uint8 if label.max(initial=0) < 256 else np.uint16
    return resize_label(t, geo.working_shape).numpy().astype(dtype)


# ------------------------------------------------------------------------------ planning a manifest

FINGERPRINT_KEY = "fingerprint.json"
PLAN_KEY = "plan.json"


def fingerprint_and_plan(data: Any, store: Any = None, *, write: bool = True, progress: Any = None,
                         cancel: Any = None, stage: str = "plan") -> tuple[dict[str, Any], Plan]:
    """(fingerprint, plan) of manifest ``data``: computed, or read back from ``store`` (``fingerprint.json`` +
    ``plan.json``) when they were made from the same training cases (same manifest digest: ids, roles, file
    contents). Freshly computed ones are written to ``store`` when given and ``write``."""
    from cfrseg.data.fingerprint import compute_fingerprint
    from cfrseg.provenance import digest, manifest_record

    want = digest(manifest_record(data, data.training))
    if store is not None and store.exists(FINGERPRINT_KEY) and store.exists(PLAN_KEY):
        try:
            fp = get_json(store, FINGERPRINT_KEY)
            if fp.get("manifest") == want and fp.get("version") is not None:
                plan = Plan.from_dict(get_json(store, PLAN_KEY))
                if plan.fingerprint == digest(fp):
                    return fp, plan
        except (ConfigError, ValueError, KeyError):
            pass   # unreadable cache: plan again
    fp = compute_fingerprint(data, progress=progress, cancel=cancel, stage=stage)
    plan = make_plan(fp)
    if store is not None and write:
        save_plan(store, fp, plan)
    return fp, plan


def save_plan(store: Any, fingerprint: dict[str, Any], plan: Plan) -> None:
    """Write ``fingerprint.json`` and ``plan.json`` to ``store``."""
    put_json(store, FINGERPRINT_KEY, fingerprint)
    put_json(store, PLAN_KEY, plan.to_dict())


def plan_for(data: Any, store: Any = None, *, progress: Any = None, cancel: Any = None,
             stage: str = "plan") -> Plan:
    """The plan of manifest ``data`` (:func:`fingerprint_and_plan`, cached in / written to ``store``)."""
    return fingerprint_and_plan(data, store, progress=progress, cancel=cancel, stage=stage)[1]
