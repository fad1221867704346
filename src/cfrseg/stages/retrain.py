"""Stage 3 of CFR: semi-supervised re-training of the 3D network (paper sec. VI, Eq. 4/6/7, Alg. 1).

``run_retrain(config, data, store)`` trains a student V-Net on the labeled cases (L_sup), the unlabeled cases
(the SSL method's consistency / self-training term, :mod:`cfrseg.ssl.methods`) and, when the manifest's unlabeled
cases carry SAM pseudo-labels, the CFR term L_pl; keeps an EMA teacher; checkpoints to ``store`` and resumes
exactly; writes ``model.pt`` (student + teacher), ``config.json``, ``history.json`` and ``loss.png``.
``evaluate_model`` segments test cases with a trained model and computes Dice/Jaccard/ASD/HD95.
See docs/retrain.md for the methods, schedules and choices.
"""

from __future__ import annotations

import copy
import io
import math
import random
import resource
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cfrseg.config import ConfigBase, require
from cfrseg.data.manifest import Case, Manifest
from cfrseg.data.plan import Plan
from cfrseg.errors import Cancelled, ConfigError, InputError
from cfrseg.progress import CancelFlag, Eta, ProgressEvent, ProgressFn, emit
from cfrseg.provenance import training_images
from cfrseg.ssl.ema import update_ema
from cfrseg.ssl.methods import METHODS, SSLMethod, SSLParams, build_method
from cfrseg.ssl.sampling import TwoStreamSampler, crop_aug, foreground_voxels
from cfrseg.stages import checkpoint as ckpt_io
from cfrseg.store import Store, get_json, put_json

STAGE = "retrain"
CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
LR_SCHEDULES = ("step", "poly", "constant")
PL_RAMPS = ("none", "sigmoid")
# fields that may change between a run and its resumption (they do not change what is trained)
OPERATIONAL = ("resume", "checkpoint_interval_s", "device", "num_workers", "evaluate", "infer",
               "infer_stride_fraction")


def _default_net_kwargs() -> dict[str, Any]:
    return {"n_filters": 16, "has_dropout": True}


