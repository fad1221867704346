"""Stage 1+2 of CFR: fine-tune SAM (LoRA on q, v + mask decoder + no-mask embedding) on mosaics of 3D crops.

``run_finetune(config, data, store)`` trains on ``data.labeled`` and writes to ``store``:
``checkpoint.pt`` (every ``checkpoint_interval_s`` and at the end; exact resume), ``finetune.pt`` (the small
delta on top of the base checkpoint, see :func:`load_finetuned`), ``config.json``, ``history.json``, ``loss.png``.
Inputs come from :mod:`cfrseg.sam.mosaic` (the same path the pseudo-label stage uses), the loss from
:mod:`cfrseg.sam.losses` (valid pixels only). See docs/finetune.md.
"""

from __future__ import annotations

import io
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cfrseg.config import ConfigBase, require
from cfrseg.data.manifest import Manifest
from cfrseg.data.plan import PLAN_KEY, Plan, plan_for
from cfrseg.errors import Cancelled, ConfigError, InputError, NotFoundError
from cfrseg.progress import CancelFlag, Eta, ProgressEvent, ProgressFn, check_cancel, emit
from cfrseg.provenance import guard, stage_provenance
from cfrseg.sam.losses import masked_ce_dice
from cfrseg.sam.mosaic import MosaicSpec, make_batch, prepare_case
from cfrseg.sam.window import Window, resolve_window
from cfrseg.stages import checkpoint as ckpt_io
from cfrseg.store import LocalStore, Store, get_json, put_json

log = logging.getLogger(__name__)

STAGE = "finetune"
ARTIFACT = "finetune.pt"
CHECKPOINT = "checkpoint.pt"
FORMAT = "cfrseg.stages.finetune/1"
#: config fields that may change between an interrupted run and its resume
RESUME_FREE = {"resume", "device", "checkpoint_interval_s", "checkpoint"}


