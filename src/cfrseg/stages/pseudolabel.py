"""Stage 2b of CFR: whole-volume pseudo-labels from the fine-tuned SAM (Eq. 3: F_C^-1(F_FT(F_C(X)))).

For every case to label, the WHOLE volume goes through the same path as at fine-tune time
(:mod:`cfrseg.sam.mosaic`, with the :class:`~cfrseg.sam.mosaic.MosaicSpec` stored in ``finetune.pt``): [0, 1]
normalisation, zoom, windows of the fine-tune crop size covering the volume (in-plane overlap averaged, slice
groups along the slice axis; in patch mode 3D patches overlapping along every axis), mosaic, SAM, softmax, inverse mosaic; optionally averaged over the fine-tune
orientation family (test-time augmentation). Probabilities are resampled back to the source grid, then
``labels/<case_id>.nii.gz`` (uint8 argmax) and ``confidence/<case_id>.nii.gz`` (float32 max probability) are
written once, in the source geometry. A rerun skips finished cases. Accumulation, resampling and argmax are
streamed along the slice axis (:mod:`cfrseg.accumulate`): no K x volume float map is held.

With ``calibration = "prior"`` the probabilities are first reweighted per class (:mod:`cfrseg.sam.calibrate`) so
that the labels of a few unlabeled volumes have the class fractions of the labeled volumes; the weights are
fitted once, before any label is written, and kept in ``calibration.json``.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cfrseg.accumulate import (
    ArgmaxSink,
    FullSink,
    SampleSink,
    Sink,
    SweepAccumulator,
    SweepResampler,
    Unorient,
)
from cfrseg.config import ConfigBase, require
from cfrseg.data.manifest import ROLES, Case, Manifest
from cfrseg.data.plan import PLAN_KEY, Plan
from cfrseg.data.volume import Volume
from cfrseg.errors import InputError
from cfrseg.progress import CancelFlag, Eta, ProgressEvent, ProgressFn, check_cancel, emit
from cfrseg.provenance import digest, file_sha256, guard, normalize, stage_provenance
from cfrseg.sam import concat
from cfrseg.sam.calibrate import apply_class_weights, class_fractions, fit_class_weights
from cfrseg.sam.mosaic import MosaicSpec, crop_padded, orient, plan_windows, prepare_volume, unorient
from cfrseg.stages.finetune import ARTIFACT, load_finetuned, load_plan, read_artifact, resolve_device
from cfrseg.store import Store, get_json, put_json

STAGE = "pseudolabel"
SOURCE = "source.json"
CALIBRATION = "calibration.json"
CALIBRATIONS = ("none", "prior")
#: config fields that do not change the labels (free to differ on resume)
OPERATIONAL = ("resume", "device", "batch_size", "checkpoint", "merge_lora")


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
    calibration: str = "none"                 # none (argmax, the paper) | prior (class fractions of the labeled
                                              # volumes; see cfrseg.sam.calibrate)
    calibration_cases: int = 8                # prior: unlabeled volumes the weights are fitted on (evenly spread)
    calibration_voxels: int = 200_000         # prior: voxels sampled per calibration volume
    calibration_min_labeled: int = 2          # prior: with fewer labeled volumes, keep the argmax (a prior from
                                              # one volume is unreliable: LA L=1 lost 0.05 Dice with it)
    resume: bool = False                      # reuse / continue what the store holds (same provenance only)
    precision: str = "fp32"                   # fp32 | bf16 | auto: bfloat16 autocast of the SAM forward pass
                                              # (auto: where native, cfrseg.stages.precision)
    device: str = "auto"

    def validate(self) -> None:
        require(isinstance(self.resume, bool), "pseudolabel.resume must be true or false")
        require(len(self.roles) > 0 and all(r in ROLES for r in self.roles),
                f"pseudolabel.roles must be a non-empty subset of {ROLES}, got {self.roles}")
        require(0 <= self.overlap < 1, f"pseudolabel.overlap must be in [0, 1), got {self.overlap}")
        require(self.tta_count >= 0, f"pseudolabel.tta_count must be >= 0, got {self.tta_count}")
        require(self.batch_size >= 1, f"pseudolabel.batch_size must be >= 1, got {self.batch_size}")
        require(self.calibration in CALIBRATIONS,
                f"pseudolabel.calibration must be one of {list(CALIBRATIONS)}, got {self.calibration!r}")
        require(self.calibration_cases >= 1, f"pseudolabel.calibration_cases must be >= 1, got {self.calibration_cases}")
        require(self.calibration_min_labeled >= 1,
                f"pseudolabel.calibration_min_labeled must be >= 1, got {self.calibration_min_labeled}")
        require(self.calibration_voxels >= 1000,
                f"pseudolabel.calibration_voxels must be >= 1000, got {self.calibration_voxels}")
        require(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"),
                f"pseudolabel.device must be auto, cpu or cuda[:N], got {self.device!r}")
        from cfrseg.stages.precision import PRECISIONS_AUTO

        require(self.precision in PRECISIONS_AUTO,
                f"pseudolabel.precision must be one of {list(PRECISIONS_AUTO)}, got {self.precision!r}")


@dataclass
class PseudolabelResult:
    store: Store
    labels: dict[str, str]                   # case_id -> key of the label file in the store
    paths: dict[str, str]                    # case_id -> local file path (LocalStore), for the manifest
    confidence: dict[str, str] = field(default_factory=dict)   # case_id -> key of the confidence map
    skipped: list[str] = field(default_factory=list)           # already present, not recomputed
    elapsed_s: float = 0.0
    calibration: dict[str, Any] | None = None                  # calibration.json (prior, weights, cases)

    @property
    def class_weights(self) -> list[float] | None:
        return None if self.calibration is None else self.calibration.get("weights")


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
    precision: str = "fp32",
    size: tuple[int, int, int] | None = None,
    window: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Class probabilities (K, X, Y, Z) float32 on ``device`` for a whole volume ``image`` (X, Y, Z) in its own
    grid (K x volume memory: the stage itself streams them with :func:`stream_volume`). ``precision`` ("fp32",
    "bf16", "auto"): the SAM forward pass under bfloat16 autocast (probabilities accumulated in float32).
    Windows of ``spec.crop`` cover the volume resampled to ``size`` (default: ``spec.zoom``). ``window``:
    fixed [0, 1] intensity window (CT) instead of per-volume percentiles."""
    full = FullSink(image.shape, num_classes, 2, device)
    stream_volume(sam, spec, image, num_classes, full, tta=tta, tta_count=tta_count, overlap=overlap,
                  batch_size=batch_size, device=device, cancel=cancel, precision=precision,
                  size=size, window=window)
    return full.probs