@dataclass(frozen=True)
class RetrainConfig(ConfigBase):
    """Re-training settings. Defaults follow the reference/UA-MT LA recipe (the ``paper`` profile)."""

    # network
    network: str = "vnet"
    network_kwargs: dict[str, Any] = field(default_factory=_default_net_kwargs)
    # method
    ssl: str = "mt"                              # none | mt | st | uamt | acmt | magicnet
    iterations: int = 6000
    batch_labeled: int = 2
    batch_unlabeled: int = 2
    patch: tuple[int, int, int] = (112, 112, 80)     # voxels of the working grid (ignored when patch_mm is set)
    patch_mm: tuple[float, float, float] | None = None  # physical patch (working axes); voxels from the plan
    # working grid = the plan's target spacing x spacing_factor (working axes: in-plane, in-plane, slice);
    # lite: 2 = half resolution (LA 0.625 -> 1.25 mm, exactly where the former zoom 0.5 put it)
    spacing_factor: tuple[float, float, float] = (1.0, 1.0, 1.0)
    zoom: tuple[float, float, float] | None = None   # legacy alias: zoom z means spacing_factor 1/z (then None)
    # optimisation
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_schedule: str = "step"                    # step | poly | constant
    lr_steps: tuple[float, ...] = (2500 / 6000, 5000 / 6000)   # fractions of the run ("step")
    lr_gamma: float = 0.1
    lr_poly_power: float = 0.9
    # consistency / teacher
    consistency: float = 0.1                     # lambda of the SSL term
    consistency_rampup: float = 1.0              # ramp length as a fraction of the run (reference: 40x150 = 6000)
    consistency_on_labeled: bool = False         # the CFR reference code also applies it to labeled crops
    ema_decay: float = 0.99
    teacher_noise: float = 0.1                   # std of the Gaussian noise on the teacher input
    teacher_noise_clip: float = 0.2
    st_threshold: float = 0.9                    # self-training: min teacher confidence
    uamt_T: int = 8
    uamt_threshold: tuple[float, float] = (0.75, 1.0)     # x ln(C), ramped over the run
    acmt_threshold: tuple[float, float] = (0.75, 0.95)    # normalised student entropy, ramped over the run
    # MagicNet (ssl = "magicnet", docs/retrain.md): the configured V-Net gets the cube-location head
    magic_grid: tuple[int, int, int] | None = None   # cubes per axis of the patch; None = auto (side closest to 32)
    magic_fc_hidden: int = 4096                  # width of the location MLP (official 4096)
    magic_loc_weight: float = 0.1
    magic_blend_start: int = 100                 # iterations before cube-wise pseudo-label blending starts
    magic_blend_window: int = 20                 # class distribution refreshed every this many iterations
    magic_blend_T: float = 1.0
    magic_transposed_recovery: bool = False      # reproduce the official x<->z cube recovery quirk (comparison only)
    # CFR pseudo-label term (Eq. 7)
    pl_weight: float = 1.0
    pl_ramp: str = "none"                        # none | sigmoid
    pl_rampup: float = 1.0                       # fraction of the run (pl_ramp = sigmoid)
    # augmentation
    augment: bool = True
    flip_p: float = 0.5
    foreground_prob: float = 0.0                 # labeled crops placed on a random foreground voxel this often
    pl_foreground_prob: float = 0.0              # unlabeled crops placed on a pseudo-label foreground voxel this
                                                 # often (CFR runs; cases without a pseudo-label stay uniform)
    # run control
    seed: int = 1337
    checkpoint_interval_s: float = 600.0
    resume: bool = False
    evaluate: str = "teacher"                    # which weights model.pt serves
    device: str = "auto"
    infer: dict[str, Any] = field(default_factory=dict)  # InferConfig fields for evaluation / segmentation
    infer_stride_fraction: tuple[float, float, float] | None = None  # stride = patch x this (None: patch / 4)
    num_workers: int = 0                         # threads cutting crops (0 = in the training thread)
    precision: str = "fp32"                      # fp32 | bf16 | auto: autocast of the student and teacher
                                                 # forward passes (fp32 weights; cfrseg.stages.precision);
                                                 # auto = bf16 where native, resolved when the stage starts

    def __post_init__(self) -> None:
        z = self.zoom
        if isinstance(z, (int, float)) and not isinstance(z, bool):
            z = (float(z),) * 3
        if z is not None:
            zs = tuple(z) if isinstance(z, (list, tuple)) else ()
            require(len(zs) == 3 and all(isinstance(f, (int, float)) and 0 < f <= 4 for f in zs),
                    f"retrain.zoom must be None or three factors in (0, 4], got {z!r}")
            object.__setattr__(self, "spacing_factor", tuple(1.0 / float(f) for f in zs))
            object.__setattr__(self, "zoom", None)
        for name in ("network_kwargs", "infer"):  # JSON-normalise (tuples -> lists) so round trips compare equal
            v = getattr(self, name)
            if isinstance(v, dict):
                object.__setattr__(self, name, _norm(v))
        super().__post_init__()

    def validate(self) -> None:
        p = "retrain"
        require(isinstance(self.network, str) and bool(self.network), f"{p}.network must be a registry name")
        require(isinstance(self.network_kwargs, dict), f"{p}.network_kwargs must be a dict")
        require(self.ssl in METHODS, f"{p}.ssl must be one of {list(METHODS)}, got {self.ssl!r}")
        _int(self.iterations, f"{p}.iterations", 1)
        _int(self.batch_labeled, f"{p}.batch_labeled", 1)
        _int(self.batch_unlabeled, f"{p}.batch_unlabeled", 0)
        require(self.ssl == "none" or self.batch_unlabeled >= 1,
                f"{p}.batch_unlabeled must be >= 1 for ssl={self.ssl!r}")
        require(isinstance(self.patch, tuple) and len(self.patch) == 3
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 16 and v % 16 == 0
                        for v in self.patch),
                f"{p}.patch must be three integers, multiples of 16 (V-Net), got {self.patch!r}")
        require(isinstance(self.spacing_factor, tuple) and len(self.spacing_factor) == 3
                and all(isinstance(f, (int, float)) and 0.05 <= f <= 20 for f in self.spacing_factor),
                f"{p}.spacing_factor must be three factors in [0.05, 20], got {self.spacing_factor!r}")
        for name in ("patch_mm", "infer_stride_fraction"):
            v = getattr(self, name)
            require(v is None or (isinstance(v, tuple) and len(v) == 3
                                  and all(isinstance(f, (int, float)) and f > 0 for f in v)),
                    f"{p}.{name} must be None or three positive numbers, got {v!r}")
        if self.infer_stride_fraction is not None:
            require(max(self.infer_stride_fraction) <= 1,
                    f"{p}.infer_stride_fraction must be fractions of the patch in (0, 1]")
        for name in ("lr", "lr_gamma", "lr_poly_power"):
            _pos(getattr(self, name), f"{p}.{name}")
        _frac(self.momentum, f"{p}.momentum", hi_open=True)
        _nonneg(self.weight_decay, f"{p}.weight_decay")
        require(self.lr_schedule in LR_SCHEDULES, f"{p}.lr_schedule must be one of {list(LR_SCHEDULES)}, "
                f"got {self.lr_schedule!r}")
        require(isinstance(self.lr_steps, tuple) and all(isinstance(f, (int, float)) and 0 < f < 1
                                                         for f in self.lr_steps),
                f"{p}.lr_steps must be fractions of the run in (0, 1), got {self.lr_steps!r}")
        _nonneg(self.consistency, f"{p}.consistency")
        _frac(self.consistency_rampup, f"{p}.consistency_rampup")
        _frac(self.ema_decay, f"{p}.ema_decay", hi_open=True)
        _nonneg(self.teacher_noise, f"{p}.teacher_noise")
        _nonneg(self.teacher_noise_clip, f"{p}.teacher_noise_clip")
        _frac(self.st_threshold, f"{p}.st_threshold")
        _int(self.uamt_T, f"{p}.uamt_T", 1)
        for name in ("uamt_threshold", "acmt_threshold"):
            v = getattr(self, name)
            require(isinstance(v, tuple) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v)
                    and 0 <= v[0] <= v[1] <= 1,
                    f"{p}.{name} must be (start, end) with 0 <= start <= end <= 1, got {v!r}")
        _nonneg(self.pl_weight, f"{p}.pl_weight")
        require(self.pl_ramp in PL_RAMPS, f"{p}.pl_ramp must be one of {list(PL_RAMPS)}, got {self.pl_ramp!r}")
        _frac(self.pl_rampup, f"{p}.pl_rampup")
        _frac(self.flip_p, f"{p}.flip_p")
        _frac(self.foreground_prob, f"{p}.foreground_prob")
        _frac(self.pl_foreground_prob, f"{p}.pl_foreground_prob")
        _int(self.seed, f"{p}.seed", 0)
        _pos(self.checkpoint_interval_s, f"{p}.checkpoint_interval_s")
        require(self.evaluate in ("teacher", "student"),
                f"{p}.evaluate must be 'teacher' or 'student', got {self.evaluate!r}")
        require(isinstance(self.device, str) and bool(self.device), f"{p}.device must be 'auto', 'cpu', 'cuda'...")
        require(isinstance(self.infer, dict), f"{p}.infer must be a dict of InferConfig fields")
        _int(self.num_workers, f"{p}.num_workers", 0)
        from cfrseg.stages.precision import PRECISIONS_AUTO

        require(self.precision in PRECISIONS_AUTO, f"{p}.precision must be one of {list(PRECISIONS_AUTO)}, "
                f"got {self.precision!r}")
        # oneDNN's bf16 weight gradient of a 3x3x3 convolution is garbage when the input is 2 voxels wide in x
        # and y (seen with torch 2.14 / oneDNN 3.12 on AVX-512 CPUs): the V-Net's deepest level is patch / 16
        require(self.precision != "bf16" or all(v >= 48 for v in self.patch[:2]),
                f"{p}.precision 'bf16' needs patch x and y >= 48 (the network's deepest level >= 3 voxels; "
                f"smaller levels hit a oneDNN bf16 weight-gradient bug), got {self.patch!r}")
        for name in ("resume", "augment", "consistency_on_labeled", "magic_transposed_recovery"):
            require(isinstance(getattr(self, name), bool), f"{p}.{name} must be true or false")
        if self.ssl == "magicnet":
            from cfrseg.ssl.magicnet import check_config

            check_config(self, p)

    def cube_grid(self) -> tuple[int, int, int]:
        """MagicNet's cube grid: ``magic_grid``, or the automatic one for ``patch``."""
        from cfrseg.ssl.cubes import auto_grid

        return self.magic_grid if self.magic_grid is not None else auto_grid(self.patch)

    def training_network(self) -> tuple[str, dict[str, Any]]:
        """(registry name, options) of the network trained: the configured one, or for ssl='magicnet' that
        V-Net with the cube-location head (``vnet_magic``). ``model.pt`` keeps the configured network."""
        if self.ssl != "magicnet":
            return self.network, dict(self.network_kwargs)
        from cfrseg.ssl.magicnet import magic_network

        return magic_network(self.network, self.network_kwargs, self.patch, self.cube_grid(), self.magic_fc_hidden)

    def infer_config(self) -> Any:
        """The :class:`cfrseg.stages.infer.InferConfig` for evaluation: ``infer`` overrides on top of
        patch = the training patch, stride = patch / 4 (rounded), device = this config's device."""
        from cfrseg.stages.infer import InferConfig

        frac = self.infer_stride_fraction
        stride = (tuple(max(1, p // 4) for p in self.patch) if frac is None
                  else tuple(max(1, int(round(p * f))) for p, f in zip(self.patch, frac)))
        base = {"patch": self.patch, "stride": stride, "device": self.device}
        base.update(self.infer)
        return InferConfig.from_dict(base)

    def resolved(self, plan: Any) -> "RetrainConfig":
        """This config with ``patch`` computed from ``patch_mm`` by ``plan`` (unchanged without patch_mm)."""
        if self.patch_mm is None:
            return self
        return self.replace(patch=plan.patch_voxels(self.patch_mm, self.spacing_factor))

    def resolved_precision(self, device: Any) -> "RetrainConfig":
        """This config with ``precision`` "auto" made "bf16" where bfloat16 is native on ``device`` and the patch
        is at least 48 voxels in x and y (the limit explicit bf16 enforces), else "fp32"."""
        if self.precision != "auto":
            return self
        from cfrseg.stages.precision import resolve_precision

        bf16 = resolve_precision("auto", device) == "bf16" and all(v >= 48 for v in self.patch[:2])
        return self.replace(precision="bf16" if bf16 else "fp32")

    def preprocess(self, plan: Any = None) -> dict[str, Any]:
        if plan is None:
            return {"zoom": None, "normalize": "zscore"}
        return {"zoom": None, "normalize": "plan", "plan": plan.to_dict(),
                "spacing_factor": list(self.spacing_factor)}

    def ssl_params(self, num_classes: int) -> SSLParams:
        return SSLParams(
            iterations=self.iterations, num_classes=num_classes, consistency=self.consistency,
            consistency_rampup=self.consistency_rampup, consistency_on_labeled=self.consistency_on_labeled,
            pl_weight=self.pl_weight, pl_ramp=self.pl_ramp, pl_rampup=self.pl_rampup,
            st_threshold=self.st_threshold, uamt_T=self.uamt_T, uamt_threshold=self.uamt_threshold,
            acmt_threshold=self.acmt_threshold,
            magic_grid=self.cube_grid() if self.ssl == "magicnet" else (1, 1, 1),
            magic_loc_weight=self.magic_loc_weight, magic_blend_start=self.magic_blend_start,
            magic_blend_window=self.magic_blend_window, magic_blend_T=self.magic_blend_T,
            magic_transposed_recovery=self.magic_transposed_recovery)


def _int(v: Any, name: str, lo: int) -> None:
    require(isinstance(v, int) and not isinstance(v, bool) and v >= lo, f"{name} must be an integer >= {lo}, got {v!r}")


def _pos(v: Any, name: str) -> None:
    require(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and math.isfinite(v),
            f"{name} must be a positive number, got {v!r}")


def _nonneg(v: Any, name: str) -> None:
    require(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 and math.isfinite(v),
            f"{name} must be a number >= 0, got {v!r}")


def _frac(v: Any, name: str, hi_open: bool = False) -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v and (v < 1 if hi_open else v <= 1)
    require(ok, f"{name} must be in [0, {'1)' if hi_open else '1]'}, got {v!r}")


@dataclass(frozen=True)
class RetrainResult:
    model_key: str                    # key of model.pt in the stage store
    iterations: int                   # iterations trained in all (including earlier, resumed sessions)
    wall_s: float                     # training wall time in all (including earlier sessions)
    peak_rss_mb: float                # peak resident memory of this process
    final_losses: dict[str, float]    # mean of each logged loss over the last 10 iterations


# --------------------------------------------------------------------------------------------- schedules
def learning_rate(cfg: RetrainConfig, step: int) -> float:
    """LR used for 0-based ``step``: "step" multiplies by lr_gamma at each fraction of lr_steps (reference:
    x0.1 at 2500 and 5000 of 6000), "poly" is lr (1 - step/iterations)^power (ACMT), "constant" is lr."""
    if cfg.lr_schedule == "step":
        n = sum(step >= round(f * cfg.iterations) for f in cfg.lr_steps)
        return cfg.lr * cfg.lr_gamma ** n
    if cfg.lr_schedule == "poly":
        return cfg.lr * (1.0 - step / cfg.iterations) ** cfg.lr_poly_power
    return cfg.lr


# ----------------------------------------------------------------------------------------------- data
@dataclass
class TrainData:
    """Preprocessed arrays in memory: labeled (image, label) and unlabeled (image, pseudo-label or None)."""

    labeled: list[tuple[np.ndarray, np.ndarray]]
    unlabeled: list[tuple[np.ndarray, np.ndarray | None]]
    labeled_ids: list[str]
    unlabeled_ids: list[str]

    @property
    def has_pseudo(self) -> bool:
        return any(p is not None for _, p in self.unlabeled)


def load_train_data(cfg: RetrainConfig, data: Manifest, need_unlabeled: bool, plan: Plan) -> TrainData:
    """Read, validate and preprocess (``plan`` at ``cfg.spacing_factor``: the same path
    :func:`cfrseg.stages.infer.predict_probabilities` replays at test time) the labeled cases and (if needed
    or pseudo-labelled) the unlabeled cases. Labels and pseudo-labels get the image's exact reorientation and
    nearest-neighbour resampling."""
    from cfrseg.data.datasets import load_case, load_pseudo_label
    from cfrseg.data.plan import prepare_image, prepare_label

    if not data.labeled:
        raise InputError(f"manifest {data.name!r} has no labeled case: re-training needs at least one")

    def prep(img: Any, lbl: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        t, geo = prepare_image(plan, img, cfg.spacing_factor)
        return t[0].numpy().astype(np.float32, copy=False), None if lbl is None else prepare_label(lbl, geo)

    lab, lab_ids = [], []
    for c in data.labeled:
        img, lbl = load_case(c, data, check_pseudo=False)
        assert lbl is not None  # Manifest guarantees a label file for labeled cases
        lab.append(prep(img, lbl.array))
        lab_ids.append(c.case_id)
    unl, unl_ids = [], []
    ucases = data.unlabeled
    if need_unlabeled or any(c.pseudo_label for c in ucases):
        if need_unlabeled and not ucases:
            raise InputError(f"ssl={cfg.ssl!r} needs unlabeled cases but manifest {data.name!r} has none")
        for c in ucases:
            img, _ = load_case(c, data, check_pseudo=False)
            pl = load_pseudo_label(c, data, img).array if c.pseudo_label else None
            unl.append(prep(img, pl))
            unl_ids.append(c.case_id)
    return TrainData(lab, unl, lab_ids, unl_ids)


class BatchMaker:
    """Builds each step's tensors from :class:`TrainData` with a :class:`TwoStreamSampler` (resumable)."""

    def __init__(self, cfg: RetrainConfig, td: TrainData, use_unlabeled: bool, device: torch.device) -> None:
        self.cfg, self.td, self.device = cfg, td, device
        self.use_unlabeled = use_unlabeled and bool(td.unlabeled)
        self.sampler = TwoStreamSampler(len(td.labeled), len(td.unlabeled) if self.use_unlabeled else 0,
                                        cfg.batch_labeled, cfg.batch_unlabeled if self.use_unlabeled else 0,
                                        cfg.seed)
        self.pool = ThreadPoolExecutor(cfg.num_workers) if cfg.num_workers > 0 else None
        self._fg: dict[tuple[bool, int], np.ndarray] = {}   # (labeled, case) -> foreground voxels of its
                                                            # label or pseudo-label (computed on first use)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def _foreground(self, labeled: bool, i: int, lbl: np.ndarray) -> np.ndarray:
        if (labeled, i) not in self._fg:
            self._fg[labeled, i] = foreground_voxels(lbl, seed=i)
        return self._fg[labeled, i]

    def _plan(self, items: list[tuple[np.ndarray, np.ndarray | None]], idx: list[int],
              labeled: bool = False) -> list[tuple]:
        plans = []
        # labeled crops are steered by the ground truth, unlabeled ones by their pseudo-labels (their own option)
        p_fg = self.cfg.foreground_prob if labeled else self.cfg.pl_foreground_prob
        for i in idx:
            img, lbl = items[i]
            fg = self._foreground(labeled, i, lbl) if p_fg > 0 and lbl is not None else None
            aug, start = self.sampler.draw_crop(img.shape, self.cfg.patch, self.cfg.augment, self.cfg.flip_p,
                                                fg, p_fg)
            plans.append((img, lbl, aug, start))
        return plans

    def _cut(self, plan: tuple) -> tuple[np.ndarray, np.ndarray | None]:
        img, lbl, aug, start = plan
        patch = self.cfg.patch
        return (crop_aug(img, aug, start, patch, 0.0),
                None if lbl is None else crop_aug(lbl, aug, start, patch, 0))

    def _cut_all(self, plans: list[tuple]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        if self.pool is None or len(plans) < 2:
            return [self._cut(p) for p in plans]
        return list(self.pool.map(self._cut, plans))

    def next(self) -> dict[str, torch.Tensor]:
        """The next batch: image_l (B,1,X,Y,Z), label_l (B,X,Y,Z) and, when used, image_u, pl_u, pl_mask."""
        li, ui = self.sampler.next()
        lplans = self._plan(self.td.labeled, li, labeled=True)   # all random draws happen here, in order
        uplans = self._plan(self.td.unlabeled, ui)
        lab, unl = self._cut_all(lplans), self._cut_all(uplans)
        dev = self.device
        b: dict[str, torch.Tensor] = {
            "image_l": torch.from_numpy(np.stack([x for x, _ in lab]))[:, None].to(dev),
            "label_l": torch.from_numpy(np.stack([y for _, y in lab]).astype(np.int64)).to(dev),
        }
        if unl:
            b["image_u"] = torch.from_numpy(np.stack([x for x, _ in unl]))[:, None].to(dev)
            mask = [p is not None for _, p in unl]
            if any(mask):
                pls = [p if p is not None else np.zeros(self.cfg.patch, np.uint8) for _, p in unl]
                b["pl_u"] = torch.from_numpy(np.stack(pls).astype(np.int64)).to(dev)
                b["pl_mask"] = torch.tensor(mask, device=dev)
        return b


# ----------------------------------------------------------------------------------------- networks
def _set_dropout(model: nn.Module, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.train(on)


def _logits(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def make_teacher_fn(teacher: nn.Module, cfg: RetrainConfig):
    """The EMA teacher as a function: eval mode (running BN stats), optional input noise
    clamp(N(0, noise^2), +-clip), optional dropout (``stochastic``, for UA-MT), never builds a graph."""

    from cfrseg.stages.precision import autocast

    def teacher_fn(x: torch.Tensor, noise: bool = True, stochastic: bool = False) -> torch.Tensor:
        with torch.no_grad():
            if noise and cfg.teacher_noise > 0:
                x = x + torch.clamp(torch.randn_like(x) * cfg.teacher_noise,
                                    -cfg.teacher_noise_clip, cfg.teacher_noise_clip)
            teacher.eval()
            if stochastic:
                _set_dropout(teacher, True)
            try:
                with autocast(x.device, cfg.precision):
                    return _logits(teacher(x)).float()
            finally:
                if stochastic:
                    _set_dropout(teacher, False)

    return teacher_fn


def _resolve_device(device: str) -> torch.device:
    from cfrseg.stages.infer import resolve_device

    return resolve_device(device)


# ---------------------------------------------------------------------------------------- checkpoints
def _rng_state() -> dict[str, Any]:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: Mapping[str, Any]) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _training_fields(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in OPERATIONAL}


def _norm(d: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-normalised copy (tuples -> lists) for comparisons."""
    import json

    return json.loads(json.dumps(dict(d), sort_keys=True))


def _config_diff(saved: Mapping[str, Any], cfg: RetrainConfig) -> list[str]:
    """Training fields that differ; a field the saved config lacks (written before the field existed) counts
    as its default value, which is what that version trained with."""
    a, b = _norm(_training_fields(saved)), _norm(_training_fields(cfg.to_dict()))
    base = _norm(_training_fields(RetrainConfig().to_dict()))
    return sorted(k for k in set(a) | set(b) if a.get(k, base.get(k)) != b.get(k))


def load_checkpoint(store: Store) -> dict[str, Any]:
    """The stage checkpoint, loaded with weights_only=True (RNG states are stored as tensors; InputError for a
    file that holds anything but tensors, state dicts and plain metadata)."""
    return ckpt_io.loads(store.get_bytes(CHECKPOINT), f"{store!r} {CHECKPOINT}")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _final_losses(history: list[dict[str, float]], n: int = 10) -> dict[str, float]:
    tail = history[-n:]
    keys = sorted({k for h in tail for k in h if k not in ("step", "lr")})
    return {k: float(np.mean([h[k] for h in tail if k in h])) for k in keys}


# -------------------------------------------------------------------------------------------- artifacts
def _save_artifacts(cfg: RetrainConfig, data: Manifest, plan: Plan, prov: Mapping[str, Any],
                    student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor],
                    history: list[dict[str, float]], store: Store) -> None:
    from cfrseg.stages.infer import save_model

    if cfg.ssl == "magicnet":   # model.pt keeps the configured V-Net; the location head only serves training
        from cfrseg.models.magic import backbone_state

        student, teacher = backbone_state(dict(student)), backbone_state(dict(teacher))
    buf = io.BytesIO()
    save_model(buf, network=cfg.network, num_classes=data.num_classes, student=student, teacher=teacher,
               evaluate=cfg.evaluate, network_kwargs=cfg.network_kwargs, preprocess=cfg.preprocess(plan),
               infer=cfg.infer_config(), class_names=data.names,
               provenance={**{k: v for k, v in prov.items() if k != "cases"},
                           "training_images": training_images(prov)})
    store.put_bytes(MODEL, buf.getvalue())
    store.put_bytes("config.json", cfg.to_json().encode())
    put_json(store, "history.json", history)
    store.put_bytes("loss.png", plot_losses(history))


def plot_losses(history: list[dict[str, float]]) -> bytes:
    """PNG of the loss curves (total, supervised, consistency, pseudo-label) per iteration."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    steps = [h["step"] for h in history]
    win = max(1, len(history) // 100)   # long runs: moving average over 1 % of the run
    for key in ("loss", "sup", "cons", "pl"):
        ys = np.array([h.get(key, math.nan) for h in history], dtype=float)
        if not np.isnan(ys).all():
            if win > 1:
                ys = np.convolve(np.nan_to_num(ys), np.ones(win) / win, mode="same")
            ax.plot(steps, ys, label=key if win == 1 else f"{key} (mean of {win})", linewidth=0.8)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title("re-training losses")
    if history:
        ax.legend()
    ax.grid(alpha=0.3)
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()


# ------------------------------------------------------------------------------------------- training
def _finished(cfg: RetrainConfig, store: Store) -> dict[str, Any] | None:
    """The final checkpoint when this exact training is already done (model.pt present), else None."""
    if not (store.exists(MODEL) and store.exists(CHECKPOINT)):
        return None
    ck = load_checkpoint(store)
    if ck.get("iteration") != cfg.iterations or _config_diff(ck.get("config", {}), cfg):
        return None
    return ck


def run_retrain(config: RetrainConfig, data: Manifest, store: Store, *, plan: Plan | None = None,
                progress: ProgressFn | None = None, cancel: CancelFlag | None = None) -> RetrainResult:
    """Train (or resume, or return the finished result of) the re-training stage into ``store``.

    ``plan``: the dataset plan (default: computed from ``data``'s fingerprint, cached in ``store``); it fixes
    the working grid and, with ``patch_mm``, the patch. A store that already holds a re-training run is
    reused only with ``config.resume`` and equal provenance (:func:`cfrseg.provenance.guard`)."""
    from cfrseg.data.plan import PLAN_KEY, plan_for
    from cfrseg.provenance import guard, stage_provenance

    plan = plan or plan_for(data, store, progress=progress, cancel=cancel, stage=STAGE)
    device = _resolve_device(config.device)
    cfg = config.resolved(plan).resolved_precision(device)   # precision "auto" -> what runs here
    prov = stage_provenance(STAGE, data, _training_fields(cfg.to_dict()), plan=plan.digest())
    resuming = guard(store, STAGE, prov, cfg.resume, (CHECKPOINT, MODEL))
    put_json(store, PLAN_KEY, plan.to_dict())
    done = _finished(cfg, store) if resuming else None
    if done is not None:
        saved = get_json(store, "config.json") if store.exists("config.json") else {}
        if _norm(saved) != _norm(cfg.to_dict()):  # e.g. another `evaluate` choice: refresh the artifact
            _save_artifacts(cfg, data, plan, prov, done["student"], done["teacher"], done["history"], store)
        emit(progress, ProgressEvent(STAGE, cfg.iterations, cfg.iterations, _final_losses(done["history"]),
                                     "already finished"))
        return RetrainResult(MODEL, cfg.iterations, float(done.get("elapsed_s", 0.0)), _peak_rss_mb(),
                             _final_losses(done["history"]))

    ckpt = None
    if resuming and store.exists(CHECKPOINT):
        ckpt = load_checkpoint(store)
        diff = _config_diff(ckpt.get("config", {}), cfg)
        if diff:
            raise ConfigError(f"retrain: cannot resume {CHECKPOINT}: it was trained with other values of "
                              f"{diff}; use the same settings or start again without resume")

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    method = build_method(cfg.ssl, cfg.ssl_params(data.num_classes))
    td = load_train_data(cfg, data, need_unlabeled=method.uses_unlabeled, plan=plan)
    use_u = method.uses_unlabeled or td.has_pseudo

    from cfrseg.models.registry import build_network

    net_name, net_kwargs = cfg.training_network()
    student = build_network(net_name, 1, data.num_classes, **net_kwargs).to(device)
    if device.type == "cpu":  # oneDNN's 3D convolutions are ~1.5x faster in this layout (same numbers)
        student = student.to(memory_format=torch.channels_last_3d)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.eval()
    opt = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    batches = BatchMaker(cfg, td, use_u, device)
    history: list[dict[str, float]] = []
    it, elapsed0 = 0, 0.0
    if ckpt is not None:
        student.load_state_dict(ckpt["student"])
        teacher.load_state_dict(ckpt["teacher"])
        opt.load_state_dict(ckpt["optimizer"])
        batches.sampler.load_state_dict(ckpt["sampler"])
        _set_rng_state(ckpt["rng"])
        method.load_state_dict(ckpt.get("method", {}))
        history = list(ckpt["history"])
        it, elapsed0 = int(ckpt["iteration"]), float(ckpt.get("elapsed_s", 0.0))
        if it > cfg.iterations:
            raise ConfigError(f"retrain: {CHECKPOINT} is at iteration {it}, beyond iterations={cfg.iterations}")

    t0 = time.monotonic()

    def save_ckpt() -> None:
        obj = {"version": 1, "config": cfg.to_dict(), "iteration": it, "student": student.state_dict(),
               "teacher": teacher.state_dict(), "optimizer": opt.state_dict(),
               "scheduler": {"kind": cfg.lr_schedule, "lr": learning_rate(cfg, max(it - 1, 0))},
               "sampler": batches.sampler.state_dict(), "rng": _rng_state(), "history": history,
               "method": method.state_dict(),
               "elapsed_s": elapsed0 + time.monotonic() - t0, "labeled_ids": td.labeled_ids,
               "unlabeled_ids": td.unlabeled_ids, "provenance": prov}
        store.put_bytes(CHECKPOINT, ckpt_io.dumps(obj))

    teacher_fn = make_teacher_fn(teacher, cfg)
    eta = Eta()
    last_ckpt = time.monotonic()
    try:
        while it < cfg.iterations:
            if cancel is not None and cancel.is_set():
                save_ckpt()
                raise Cancelled(f"{STAGE} cancelled at iteration {it} (checkpoint saved)")
            losses, lr = _train_step(cfg, method, student, teacher, teacher_fn, opt, batches, it)
            it += 1
            rec = {"step": float(it), "lr": lr, **losses}
            history.append(rec)
            emit(progress, ProgressEvent(STAGE, it, cfg.iterations, losses, f"ssl={cfg.ssl}",
                                         eta(it, cfg.iterations)))
            if time.monotonic() - last_ckpt >= cfg.checkpoint_interval_s and it < cfg.iterations:
                save_ckpt()
                last_ckpt = time.monotonic()
        save_ckpt()
    finally:
        batches.close()
    _save_artifacts(cfg, data, plan, prov, student.state_dict(), teacher.state_dict(), history, store)
    return RetrainResult(MODEL, it, elapsed0 + time.monotonic() - t0, _peak_rss_mb(), _final_losses(history))


def _train_step(cfg: RetrainConfig, method: SSLMethod, student: nn.Module, teacher: nn.Module, teacher_fn,
                opt: torch.optim.Optimizer, batches: BatchMaker, step: int) -> tuple[dict[str, float], float]:
    """One optimisation step (0-based ``step``): forward labeled + unlabeled crops together (shared BN batch
    statistics, as the reference), method loss, SGD step, EMA update. Returns the logged losses and the LR."""
    b = batches.next()
    lr = learning_rate(cfg, step)
    for g in opt.param_groups:
        g["lr"] = lr
    student.train()
    nl = b["image_l"].shape[0]
    x = torch.cat([b["image_l"], b["image_u"]]) if "image_u" in b else b["image_l"]
    if x.device.type == "cpu":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    from cfrseg.stages.precision import autocast

    if method.custom_step:   # the method runs the student itself (in float32 where bf16 is unsafe) and its losses
        with autocast(x.device, cfg.precision):
            terms = method.step_loss(student, x, nl, teacher_fn, b, step)
    else:
        with autocast(x.device, cfg.precision):   # bf16: forward in bfloat16, backward follows; fp32 weights
            out = _logits(student(x))
        out = out.float()                         # losses in float32
        out_l, out_u = out[:nl], (out[nl:] if "image_u" in b else None)
        terms = method.loss(out_l, out_u, teacher_fn, b, step)
    loss = terms["loss"]
    if not torch.isfinite(loss):
        raise InputError(f"retrain: the loss became {loss.item()} at iteration {step + 1} "
                         f"(lr {lr}); lower retrain.lr or check the input intensities")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    update_ema(teacher, student, step, cfg.ema_decay)
    return {k: float(v.detach()) for k, v in terms.items()}, lr


# ------------------------------------------------------------------------------------------- evaluation
def evaluate_model(model: str | Path | Store, cases: Manifest | Sequence[Case], manifest: Manifest | None = None,
                   *, infer: Mapping[str, Any] | None = None, device: str = "auto",
                   predictions: str | Path | None = None, progress: ProgressFn | None = None,
                   cancel: CancelFlag | None = None) -> dict[str, Any]:
    """Segment each case with a trained ``model.pt`` and score it against its label.

    ``model``: a folder holding model.pt, the file, or a Store with key ``model.pt``. ``cases``: a Manifest
    (its "test" cases are used) or a list of cases (then ``manifest`` gives num_classes and spacing).
    ``infer`` overrides the artifact's InferConfig fields. Predictions are mapped back to each case's full
    resolution by :func:`cfrseg.stages.infer.segment_volume`; with ``predictions`` (a folder) they are also written as
    ``<case_id>.nii.gz``. Returns ``{"cases": {case_id: compute_case(...)}, "summary": summarize(...),
    "table": format_table(...), "evaluate": "teacher"|"student"}``.
    """
    from cfrseg.data.datasets import load_case
    from cfrseg.metrics import compute_case, format_table, summarize
    from cfrseg.provenance import check_disjoint
    from cfrseg.stages.infer import InferConfig, load_model, segment_volume

    if isinstance(cases, Manifest):
        manifest = manifest or cases
        todo = cases.test
        if not todo:
            raise InputError(f"manifest {cases.name!r} has no test cases to evaluate")
    else:
        todo = list(cases)
        if manifest is None:
            raise InputError("evaluate_model: pass the manifest the cases come from (num_classes, spacing)")
    check_disjoint(manifest.training, todo, f"evaluation set of {manifest.name!r}")
    if isinstance(model, (str, Path)):
        net, meta = load_model(model, device=device)
    else:
        net, meta = load_model(model.get_bytes(MODEL), device=device)
    trained_on = (meta.get("provenance") or {}).get("training_images")
    if trained_on:
        check_disjoint(trained_on, todo, "evaluation set (against the model's own training cases)")
    icfg = InferConfig.from_dict({**dict(meta.get("infer", {})), "device": device, **dict(infer or {})})
    out_dir = Path(predictions) if predictions is not None else None
    results: dict[str, dict[str, list[float]]] = {}
    for i, case in enumerate(todo):
        if cancel is not None and cancel.is_set():
            raise Cancelled("evaluate cancelled")
        image, label = load_case(case, manifest, check_pseudo=False)
        if label is None:
            raise InputError(f"case {case.case_id!r} has no label to evaluate against")
        pred = segment_volume(net, image, icfg, meta["preprocess"])
        results[case.case_id] = compute_case(pred.array, label.array, image.spacing, manifest.num_classes)
        if out_dir is not None:
            from cfrseg.data.io import write_volume

            write_volume(pred, out_dir / f"{case.case_id}.nii.gz", label=True)
        emit(progress, ProgressEvent("evaluate", i + 1, len(todo), {}, case.case_id))
    summary = summarize(list(results.values()))
    names = list(meta.get("class_names") or manifest.names)
    return {"cases": results, "summary": summary, "table": format_table(summary, class_names=names[1:], cases=results),
            "evaluate": meta.get("evaluate"), "class_names": names}