@dataclass(frozen=True)
class FinetuneConfig(ConfigBase):
    """Fine-tuning settings. Defaults are the ``lite`` profile (LiteMedSAM, 256 px, 3x3 slice groups)."""

    model: str = "lite_medsam"                      # SAM registry name: vit_b | vit_l | vit_h | lite_medsam | tiny
    checkpoint: str | None = None                   # base weights; lite_medsam: the cached LiteMedSAM if None
    checkpoint_sha256: str | None = None            # expected sha256 of the base checkpoint (checked if set)
    image_size: int = 256                           # model input side (256 LiteMedSAM, 1024 SAM ViT)
    # --- mosaic (see cfrseg.sam.mosaic.MosaicSpec): one mosaic = one 3D window of the zoomed volume
    crop: tuple[int, int, int] | str = (82, 82, 9)  # (X, Y, D) in working voxels; paper: (112, 112, 80), 9x9 grid;
                                                    # "auto": volume or patch mode by the plan (cfrseg.sam.window)
    crop_mm: tuple[float, float, float] | None = None  # physical window (working axes, mm; patch mode): replaces
                                                    # crop, voxels from the plan (like retrain.patch_mm)
    patch_side: int = 0                             # crop "auto", patch mode: cube side (0: 96 or the largest fitting)
    max_shrink: float = 1.5                         # crop "auto" / crop_mm: most the mosaic may be shrunk to fit
    grid: int = 0                                   # 0 = ceil(sqrt(D))
    tile_pad: int = 1
    # working grid = the plan's target spacing x spacing_factor (working axes: in-plane, in-plane, slice);
    # lite: (1/0.33, 1/0.33, 2) puts LA (0.625 mm) exactly where the former zoom (0.33, 0.33, 0.5) did
    spacing_factor: tuple[float, float, float] = (1.0, 1.0, 1.0)
    zoom: tuple[float, float, float] | None = None  # legacy alias: zoom z means spacing_factor 1/z (then None)
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    # --- model / optimisation
    lora_rank: int = 4                              # 0 = no LoRA: frozen encoder, decoder-only training
    lora_alpha: float = 4.0                         # scale alpha / rank = 1 (the reference has no scaling)
    lora_dropout: float = 0.0
    iterations: int = 200
    batch_size: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01                      # reference: 0.1
    warmup_iterations: int = 20                     # linear from lr / warmup to lr, then poly decay
    poly_power: float = 0.9
    head_init: str = "negated"                      # K-class head init, see cfrseg.sam.model.make_class_head
    dice_background: bool = True                    # Dice averaged over all classes (False: foreground only)
    # --- decoder-only fast mode: > 0 = encode this many augmented mosaics per labeled volume ONCE (frozen
    # encoder, needs lora_rank 0), then train the mask decoder + no-mask embedding on the cached embeddings
    embedding_cache: int = 0
    # --- the end of the encoder that trains too (cfrseg.sam.tail): "none" | "neck" | "last_stage" (+ neck).
    # With embedding_cache the cache holds the activations before the tail, so the tail trains on the cache
    encoder_tail: str = "none"
    # --- augmentation (the orientation family is also the pseudo-label TTA family)
    augment_rot90: bool = True
    augment_flip: bool = True
    bezier_p: float = 0.5                           # probability of a random Bezier curve on [0, 1] values
    foreground_prob: float = 0.0                    # probability that a crop is placed on a foreground voxel
    # --- compute: "bf16" = bfloat16 autocast of the encoder (embedding cache) and of the training forward pass;
    # fp32 weights and optimizer (cfrseg.stages.precision). Pays only on CPUs with native bf16 (docs/results.md)
    precision: str = "fp32"
    # --- run
    seed: int = 1337
    checkpoint_interval_s: float = 300.0
    resume: bool = False
    device: str = "auto"

    def __post_init__(self) -> None:
        z = self.zoom
        if z is not None:
            zs = (float(z),) * 3 if isinstance(z, (int, float)) else tuple(float(f) for f in z)
            require(len(zs) == 3 and min(zs) > 0, f"finetune.zoom must be three positive factors, got {z!r}")
            object.__setattr__(self, "spacing_factor", tuple(1.0 / f for f in zs))
            object.__setattr__(self, "zoom", None)
        super().__post_init__()

    def validate(self) -> None:
        require(bool(self.model), "finetune.model must be a SAM registry name")
        require(self.lora_rank >= 0, f"finetune.lora_rank must be >= 0, got {self.lora_rank}")
        require(self.embedding_cache >= 0, f"finetune.embedding_cache must be >= 0, got {self.embedding_cache}")
        require(self.embedding_cache == 0 or self.lora_rank == 0,
                "finetune.embedding_cache > 0 trains the decoder on frozen-encoder embeddings: set lora_rank 0")
        from cfrseg.sam.tail import TAILS

        require(self.encoder_tail in TAILS, f"finetune.encoder_tail must be one of {list(TAILS)}, "
                f"got {self.encoder_tail!r}")
        from cfrseg.sam.model import HEAD_INITS

        require(self.head_init in HEAD_INITS, f"finetune.head_init must be one of {HEAD_INITS}")
        require(self.lora_alpha > 0, f"finetune.lora_alpha must be > 0, got {self.lora_alpha}")
        require(0 <= self.lora_dropout < 1, f"finetune.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        require(self.iterations >= 1, f"finetune.iterations must be >= 1, got {self.iterations}")
        require(self.batch_size >= 1, f"finetune.batch_size must be >= 1, got {self.batch_size}")
        require(self.lr > 0, f"finetune.lr must be > 0, got {self.lr}")
        require(self.weight_decay >= 0, f"finetune.weight_decay must be >= 0, got {self.weight_decay}")
        require(0 <= self.warmup_iterations < self.iterations,
                f"finetune.warmup_iterations must be in [0, iterations), got {self.warmup_iterations}")
        require(self.poly_power >= 0, f"finetune.poly_power must be >= 0, got {self.poly_power}")
        require(0 <= self.bezier_p <= 1, f"finetune.bezier_p must be in [0, 1], got {self.bezier_p}")
        require(0 <= self.foreground_prob <= 1, "finetune.foreground_prob must be in [0, 1]")
        require(self.checkpoint_interval_s > 0, "finetune.checkpoint_interval_s must be > 0")
        from cfrseg.stages.precision import PRECISIONS

        require(self.precision in PRECISIONS, f"finetune.precision must be one of {list(PRECISIONS)}, "
                f"got {self.precision!r}")
        require(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"),
                f"finetune.device must be auto, cpu or cuda[:N], got {self.device!r}")
        self._check_window()
        if self.fixed_window:
            self.spec().check()
        else:   # the window comes from the plan at run time; check everything else now
            self._mosaic((16, 16, 1), self.grid, "patch").check()

    def _check_window(self) -> None:
        c = self.crop
        if isinstance(c, str):
            require(c == "auto", f"finetune.crop must be (X, Y, D) voxels or \"auto\", got {c!r}")
        else:
            require(isinstance(c, tuple) and len(c) == 3
                    and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in c),
                    f"finetune.crop must be three positive integers (X, Y, D) or \"auto\", got {c!r}")
        m = self.crop_mm
        require(m is None or (isinstance(m, tuple) and len(m) == 3 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1e5 for v in m)),
            f"finetune.crop_mm must be null or three positive sizes in mm, got {m!r}")
        require(not (c == "auto" and m is not None),
                "finetune: crop='auto' and crop_mm both choose the window; set only one")
        require(isinstance(self.patch_side, int) and not isinstance(self.patch_side, bool)
                and 0 <= self.patch_side <= 1024,
                f"finetune.patch_side must be in [0, 1024] (0: automatic), got {self.patch_side!r}")
        require(isinstance(self.max_shrink, (int, float)) and 1.0 <= self.max_shrink <= 64,
                f"finetune.max_shrink must be in [1, 64] (1 = never shrink the mosaic), got {self.max_shrink!r}")

    @property
    def fixed_window(self) -> bool:
        """True when the window is ``crop`` in voxels (no plan needed); False for crop 'auto' / crop_mm."""
        return self.crop != "auto" and self.crop_mm is None

    def window(self, plan: Plan | None = None) -> Window:
        """The resolved window (crop voxels, grid, mode; :func:`cfrseg.sam.window.resolve_window`): ``crop`` as
        given, or from ``plan`` for crop 'auto' / crop_mm (ConfigError without a plan or when it cannot fit)."""
        return resolve_window(self.crop, self.crop_mm, plan, self.spacing_factor, image_size=self.image_size,
                              tile_pad=self.tile_pad, grid=self.grid, patch_side=self.patch_side,
                              max_shrink=float(self.max_shrink), square=self.augment_rot90)

    def _mosaic(self, crop: tuple[int, int, int], grid: int, mode: str) -> MosaicSpec:
        return MosaicSpec(
            image_size=self.image_size, crop=tuple(crop), grid=grid, tile_pad=self.tile_pad,
            spacing_factor=tuple(float(f) for f in self.spacing_factor),
            clip_percentiles=tuple(self.clip_percentiles),
            rot90=self.augment_rot90, flip=self.augment_flip, mode=mode,
        )

    def spec(self, plan: Plan | None = None) -> MosaicSpec:
        """The volume -> mosaic settings (stored in finetune.pt for the pseudo-label stage), with the window
        resolved by :meth:`window` (``plan`` needed for crop 'auto' / crop_mm)."""
        w = self.window(plan)
        spec = self._mosaic(w.crop, w.grid, w.mode)
        spec.check()
        return spec


