"""Stage 2b of CFR: whole-volume pseudo-labels from the fine-tuned SAM (Eq. 3: F_C^-1(F_FT(F_C(X)))).

For every case to label, the WHOLE volume goes through the same path as at fine-tune time
(:mod:`cfrseg.sam_data`, with the :class:`~cfrseg.sam_data.MosaicSpec` stored in ``finetune.pt``): [0, 1]
normalisation, zoom, windows of the fine-tune crop size covering the volume (in-plane overlap averaged, slice
groups along the slice axis), mosaic, SAM, softmax, inverse mosaic; optionally averaged over the fine-tune
orientation family (test-time augmentation). Probabilities are resampled back to the source grid, then
``labels/<case_id>.nii.gz`` (uint8 argmax) and ``confidence/<case_id>.nii.gz`` (float32 max probability) are
written once, in the source geometry. A rerun skips finished cases.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cfrseg import concat
from cfrseg.config import ConfigBase, require
from cfrseg.errors import ConfigError, InputError
from cfrseg.finetune import ARTIFACT, load_finetuned, read_artifact, resolve_device
from cfrseg.manifest import ROLES, Case, Manifest
from cfrseg.progress import CancelFlag, Eta, ProgressEvent, ProgressFn, check_cancel, emit
from cfrseg.sam_data import MosaicSpec, crop_padded, orient, plan_windows, prepare_volume, unorient
from cfrseg.store import Store, get_json, put_json
from cfrseg.volume import Volume

STAGE = "pseudolabel"
SOURCE = "source.json"


@dataclass(frozen=True)
class PseudolabelConfig(ConfigBase):
    """Pseudo-labelling settings. The volume -> mosaic settings come from the fine-tuned artifact."""

    roles: tuple[str, ...] = ("unlabeled",)   # which cases to label ("test"/"labeled" for evaluation)
    tta: bool = False                         # average over the fine-tune orientation family (x1..x8 cost)
    tta_count: int = 0                        # with tta: use only this many orientations, evenly spread over the
                                              # family, identity first (8-family: 2 = id + flip); 0 = all
    overlap: float = 0.25                     # in-plane overlap of windows when a slice exceeds the crop
    batch_size: int = 2                       # mosaics per forward pass
    merge_lora: bool = True                   # fold LoRA into qkv for inference (same outputs, faster)
    write_confidence: bool = True
    checkpoint: str | None = None             # base SAM checkpoint override (default: recorded / cached)
    device: str = "auto"

    def validate(self) -> None:
        require(len(self.roles) > 0 and all(r in ROLES for r in self.roles),
                f"pseudolabel.roles must be a non-empty subset of {ROLES}, got {self.roles}")
        require(0 <= self.overlap < 1, f"pseudolabel.overlap must be in [0, 1), got {self.overlap}")
        require(self.tta_count >= 0, f"pseudolabel.tta_count must be >= 0, got {self.tta_count}")
        require(self.batch_size >= 1, f"pseudolabel.batch_size must be >= 1, got {self.batch_size}")
        require(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"),
                f"pseudolabel.device must be auto, cpu or cuda[:N], got {self.device!r}")


@dataclass
class PseudolabelResult:
    store: Store
    labels: dict[str, str]                   # case_id -> key of the label file in the store
    paths: dict[str, str]                    # case_id -> local file path (LocalStore), for the manifest
    confidence: dict[str, str] = field(default_factory=dict)   # case_id -> key of the confidence map
    skipped: list[str] = field(default_factory=list)           # already present, not recomputed
    elapsed_s: float = 0.0


def label_key(case_id: str) -> str:
    return f"labels/{case_id}.nii.gz"


def confidence_key(case_id: str) -> str:
    return f"confidence/{case_id}.nii.gz"


# ------------------------------------------------------------------------------------------------ prediction

@torch.inference_mode()
def predict_volume(
    sam: torch.nn.Module,
    spec: MosaicSpec,
    image: np.ndarray,
    num_classes: int,
    *,
    tta: bool = False,
    tta_count: int = 0,
    overlap: float = 0.25,
    batch_size: int = 2,
    device: torch.device | str = "cpu",
    cancel: CancelFlag | None = None,
) -> torch.Tensor:
    """Class probabilities (K, X, Y, Z) float32 on ``device`` for a whole volume ``image`` (X, Y, Z) in its own
    grid. Windows of ``spec.crop`` cover the zoomed volume; overlapping predictions (in-plane overlap, shared
    slices between slice groups, TTA orientations) are averaged."""
    device = torch.device(device)
    pv = prepare_volume(image, None, spec, num_classes, device)
    layout = spec.layout()
    family = tta_family(spec, tta_count) if tta else [(0, False)]
    total = torch.zeros((num_classes, *pv.image.shape), dtype=torch.float32, device=device)
    for o in family:
        vol = orient(pv.image, o)
        acc = torch.zeros((num_classes, *vol.shape), dtype=torch.float32, device=device)
        cnt = torch.zeros(tuple(vol.shape), dtype=torch.float32, device=device)
        starts = plan_windows(tuple(vol.shape), spec.crop, overlap)
        for i in range(0, len(starts), batch_size):
            check_cancel(cancel, STAGE)
            chunk = starts[i : i + batch_size]
            wins = [crop_padded(vol, s, spec.crop) for s in chunk]
            x = torch.stack([torch.where(ins, w, torch.zeros((), device=device)) for w, ins in wins])
            mosaic = concat.to_mosaic(x, layout)[:, None].expand(-1, 3, -1, -1)
            prob = torch.softmax(sam(mosaic).float(), dim=1)                  # (B, K, S, S)
            back = concat.from_mosaic(prob, layout)                          # (B, K, cx, cy, cz)
            for s, p in zip(chunk, back):
                src, dst = [], []
                for a, (st, n, L) in enumerate(zip(s, spec.crop, vol.shape)):
                    lo, hi = max(st, 0), min(st + n, L)
                    dst.append(slice(lo, hi))
                    src.append(slice(lo - st, hi - st))
                acc[(slice(None), *dst)] += p[(slice(None), *src)]
                cnt[tuple(dst)] += 1
        total += unorient(acc / cnt.clamp_min(1), o)
    probs = total / len(family)
    if tuple(probs.shape[1:]) != tuple(image.shape):
        probs = F.interpolate(probs[None], size=tuple(image.shape), mode="trilinear", align_corners=False)[0]
    return probs


def tta_family(spec: MosaicSpec, count: int = 0) -> list:
    """The TTA orientations: the whole fine-tune family (``count`` 0 or >= its size), else ``count`` of them
    evenly spread, identity first (for the 8-element family: 2 = identity + mirror, 4 = adds the half turns)."""
    fam = spec.orientations()
    if count <= 0 or count >= len(fam):
        return fam
    step = len(fam) / count
    return [fam[int(i * step)] for i in range(count)]


def probs_to_label(probs: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(K, X, Y, Z) probabilities -> (uint8 argmax label, float32 confidence = max probability in [0, 1])."""
    conf, lab = probs.max(dim=0)
    return lab.to(torch.uint8).cpu().numpy(), conf.clamp(0, 1).float().cpu().numpy()