@torch.inference_mode()
def stream_volume(
    sam: torch.nn.Module,
    spec: MosaicSpec,
    image: np.ndarray,
    num_classes: int,
    sink: Sink,
    *,
    tta: bool = False,
    tta_count: int = 0,
    overlap: float = 0.25,
    batch_size: int = 2,
    device: torch.device | str = "cpu",
    cancel: CancelFlag | None = None,
    precision: str = "fp32",
    size: tuple[int, int, int] | None = None,
    window: tuple[float, float] | None = None,
) -> None:
    """The probabilities of a whole volume ``image`` (X, Y, Z), handed to ``sink(z0, planes (K, X, Y, n))`` in
    slice order, in the volume's own grid. Windows of ``spec.crop`` cover the zoomed volume (in patch mode
    overlapping along the slice axis too, :func:`depth_overlap`); overlapping predictions (in-plane overlap,
    shared slices between slice groups or patches, TTA orientations) are averaged;
    ``precision``, ``size``, ``window`` as for :func:`predict_volume`.

    Slice groups are processed in order, every orientation of a group before the next group (orientations act
    in-plane only), so each orientation keeps sums for about one group of slices (:class:`SweepAccumulator`)
    and finished slices are averaged over orientations, resampled to the source grid and passed on."""
    from cfrseg.stages.precision import autocast

    device = torch.device(device)
    pv = prepare_volume(image, None, spec, num_classes, device, size=size, window=window)
    layout = spec.layout()
    family = tta_family(spec, tta_count) if tta else [(0, False)]
    shape = tuple(pv.image.shape)
    back = SweepResampler(shape, image.shape, axis=2, sink=sink)
    accs, plans = [], []
    for o in family:
        oshape = (shape[1], shape[0], shape[2]) if o[0] % 2 else shape
        accs.append(SweepAccumulator(num_classes, oshape, axis=2, device=device, capacity=spec.crop[2]))
        plans.append(plan_windows(oshape, spec.crop, overlap, depth_overlap(spec, overlap)))
    zs = sorted({s[2] for s in plans[0]})
    for g, z in enumerate(zs):
        lo = max(z, 0)
        slab = pv.image[:, :, lo : z + spec.crop[2]]
        for o, acc, plan in zip(family, accs, plans):
            vol = orient(slab, o)
            starts = [s for s in plan if s[2] == z]
            for i in range(0, len(starts), batch_size):
                check_cancel(cancel, STAGE)
                chunk = starts[i : i + batch_size]
                wins = [crop_padded(vol, (s[0], s[1], s[2] - lo), spec.crop) for s in chunk]
                x = torch.stack([torch.where(ins, w, torch.zeros((), device=device)) for w, ins in wins])
                mosaic = concat.to_mosaic(x, layout)[:, None].expand(-1, 3, -1, -1)
                with autocast(device, precision):
                    logits = sam(mosaic)
                prob = torch.softmax(logits.float(), dim=1)                      # (B, K, S, S)
                for s, p in zip(chunk, concat.from_mosaic(prob, layout)):        # (K, cx, cy, cz)
                    acc.add(s, p)
        upto = zs[g + 1] if g + 1 < len(zs) else shape[2]
        rel = [acc.release(upto) for acc in accs]
        if rel[0] is not None:
            total = None
            for (_, sums, cnt), o in zip(rel, family):     # released planes are copies: divide in place
                sums /= cnt.clamp_min(1)
                total = unorient(sums, o) if total is None else total.add_(unorient(sums, o))
            total /= len(family)
            back.push(rel[0][0], total)
    back.finish()