@dataclass
class FinetuneResult:
    store: Store
    artifact: str                     # key of finetune.pt in the store
    iterations: int
    final_loss: float
    history: list[dict[str, float]] = field(default_factory=list)
    elapsed_s: float = 0.0
    resumed_from: int = 0             # iteration the run resumed at (0 = fresh start)
    skipped: bool = False             # already finished: nothing was trained
    window: dict[str, Any] | None = None  # the resolved mosaic window (cfrseg.sam.window.Window.to_dict)


# ------------------------------------------------------------------------------------------------ helpers

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sha256_file(path: str | Path) -> str:
    from cfrseg.sam.weights import sha256_file as _sha

    return _sha(path)


def resolve_base_checkpoint(model: str, checkpoint: str | None, expected_sha256: str | None) -> tuple[Path | None, str | None]:
    """(path, sha256) of the base weights: the given file, the cached one for ``lite_medsam``, or (None, None)
    for models that may start from a random base. Raises NotFoundError / InputError / ConfigError clearly."""
    from cfrseg.sam.model import SAM_MODELS

    if model not in SAM_MODELS:
        raise ConfigError(f"unknown SAM model {model!r}; choose one of {sorted(SAM_MODELS)}")
    spec = SAM_MODELS[model]
    if checkpoint:
        p = Path(checkpoint).expanduser()
        if not p.is_file():
            raise NotFoundError(f"SAM checkpoint file {p} not found (finetune.checkpoint)")
    elif spec.weights is not None:
        from cfrseg.sam.weights import fetch

        p = Path(fetch(spec.weights))
    elif not spec.pretrainable:
        if expected_sha256:
            raise ConfigError(f"checkpoint_sha256 is set but model {model!r} has no checkpoint file")
        return None, None
    else:
        raise ConfigError(f"model {model!r} needs its SAM checkpoint: set finetune.checkpoint "
                          f"(e.g. sam_vit_b_01ec64.pth) or use --sam-checkpoint")
    sha = sha256_file(p)
    if expected_sha256 and sha.lower() != expected_sha256.lower():
        raise InputError(f"SAM checkpoint {p} has sha256 {sha}, expected {expected_sha256} "
                         f"(wrong or corrupted file)")
    return p, sha