def _digest(store: Store) -> str:
    return hashlib.sha256(store.get_bytes(ARTIFACT)).hexdigest()


def _put_volume(store: Store, key: str, vol: Volume, label: bool) -> None:
    from cfrseg.io import write_volume

    with tempfile.TemporaryDirectory() as d:
        p = write_volume(vol, Path(d) / Path(key).name, label=label)
        store.put_file(key, p)


def _local_path(store: Store, key: str) -> str | None:
    path = getattr(store, "path", None)
    return str(path(key)) if callable(path) else None


def _cases(data: Manifest, roles: tuple[str, ...]) -> list[Case]:
    return [c for c in data.cases if c.role in roles]


def _load_model(config: PseudolabelConfig, finetuned: Store, data: Manifest,
                device: torch.device) -> tuple[torch.nn.Module, MosaicSpec, dict[str, Any]]:
    art = read_artifact(finetuned)
    if art["num_classes"] != data.num_classes:
        raise InputError(f"the fine-tuned SAM predicts {art['num_classes']} classes, manifest {data.name!r} "
                         f"has {data.num_classes}")
    sam = load_finetuned(finetuned, device, checkpoint=config.checkpoint, artifact=art)
    spec = sam.cfr_spec
    if config.merge_lora:
        from cfrseg.models.lora import merge_lora

        merge_lora(sam)
    return sam, spec, art


# ------------------------------------------------------------------------------------------------ the stage