def depth_overlap(spec: MosaicSpec, overlap: float) -> float:
    """Overlap of windows along the slice axis: ``overlap`` in patch mode (windows overlap in 3D), else 0
    (contiguous slice groups, the volume/fixed modes as before)."""
    return overlap if spec.mode == "patch" else 0.0


def predict_case(sam: torch.nn.Module, spec: MosaicSpec, plan: Plan, volume: Volume, num_classes: int,
                 **kw: Any) -> torch.Tensor:
    """Class probabilities (K, X, Y, Z) of ``volume`` in its SOURCE array order and grid (K x volume memory;
    the stage streams them with :func:`stream_case`). ``kw``: the options of :func:`stream_volume`."""
    dev = kw.get("device", "cpu")
    return stream_case(sam, spec, plan, volume, num_classes,
                       lambda ax: FullSink(volume.shape, num_classes, ax, dev), **kw).probs


def stream_case(sam: torch.nn.Module, spec: MosaicSpec, plan: Plan, volume: Volume, num_classes: int,
                make_sink: Callable[[int], Sink], **kw: Any) -> Any:
    """The probabilities of ``volume`` streamed to the sink ``make_sink(axis)`` builds (``axis``: the source
    axis the slice sweep runs along), in the SOURCE array order and grid: the plan's reorientation (exact,
    slice axis last), [0, 1] window and working grid at ``spec.spacing_factor``, then :func:`stream_volume`
    (``kw``: its options), planes brought back by the inverse reorientation. Returns the sink."""
    geo = plan.geometry(volume, spec.spacing_factor)
    arr = np.ascontiguousarray(geo.amap.apply(volume.array))
    sink = make_sink(geo.amap.perm[2])
    stream_volume(sam, spec, arr, num_classes, Unorient(geo.amap, arr.shape, 2, sink),
                  size=geo.working_shape, window=plan.unit_window(), **kw)
    return sink