def build_model(model: str, num_classes: int, checkpoint: Path | None, image_size: int, *,
                lora_rank: int, lora_alpha: float, lora_dropout: float, base_seed: int = 0,
                head_init: str = "pretrained", encoder_tail: str = "none") -> torch.nn.Module:
    """Base SAM (+ LoRA on q, v unless ``lora_rank`` is 0); everything frozen except LoRA, the mask decoder, the
    no-mask embedding and the ``encoder_tail`` (cfrseg.sam.tail). The base is built under ``base_seed`` so a
    model without a checkpoint (``tiny``) is reproducible. ``head_init`` only matters for training (a loaded
    delta overwrites the whole head)."""
    from cfrseg.sam.lora import inject_lora, trainable_parameters
    from cfrseg.sam.model import build_sam
    from cfrseg.sam.tail import mark_tail_trainable

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(base_seed)
        sam = build_sam(model, num_classes, checkpoint=str(checkpoint) if checkpoint else None,
                        image_size=image_size, pretrained=checkpoint is not None, head_init=head_init)
        if lora_rank > 0:
            inject_lora(sam, rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout)
        else:
            trainable_parameters(sam)
        mark_tail_trainable(sam, encoder_tail)
    return sam


def trainable_state(sam: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The fine-tuned delta (LoRA A/B, mask decoder minus IoU head, no-mask embedding, the encoder tail if one
    trains), cloned to the CPU."""
    from cfrseg.sam.lora import lora_state_dict

    return {k: v.to("cpu", copy=True) for k, v in lora_state_dict(sam).items()}


def load_trainable_state(sam: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a :func:`trainable_state` into a model built the same way (InputError when it does not fit)."""
    from cfrseg.sam.lora import load_lora_state_dict

    load_lora_state_dict(sam, state)


def train_mode(sam: torch.nn.Module) -> None:
    """Train mode for the trainable parts, but BatchNorm layers of the frozen encoder stay in eval mode
    (their running statistics belong to the base and must not drift)."""
    sam.train()
    for m in sam.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def lr_lambda(config: FinetuneConfig):
    """Multiplier of config.lr at step t: linear warmup (t+1)/W for t < W, then (1 - progress)^power."""
    w, n, pw = config.warmup_iterations, config.iterations, config.poly_power

    def f(t: int) -> float:
        if t < w:
            return (t + 1) / w
        return max(0.0, 1.0 - (t - w) / max(1, n - w)) ** pw

    return f


def _rng_state(g: torch.Generator) -> dict[str, Any]:
    st: dict[str, Any] = {"data": g.get_state(), "torch": torch.get_rng_state(),
                          "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(g: torch.Generator, st: dict[str, Any]) -> None:
    g.set_state(st["data"])
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _save_pt(store: Store, key: str, obj: Any) -> None:
    store.put_bytes(key, ckpt_io.dumps(obj))


def _load_pt(store: Store, key: str) -> Any:
    """A checkpoint/artifact of this stage, loaded with weights_only=True (InputError for anything else)."""
    return ckpt_io.loads(store.get_bytes(key), f"{store!r} {key}")


def _training_fields(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in RESUME_FREE}


def _diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def plot_loss(history: list[dict[str, float]]) -> bytes:
    """PNG bytes of loss / CE / Dice against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = [h["step"] for h in history]
    for k in ("loss", "ce", "dice"):
        ax.plot(steps, [h[k] for h in history], label=k, lw=1)
    ax.set_xlabel("iteration")
    ax.set_title("SAM fine-tuning loss (valid pixels)")
    ax.legend()
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


@dataclass
class EmbeddingCache:
    """Frozen-encoder embeddings of a fixed pool of augmented mosaics, with their targets and validity."""

    embeddings: torch.Tensor     # (N, C, h, w) float32
    target: torch.Tensor         # (N, S, S) uint8
    valid: torch.Tensor          # (N, S, S) bool


@torch.inference_mode()
def build_embedding_cache(sam: torch.nn.Module, volumes: list, spec: MosaicSpec, per_volume: int, *, seed: int,
                          bezier_p: float, foreground_prob: float, chunk: int = 4,
                          on_chunk=None, precision: str = "fp32", encoder_tail: str = "none") -> EmbeddingCache:
    """Encode ``per_volume`` random mosaics of every volume (random window, orientation, Bezier curve, drawn
    by :func:`cfrseg.sam.mosaic.make_batch` from a generator seeded with ``seed``: the same pool every time).
    ``on_chunk(done, total)`` is called after each encoder batch (progress / cancel). ``precision="bf16"``
    runs the encoder under bfloat16 autocast (the cached embeddings are stored as float32). With an
    ``encoder_tail`` other than "none" the cache holds the activations that enter the tail
    (:func:`cfrseg.sam.tail.encode_head`) instead of the embeddings."""
    from cfrseg.sam.tail import encode_head
    from cfrseg.stages.precision import autocast

    g = torch.Generator().manual_seed(seed)
    total = per_volume * len(volumes)
    cache: EmbeddingCache | None = None
    done = 0
    for pv in volumes:
        left = per_volume
        while left > 0:
            n = min(chunk, left)
            images, target, valid = make_batch([pv], spec, n, g, bezier_p=bezier_p,
                                               foreground_prob=foreground_prob)
            with autocast(images.device, precision):
                emb = encode_head(sam, images, encoder_tail)
            if cache is None:   # filled in place: the cache is held once (4 MB a mosaic for LiteMedSAM)
                cache = EmbeddingCache(torch.empty((total, *emb.shape[1:]), dtype=torch.float32, device=emb.device),
                                       torch.empty((total, *target.shape[1:]), dtype=torch.uint8,
                                                   device=target.device),
                                       torch.empty((total, *valid.shape[1:]), dtype=torch.bool, device=valid.device))
            cache.embeddings[done:done + n] = emb
            cache.target[done:done + n] = target
            cache.valid[done:done + n] = valid
            done += n
            left -= n
            if on_chunk is not None:
                on_chunk(done, total)
    if cache is None:
        raise ValueError("build_embedding_cache needs at least one volume and per_volume >= 1")
    return cache


# ------------------------------------------------------------------------------------------------ the stage

def _finished(config: FinetuneConfig, store: Store) -> dict[str, Any] | None:
    """The artifact when the store holds a finished run of this same config, else None."""
    if not store.exists(ARTIFACT):
        return None
    try:
        art = _load_pt(store, ARTIFACT)
    except Exception:  # noqa: BLE001 - a broken artifact just means "not finished"
        return None
    if art.get("format") != FORMAT or art.get("iterations") != config.iterations:
        return None
    if _diff(_training_fields(art.get("config", {})), _training_fields(config.to_dict())):
        return None
    return art


def run_finetune(
    config: FinetuneConfig,
    data: Manifest,
    store: Store,
    *,
    plan: Plan | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFlag | None = None,
) -> FinetuneResult:
    """Fine-tune SAM on mosaics of the labeled cases of ``data``; see the module docstring for the outputs.

    ``plan``: the dataset plan (default: computed from ``data``'s fingerprint, cached in ``store``). A store
    that already holds a fine-tune run is reused (finished: returned as is; interrupted: continued) only with
    ``config.resume`` and equal provenance (:func:`cfrseg.provenance.guard`). Raises InputError (no labeled
    case, unreadable data), NotFoundError (checkpoint file missing), ConfigError (store holds another run),
    Cancelled (after writing ``checkpoint.pt``)."""
    t0 = time.monotonic()
    labeled = data.labeled
    if not labeled:
        raise InputError(f"manifest {data.name!r} has no labeled case; fine-tuning needs at least one")
    base_path, base_sha = resolve_base_checkpoint(config.model, config.checkpoint, config.checkpoint_sha256)
    plan = plan or plan_for(data, store, progress=progress, cancel=cancel, stage=STAGE)
    window = config.window(plan)   # ConfigError here, before anything of this run is written
    spec = config.spec(plan)
    prov = stage_provenance(STAGE, data, _training_fields(config.to_dict()), plan=plan.digest(),
                            inputs={"base_sha256": base_sha or f"random:{config.model}"})
    resuming = guard(store, STAGE, prov, config.resume, (CHECKPOINT, ARTIFACT))
    put_json(store, PLAN_KEY, plan.to_dict())

    done = _finished(config, store) if resuming else None
    if done is not None:
        hist = get_json(store, "history.json") if store.exists("history.json") else []
        emit(progress, ProgressEvent(STAGE, config.iterations, config.iterations, message="already finished"))
        return FinetuneResult(store, ARTIFACT, config.iterations, hist[-1]["loss"] if hist else float("nan"),
                              hist, 0.0, config.iterations, skipped=True, window=done.get("window"))

    device = resolve_device(config.device)
    log.info("fine-tune window: %s (crop %s, grid %s)", window.reason, spec.crop, spec.grid)
    sam = build_model(config.model, data.num_classes, base_path, config.image_size, lora_rank=config.lora_rank,
                      lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      head_init=config.head_init, encoder_tail=config.encoder_tail).to(device)
    params = [p for p in sam.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"model {config.model!r}: nothing to train (no LoRA / decoder parameters)")
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(config))

    g = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    history: list[dict[str, float]] = []
    start = 0
    if resuming and store.exists(CHECKPOINT):
        ck = _load_pt(store, CHECKPOINT)
        changed = _diff(_training_fields(ck["config"]), _training_fields(config.to_dict()))
        if changed:
            raise ConfigError(f"cannot resume: the checkpoint in {store!r} was made with different "
                              f"settings {changed}; start a new run (resume=false) or restore them")
        if ck.get("spec", spec.to_dict()) != spec.to_dict():
            raise ConfigError(f"cannot resume: the checkpoint's mosaic window {ck['spec'].get('crop')} "
                              f"({ck['spec'].get('mode')}) differs from the one resolved now {spec.crop} "
                              f"({spec.mode}); start a new run (resume=false)")
        if ck.get("base_sha256") != base_sha:
            raise InputError(f"cannot resume: the checkpoint was trained on a base with sha256 "
                             f"{ck.get('base_sha256')}, the current base has {base_sha}")
        load_trainable_state(sam, ck["trainable"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        _set_rng_state(g, ck["rng"])
        history = list(ck["history"])
        start = int(ck["iteration"])

    def save_checkpoint(iteration: int) -> None:
        _save_pt(store, CHECKPOINT, {
            "format": FORMAT, "iteration": iteration, "config": config.to_dict(), "base_sha256": base_sha,
            "provenance": prov, "spec": spec.to_dict(), "window": window.to_dict(),
            "trainable": trainable_state(sam), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "rng": _rng_state(g), "history": history,
        })
        put_json(store, "history.json", history)

    put_json(store, "config.json", config.to_dict())
    put_json(store, "window.json", {**window.to_dict(), "spec": spec.to_dict()})
    volumes = []
    from cfrseg.data.datasets import load_case

    for i, case in enumerate(labeled):
        check_cancel(cancel, STAGE)
        img, lab = load_case(case, data)
        if lab is None:
            raise InputError(f"labeled case {case.case_id!r} has no label")
        volumes.append(prepare_case(plan, spec, img, lab, data.num_classes, device)[0])
        emit(progress, ProgressEvent(STAGE, start, config.iterations,
                                     message=f"loaded {i + 1}/{len(labeled)} labeled cases"))

    cache: EmbeddingCache | None = None
    if config.embedding_cache > 0:
        sam.eval()

        def on_chunk(done: int, total: int) -> None:
            check_cancel(cancel, STAGE)
            emit(progress, ProgressEvent(STAGE, start, config.iterations,
                                         message=f"encoded {done}/{total} mosaics (embedding cache)"))

        cache = build_embedding_cache(sam, volumes, spec, config.embedding_cache, seed=config.seed + 7919,
                                      bezier_p=config.bezier_p, foreground_prob=config.foreground_prob,
                                      on_chunk=on_chunk, precision=config.precision,
                                      encoder_tail=config.encoder_tail)
        del volumes
    size = (config.image_size, config.image_size)
    from cfrseg.sam.tail import apply_tail
    from cfrseg.stages.precision import autocast

    train_mode(sam)
    eta = Eta()
    last_ck = time.monotonic()
    it = start
    try:
        for it in range(start, config.iterations):
            check_cancel(cancel, STAGE)
            if cache is None:
                images, target, valid = make_batch(volumes, spec, config.batch_size, g,
                                                   bezier_p=config.bezier_p, foreground_prob=config.foreground_prob)
                with autocast(device, config.precision):
                    logits = sam(images).float()
            else:
                idx = torch.randint(len(cache.embeddings), (config.batch_size,), generator=g)
                target, valid = cache.target[idx].long(), cache.valid[idx]
                with autocast(device, config.precision):
                    logits = sam.decode(apply_tail(sam, cache.embeddings[idx], config.encoder_tail)).float()
                if tuple(logits.shape[-2:]) != size:
                    logits = torch.nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            loss, parts = masked_ce_dice(logits, target, valid, include_background=config.dice_background)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            rec = {"step": it + 1, "loss": float(loss.detach()), **parts, "lr": lr}
            history.append(rec)
            emit(progress, ProgressEvent(STAGE, it + 1, config.iterations,
                                         {k: rec[k] for k in ("loss", "ce", "dice")},
                                         eta_s=eta(it + 1, config.iterations)))
            if time.monotonic() - last_ck >= config.checkpoint_interval_s and it + 1 < config.iterations:
                save_checkpoint(it + 1)
                last_ck = time.monotonic()
    except Cancelled:
        save_checkpoint(it)
        raise

    save_checkpoint(config.iterations)
    _save_pt(store, ARTIFACT, {
        "format": FORMAT, "model": config.model, "num_classes": data.num_classes,
        "image_size": config.image_size,
        "lora": {"rank": config.lora_rank, "alpha": config.lora_alpha, "dropout": config.lora_dropout},
        "head_init": config.head_init, "encoder_tail": config.encoder_tail,
        "base_checkpoint": str(base_path) if base_path else None, "base_sha256": base_sha, "base_seed": 0,
        "spec": spec.to_dict(), "window": window.to_dict(), "iterations": config.iterations,
        "config": config.to_dict(),
        "plan": plan.to_dict(), "class_names": list(data.names), "provenance": prov,
        "delta": trainable_state(sam),
    })
    store.put_bytes("loss.png", plot_loss(history))
    emit(progress, ProgressEvent(STAGE, config.iterations, config.iterations, message="done"))
    return FinetuneResult(store, ARTIFACT, config.iterations, history[-1]["loss"] if history else float("nan"),
                          history, time.monotonic() - t0, start, window=window.to_dict())


# ------------------------------------------------------------------------------------------------ loading

def _as_store(store_or_dir: Store | str | Path) -> Store:
    return LocalStore(store_or_dir) if isinstance(store_or_dir, (str, Path)) else store_or_dir


def read_artifact(store_or_dir: Store | str | Path) -> dict[str, Any]:
    """The contents of ``finetune.pt`` (NotFoundError when absent, InputError when not a cfrseg artifact)."""
    store = _as_store(store_or_dir)
    if not store.exists(ARTIFACT):
        raise NotFoundError(f"no {ARTIFACT} in {store!r}: run the fine-tune stage first")
    art = _load_pt(store, ARTIFACT)
    if not isinstance(art, dict) or art.get("format") != FORMAT:
        raise InputError(f"{store!r}/{ARTIFACT} is not a cfrseg fine-tune artifact")
    return art


def load_finetuned_spec(store_or_dir: Store | str | Path) -> MosaicSpec:
    """The volume -> mosaic settings the model was fine-tuned with."""
    return MosaicSpec.from_dict(read_artifact(store_or_dir)["spec"])


def load_finetuned(
    store_or_dir: Store | str | Path,
    device: str | torch.device = "cpu",
    *,
    checkpoint: str | Path | None = None,
    artifact: dict[str, Any] | None = None,
) -> torch.nn.Module:
    """Rebuild the base SAM, check its sha256 against the one recorded at fine-tune time, apply the delta.

    ``checkpoint`` overrides where the base weights are read (default: the recorded path, or the cache for
    lite_medsam). Returns the model in eval mode on ``device``; ``model.cfr_spec`` holds the MosaicSpec and
    ``model.cfr_plan`` the dataset plan."""
    art = artifact if artifact is not None else read_artifact(store_or_dir)
    model, want = art["model"], art.get("base_sha256")
    ck = checkpoint or art.get("base_checkpoint")
    if want is None:
        path = None
    else:
        if ck is None or not Path(ck).is_file():
            from cfrseg.sam.model import SAM_MODELS

            if checkpoint is None and model in SAM_MODELS and SAM_MODELS[model].weights is not None:
                ck = None   # the weight cache provides it (sha256 checked below)
            else:
                raise NotFoundError(f"base SAM checkpoint {ck} not found; pass the file this model was "
                                    f"fine-tuned on (sha256 {want})")
        path, sha = resolve_base_checkpoint(model, str(ck) if ck else None, None)
        if sha != want:
            raise InputError(f"base SAM checkpoint {path} has sha256 {sha}, but the fine-tuned delta was "
                             f"trained on {want}: use the same base checkpoint")
    lo = art["lora"]
    sam = build_model(model, art["num_classes"], path, art["image_size"], lora_rank=lo["rank"],
                      lora_alpha=lo["alpha"], lora_dropout=lo["dropout"], base_seed=art.get("base_seed", 0),
                      encoder_tail=art.get("encoder_tail", "none"))
    load_trainable_state(sam, art["delta"])
    sam.eval()
    sam.cfr_spec = MosaicSpec.from_dict(art["spec"])  # type: ignore[assignment]
    sam.cfr_plan = load_plan(art)  # type: ignore[assignment]
    return sam.to(device)


def load_plan(art: dict[str, Any]) -> Plan:
    """The dataset plan a fine-tune artifact was trained with (InputError for artifacts made before plans)."""
    if "plan" not in art:
        raise InputError("this finetune.pt was made by an older cfrseg without a dataset plan; fine-tune again")
    return Plan.from_dict(art["plan"])