def run_pseudolabel(
    config: PseudolabelConfig,
    data: Manifest,
    store: Store,
    *,
    finetuned: Store,
    progress: ProgressFn | None = None,
    cancel: CancelFlag | None = None,
) -> PseudolabelResult:
    """Label the cases of ``data`` whose role is in ``config.roles`` with the SAM fine-tuned in ``finetuned``.

    Writes ``labels/<id>.nii.gz``, ``confidence/<id>.nii.gz``, ``config.json``, ``source.json`` (digest of the
    fine-tune artifact) and ``summary.json`` (per-case time, foreground fraction, mean confidence). Cases whose
    files exist are skipped. Raises NotFoundError (no finetune.pt), InputError, ConfigError (the store holds
    labels of another fine-tuned model), Cancelled (finished cases stay)."""
    t0 = time.monotonic()
    cases = _cases(data, config.roles)
    digest = _digest(finetuned) if finetuned.exists(ARTIFACT) else None
    if digest is None:
        read_artifact(finetuned)   # raises the clear NotFoundError
    if store.exists(SOURCE):
        old = get_json(store, SOURCE).get("finetune_sha256")
        if old != digest:
            raise ConfigError(f"{store!r} holds pseudo-labels of another fine-tuned SAM ({ARTIFACT} sha256 "
                              f"{old}); write to a new folder or delete it")
    put_json(store, SOURCE, {"finetune_sha256": digest})
    put_json(store, "config.json", config.to_dict())
    summary: dict[str, Any] = get_json(store, "summary.json") if store.exists("summary.json") else {}

    device = resolve_device(config.device)
    labels, paths, conf_keys, skipped = {}, {}, {}, []
    model: tuple[torch.nn.Module, MosaicSpec, dict[str, Any]] | None = None
    eta = Eta()
    eta(0, len(cases))
    for i, case in enumerate(cases):
        lk, ck = label_key(case.case_id), confidence_key(case.case_id)
        done = store.exists(lk) and (store.exists(ck) or not config.write_confidence)
        if done:
            skipped.append(case.case_id)
        else:
            check_cancel(cancel, STAGE)
            if model is None:
                model = _load_model(config, finetuned, data, device)
            sam, spec, _ = model
            from cfrseg.data import load_case

            tc = time.monotonic()
            image, _gt = load_case(case, data, check_pseudo=False)
            probs = predict_volume(sam, spec, image.array, data.num_classes, tta=config.tta,
                                   tta_count=config.tta_count, overlap=config.overlap, batch_size=config.batch_size, device=device,
                                   cancel=cancel)
            lab, conf = probs_to_label(probs)
            if config.write_confidence:
                _put_volume(store, ck, image.with_array(conf), label=False)
            _put_volume(store, lk, image.with_array(lab), label=True)   # written last: marks the case done
            summary[case.case_id] = {"seconds": round(time.monotonic() - tc, 2),
                                     "foreground_fraction": float((lab > 0).mean()),
                                     "mean_confidence": float(conf.mean())}
            put_json(store, "summary.json", summary)
        labels[case.case_id] = lk
        if config.write_confidence:
            conf_keys[case.case_id] = ck
        lp = _local_path(store, lk)
        if lp is not None:
            paths[case.case_id] = lp
        emit(progress, ProgressEvent(STAGE, i + 1, len(cases), message=f"{case.case_id}"
                                     + (" (already done)" if done else ""), eta_s=eta(i + 1, len(cases))))
    return PseudolabelResult(store, labels, paths, conf_keys, skipped, time.monotonic() - t0)


def evaluate_sam(
    config: PseudolabelConfig,
    data: Manifest,
    finetuned: Store,
    *,
    case_ids: list[str] | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFlag | None = None,
) -> dict[str, Any]:
    """Dice/Jaccard/ASD/HD95 of the fine-tuned SAM alone (the paper's CFR_FT row) on labeled cases.

    Cases: ``case_ids`` if given, else those with a label whose role is in ``config.roles``. Runs exactly the
    pseudo-label path (:func:`predict_volume`). Returns ``{"cases": {id: compute_case(...)}, "summary":
    summarize(...), "seconds": {id: s}}``."""
    from cfrseg.data import load_case
    from cfrseg.metrics import compute_case, summarize

    if case_ids is not None:
        cases = [data.case(c) for c in case_ids]
    else:
        cases = [c for c in _cases(data, config.roles) if c.label]
    if not cases:
        raise InputError(f"evaluate_sam: no labeled case to evaluate among roles {config.roles} of {data.name!r}")
    device = resolve_device(config.device)
    sam, spec, _ = _load_model(config, finetuned, data, device)
    out: dict[str, Any] = {"cases": {}, "seconds": {}}
    for i, case in enumerate(cases):
        check_cancel(cancel, "evaluate")
        image, gt = load_case(case, data, check_pseudo=False)
        if gt is None:
            raise InputError(f"evaluate_sam: case {case.case_id!r} has no label")
        tc = time.monotonic()
        probs = predict_volume(sam, spec, image.array, data.num_classes, tta=config.tta, tta_count=config.tta_count,
                               overlap=config.overlap,
                               batch_size=config.batch_size, device=device, cancel=cancel)
        lab, _ = probs_to_label(probs)
        out["seconds"][case.case_id] = round(time.monotonic() - tc, 2)
        out["cases"][case.case_id] = compute_case(lab, gt.array, image.spacing, data.num_classes)
        emit(progress, ProgressEvent("evaluate", i + 1, len(cases), message=case.case_id))
    out["summary"] = summarize(list(out["cases"].values()))
    return out