def tta_family(spec: MosaicSpec, count: int = 0) -> list:
    """The TTA orientations: the whole fine-tune family (``count`` 0 or >= its size), else ``count`` of them
    evenly spread, identity first (for the 8-element family: 2 = identity + mirror, 4 = adds the half turns)."""
    fam = spec.orientations()
    if count <= 0 or count >= len(fam):
        return fam
    step = len(fam) / count
    return [fam[int(i * step)] for i in range(count)]


def probs_to_label(probs: torch.Tensor, class_weights: list[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(K, X, Y, Z) probabilities -> (uint8 argmax label, float32 confidence = max probability in [0, 1]); with
    ``class_weights`` both come from the reweighted, renormalised probabilities."""
    conf, lab = apply_class_weights(probs, class_weights).max(dim=0)
    return lab.to(torch.uint8).cpu().numpy(), conf.clamp(0, 1).float().cpu().numpy()


def _digest(store: Store) -> str:
    return hashlib.sha256(store.get_bytes(ARTIFACT)).hexdigest()


def _put_volume(store: Store, key: str, vol: Volume, label: bool) -> None:
    from cfrseg.data.io import write_volume

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
        from cfrseg.sam.lora import merge_lora

        merge_lora(sam)
    return sam, spec, art


def _predict(config: PseudolabelConfig, model: tuple, image: Volume, num_classes: int,
             device: torch.device, cancel: CancelFlag | None, make_sink: Callable[[int], Sink]) -> Sink:
    """Stream the probabilities of ``image`` (source grid) into the sink ``make_sink(axis)`` builds."""
    sam, spec, art = model
    return stream_case(sam, spec, load_plan(art), image, num_classes, make_sink, tta=config.tta,
                       tta_count=config.tta_count, overlap=config.overlap, batch_size=config.batch_size,
                       device=device, cancel=cancel, precision=config.precision)


def calibrate(config: PseudolabelConfig, data: Manifest, cases: list[Case], model: tuple, device: torch.device,
              progress: ProgressFn | None = None, cancel: CancelFlag | None = None) -> dict[str, Any]:
    """Fit the ``calibration = "prior"`` class weights: the prior is the pooled class fraction of the labeled
    cases' label maps; the probabilities are those of ``config.calibration_cases`` of ``cases`` (evenly spread,
    ``config.calibration_voxels`` voxels sampled from each). Returns the content of ``calibration.json``."""
    from cfrseg.data.datasets import load_case

    if not data.labeled:
        raise InputError(f"pseudolabel.calibration 'prior' needs labeled cases; manifest {data.name!r} has none")
    if not cases:
        raise InputError("pseudolabel.calibration 'prior': no case to calibrate on")
    prior = class_fractions([load_case(c, data, check_pseudo=False)[1].array for c in data.labeled],
                            data.num_classes)
    n = min(config.calibration_cases, len(cases))
    picks = [cases[int(i * len(cases) / n)] for i in range(n)]
    samples = []
    for i, case in enumerate(picks):
        check_cancel(cancel, STAGE)
        image, _ = load_case(case, data, check_pseudo=False)
        sample = _predict(config, model, image, data.num_classes, device, cancel,
                          lambda ax, shape=image.shape, seed=i: SampleSink(
                              shape, data.num_classes, ax, config.calibration_voxels, seed=seed))
        samples.append(sample.samples)   # voxels drawn uniformly with a fixed seed (cf. calibrate.subsample)
        emit(progress, ProgressEvent(STAGE, 0, len(cases), message=f"calibrating on {case.case_id} ({i + 1}/{n})"))
    pooled = torch.cat(samples)
    weights = fit_class_weights(pooled, prior)
    before = torch.bincount(pooled.argmax(1), minlength=data.num_classes).double() / pooled.shape[0]
    after = torch.bincount(apply_class_weights(pooled.T, weights).argmax(0), minlength=data.num_classes).double()
    out: dict[str, Any] = {
        "calibration": "prior", "cases": [c.case_id for c in picks], "prior": [float(v) for v in prior],
        "weights": weights, "fractions_argmax": [float(v) for v in before],
        "fractions_calibrated": [float(v) for v in after / pooled.shape[0]],
    }
    if data.num_classes == 2:
        out["threshold"] = 1.0 / (1.0 + weights[1])   # foreground where p1 > threshold
    return out


# ------------------------------------------------------------------------------------------------ the stage

def case_key(case_id: str) -> str:
    """The per-case record, written last: the case is finished when it exists with the stage's provenance."""
    return f"cases/{case_id}.json"


def _case_done(store: Store, case: Case, stage_digest: str, write_confidence: bool) -> bool:
    lk, ck, rk = label_key(case.case_id), confidence_key(case.case_id), case_key(case.case_id)
    if not (store.exists(lk) and store.exists(rk) and (store.exists(ck) or not write_confidence)):
        return False
    try:
        rec = get_json(store, rk)
    except ValueError:
        return False
    return rec.get("provenance") == stage_digest and rec.get("image_sha256") == file_sha256(case.image)


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

    Writes ``labels/<id>.nii.gz``, ``confidence/<id>.nii.gz`` and ``cases/<id>.json`` (written last: the case
    is done), ``config.json``, ``provenance.json`` (data, settings, code, plan, ``finetune.pt`` digests),
    ``source.json``, ``plan.json`` and ``summary.json`` (per-case time, foreground fraction, mean confidence).
    The volumes go through the plan stored in ``finetune.pt``; labels come back in each case's source
    geometry. A store holding an earlier run is continued only with ``config.resume`` and equal provenance;
    then finished cases (files and record present, same provenance and image sha256) are not redone.
    Raises NotFoundError (no finetune.pt), InputError, ConfigError (the store holds another run),
    Cancelled (finished cases stay)."""
    t0 = time.monotonic()
    cases = _cases(data, config.roles)
    digest_ft = _digest(finetuned) if finetuned.exists(ARTIFACT) else None
    if digest_ft is None:
        read_artifact(finetuned)   # raises the clear NotFoundError
    art = read_artifact(finetuned)
    plan = load_plan(art)
    fields = {k: v for k, v in config.to_dict().items() if k not in OPERATIONAL}
    prov = stage_provenance(STAGE, data, fields, plan=plan.digest(), inputs={"finetune_sha256": digest_ft or ""})
    guard(store, STAGE, prov, config.resume, (SOURCE, CALIBRATION, "labels/", "cases/"))
    stage_digest = digest({k: v for k, v in normalize(prov).items() if k not in ("cases", "config_fields")})
    put_json(store, SOURCE, {"finetune_sha256": digest_ft, "calibration": config.calibration})
    put_json(store, "config.json", config.to_dict())
    put_json(store, PLAN_KEY, plan.to_dict())

    device = resolve_device(config.device)
    labels, paths, conf_keys, skipped = {}, {}, {}, []
    model: tuple[torch.nn.Module, MosaicSpec, dict[str, Any]] | None = None
    calib: dict[str, Any] | None = None
    if config.calibration == "prior" and len(data.labeled) < config.calibration_min_labeled:
        calib = {"calibration": "none", "weights": None,
                 "reason": f"{len(data.labeled)} labeled volume(s) < calibration_min_labeled "
                           f"{config.calibration_min_labeled}: argmax labels"}
        put_json(store, CALIBRATION, calib)
    elif config.calibration == "prior":
        if store.exists(CALIBRATION):
            calib = get_json(store, CALIBRATION)
        else:
            model = _load_model(config, finetuned, data, device)
            calib = calibrate(config, data, cases, model, device, progress, cancel)
            put_json(store, CALIBRATION, calib)
    weights = None if calib is None else calib.get("weights")
    summary: dict[str, Any] = {}
    eta = Eta()
    eta(0, len(cases))
    for i, case in enumerate(cases):
        lk, ck = label_key(case.case_id), confidence_key(case.case_id)
        done = _case_done(store, case, stage_digest, config.write_confidence)
        if done:
            skipped.append(case.case_id)
            rec = get_json(store, case_key(case.case_id))
        else:
            check_cancel(cancel, STAGE)
            if model is None:
                model = _load_model(config, finetuned, data, device)
            from cfrseg.data.datasets import load_case

            tc = time.monotonic()
            image, _gt = load_case(case, data, check_pseudo=False)
            sink = _predict(config, model, image, data.num_classes, device, cancel,
                            lambda ax, shape=image.shape: ArgmaxSink(shape, data.num_classes, ax, confidence=True,
                                                                     class_weights=weights))
            lab, conf = sink.labels, sink.confidence
            if config.write_confidence:
                _put_volume(store, ck, image.with_array(conf), label=False)
            _put_volume(store, lk, image.with_array(lab), label=True)
            rec = {"provenance": stage_digest, "image_sha256": file_sha256(case.image),
                   "seconds": round(time.monotonic() - tc, 2), "foreground_fraction": float((lab > 0).mean()),
                   "mean_confidence": float(conf.mean())}
            put_json(store, case_key(case.case_id), rec)   # written last: marks the case done
        summary[case.case_id] = {k: rec.get(k) for k in ("seconds", "foreground_fraction", "mean_confidence")}
        labels[case.case_id] = lk
        if config.write_confidence:
            conf_keys[case.case_id] = ck
        lp = _local_path(store, lk)
        if lp is not None:
            paths[case.case_id] = lp
        emit(progress, ProgressEvent(STAGE, i + 1, len(cases), message=f"{case.case_id}"
                                     + (" (already done)" if done else ""), eta_s=eta(i + 1, len(cases))))
    put_json(store, "summary.json", summary)
    return PseudolabelResult(store, labels, paths, conf_keys, skipped, time.monotonic() - t0, calib)


def evaluate_sam(
    config: PseudolabelConfig,
    data: Manifest,
    finetuned: Store,
    *,
    case_ids: list[str] | None = None,
    class_weights: list[float] | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFlag | None = None,
) -> dict[str, Any]:
    """Dice/Jaccard/ASD/HD95 of the fine-tuned SAM alone (the paper's CFR_FT row) on labeled cases.

    Cases: ``case_ids`` if given, else those with a label whose role is in ``config.roles``. Runs exactly the
    pseudo-label path (:func:`predict_volume`, then ``class_weights`` as the pseudo-labels got them). Returns ``{"cases": {id: compute_case(...)}, "summary":
    summarize(...), "seconds": {id: s}}``."""
    from cfrseg.data.datasets import load_case
    from cfrseg.metrics import compute_case, summarize

    if case_ids is not None:
        cases = [data.case(c) for c in case_ids]
    else:
        cases = [c for c in _cases(data, config.roles) if c.label]
    if not cases:
        raise InputError(f"evaluate_sam: no labeled case to evaluate among roles {config.roles} of {data.name!r}")
    device = resolve_device(config.device)
    model = _load_model(config, finetuned, data, device)
    out: dict[str, Any] = {"cases": {}, "seconds": {}}
    for i, case in enumerate(cases):
        check_cancel(cancel, "evaluate")
        image, gt = load_case(case, data, check_pseudo=False)
        if gt is None:
            raise InputError(f"evaluate_sam: case {case.case_id!r} has no label")
        tc = time.monotonic()
        sink = _predict(config, model, image, data.num_classes, device, cancel,
                        lambda ax, shape=image.shape: ArgmaxSink(shape, data.num_classes, ax,
                                                                 class_weights=class_weights))
        lab = sink.labels
        out["seconds"][case.case_id] = round(time.monotonic() - tc, 2)
        out["cases"][case.case_id] = compute_case(lab, gt.array, image.spacing, data.num_classes)
        emit(progress, ProgressEvent("evaluate", i + 1, len(cases), message=case.case_id))
    out["summary"] = summarize(list(out["cases"].values()))
    return out
