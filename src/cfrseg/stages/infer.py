"""Inference for the 3D networks: batched sliding-window prediction, whole-volume segmentation with the
training preprocessing, optional largest-connected-component clean-up, and the ``model.pt`` artifact.

Compared with the reference ``test_single_case`` (reference-implementation.md sec. 5) the window grid is the
same (symmetric zero padding to the patch, starts ``min(stride * i, size - patch)``), but windows run in
batches under ``torch.inference_mode()`` and the softmax probabilities are accumulated on the compute device,
optionally with Gaussian importance weights instead of plain counts. Accumulation, resampling back to the source
grid and the argmax are streamed along x (:mod:`cfrseg.accumulate`): :func:`segment_volume` never holds a
K x volume float map, only a band of about one patch of x-planes.
"""

from __future__ import annotations

import copy
import io
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from cfrseg.accumulate import ArgmaxSink, FullSink, Sink, SweepAccumulator, SweepResampler, Unorient
from cfrseg.config import ConfigBase, require
from cfrseg.data.volume import Volume
from cfrseg.errors import ConfigError, InputError, NotFoundError
from cfrseg.models.registry import NETWORKS, build_network

Triple = tuple[int, int, int]
MODEL_FILE = "model.pt"
DEFAULT_PREPROCESS: dict[str, Any] = {"zoom": None, "normalize": "zscore", "plan": None,
                                      "spacing_factor": None}
NORMALIZE = ("zscore", "none", "plan")
PRECISIONS = ("fp32", "bf16", "auto")   # auto: bf16 where native (cfrseg.stages.precision.bf16_native)
_ARTIFACT_KEYS = (
    "network",
    "network_kwargs",
    "num_classes",
    "student",
    "teacher",
    "evaluate",
    "preprocess",
    "infer",
)


@dataclass(frozen=True)
class InferConfig(ConfigBase):
    """Sliding-window settings. Defaults = the reference LA test (patch 112x112x80, stride 18/18/4)."""

    patch: Triple = (112, 112, 80)
    stride: Triple = (18, 18, 4)
    batch_size: int = 4
    gaussian: bool = False
    largest_component: bool = False
    device: str = "auto"
    precision: str = "fp32"   # fp32 | bf16 | auto (bf16 where native: cfrseg.stages.precision). bf16 is 1.4-3x faster
                              # on AVX512-BF16/AMX CPUs, slower without them; with a trained lite model its labels
                              # agree with fp32 at Dice ~0.995, not 0.999, so fp32 stays the default (docs/results.md)

    def validate(self) -> None:
        for name in ("patch", "stride"):
            v = getattr(self, name)
            require(
                isinstance(v, tuple) and len(v) == 3 and all(isinstance(i, int) and i > 0 for i in v),
                f"infer.{name} must be three positive integers, got {v!r}",
            )
        require(
            all(s <= p for s, p in zip(self.stride, self.patch)),
            f"infer.stride {self.stride} must not exceed infer.patch {self.patch} (windows would leave gaps)",
        )
        require(isinstance(self.batch_size, int) and self.batch_size >= 1, "infer.batch_size must be >= 1")
        require(self.precision in PRECISIONS, f"infer.precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        require(
            isinstance(self.device, str) and bool(self.device),
            "infer.device must be 'auto', 'cpu', 'cuda'...",
        )


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None -> cuda if available else cpu; anything else as given."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"invalid device {device!r}: {e}") from None


# ----------------------------------------------------------------------------------------------- windows
def window_starts(size: int, patch: int, stride: int) -> list[int]:
    """Start indices along one axis of length ``size`` (>= patch), as the reference: ``ceil((size - patch) /
    stride) + 1`` windows starting at ``min(stride * i, size - patch)``; the last one touches the end."""
    n = math.ceil((size - patch) / stride) + 1
    return [min(stride * i, size - patch) for i in range(n)]


def window_grid(shape: Sequence[int], patch: Sequence[int], stride: Sequence[int]) -> list[Triple]:
    """All window corners (x, y, z) for a (padded) volume of ``shape``, x slowest, z fastest."""
    axes = [window_starts(s, p, st) for s, p, st in zip(shape, patch, stride)]
    return [(x, y, z) for x in axes[0] for y in axes[1] for z in axes[2]]


def pad_amounts(shape: Sequence[int], patch: Sequence[int]) -> list[tuple[int, int]]:
    """Symmetric zero padding (before, after) per axis that makes every axis at least the patch size."""
    out = []
    for s, p in zip(shape, patch):
        total = max(p - s, 0)
        out.append((total // 2, total - total // 2))
    return out


def gaussian_weights(patch: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """Importance map (X, Y, Z) of a window: a Gaussian centred in the patch, sigma = patch / 8 per axis,
    scaled to max 1, with no zero (values are clamped to the smallest positive one)."""
    axes = []
    for p in patch:
        c = (p - 1) / 2.0
        sigma = max(p * sigma_scale, 1e-6)
        t = torch.arange(p, dtype=torch.float64)
        axes.append(torch.exp(-0.5 * ((t - c) / sigma) ** 2))
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    w = w / w.max()
    w = torch.clamp(w, min=float(w[w > 0].min()))
    return w.float()


def _as_image(image: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image
    if not isinstance(t, torch.Tensor):
        raise InputError(
            f"sliding_window: image must be a torch.Tensor or numpy array, got {type(image).__name__}"
        )
    if t.dim() == 3:
        t = t[None]
    if t.dim() != 4:
        raise InputError(
            f"sliding_window: image must be (C, X, Y, Z) or (X, Y, Z), got shape {tuple(t.shape)}"
        )
    return t.float()


def _logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    out = model(batch)
    return out[0] if isinstance(out, (tuple, list)) else out


def sliding_window(
    model: nn.Module,
    image: torch.Tensor | np.ndarray,
    patch: Sequence[int],
    stride: Sequence[int],
    num_classes: int,
    batch_size: int = 4,
    gaussian: bool = False,
    device: str | torch.device | None = None,
    channels_last: bool | None = None,
    fold_bn: bool = True,
    precision: str = "fp32",
    sink: Sink | None = None,
) -> torch.Tensor | None:
    """Softmax probabilities (K, X, Y, Z) of ``model`` over a whole image (C, X, Y, Z) (or (X, Y, Z)).

    Axes smaller than the patch are zero-padded symmetrically and cropped back. Windows (see
    :func:`window_grid`) run ``batch_size`` at a time under ``torch.inference_mode()`` in eval mode (the
    model's train/eval mode is restored afterwards). Each window's softmax is added to an accumulator on the
    compute device with weight 1 (``gaussian=False``, the reference's plain average) or with
    :func:`gaussian_weights`; the sum is divided by the summed weights. ``device``: None = the model's device;
    otherwise the model is moved there. The result stays on the compute device. ``channels_last`` (default: on
    for CPU) runs a copy of the model in the channels-last-3D memory layout, which oneDNN's 3D convolutions run
    about 1.3-1.5x faster on CPU; the numbers agree with the default layout to float rounding (~1e-7).
    ``fold_bn`` (default on) folds BatchNorm into the preceding convolutions of networks that declare
    ``bn_foldable`` (:func:`cfrseg.models.fuse.fold_batchnorm`; same numbers to float rounding).
    ``precision="bf16"`` runs the network under bfloat16 autocast (accumulation stays float32); ``"auto"``
    does so only where bf16 is native (:func:`cfrseg.stages.precision.bf16_native`), else fp32.

    Memory: the sums are kept only for the x-planes a window may still touch (:class:`SweepAccumulator`, one
    patch of planes); finished planes are divided by their weights and go to ``sink(x0, planes (K, n, Y,
    Z))`` in x order, or, without a sink, into the returned (K, X, Y, Z) tensor (then the result itself is
    K x volume; the sink path, used by :func:`segment_volume`, returns None and never is).
    """
    if len(patch) != 3 or len(stride) != 3 or min(*patch, *stride) < 1:
        raise InputError(
            f"sliding_window: patch {tuple(patch)} and stride {tuple(stride)} must be 3 positive ints"
        )
    if any(s > p for s, p in zip(stride, patch)):
        raise InputError(
            f"sliding_window: stride {tuple(stride)} exceeds patch {tuple(patch)}; windows would leave gaps"
        )
    if batch_size < 1:
        raise InputError(f"sliding_window: batch_size must be >= 1, got {batch_size}")
    if precision not in PRECISIONS:
        raise InputError(f"sliding_window: precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if device is None:
        param = next(model.parameters(), None)
        dev = param.device if param is not None else torch.device("cpu")
    else:
        dev = resolve_device(device)
        model.to(dev)
    img = _as_image(image).to(dev)
    size = tuple(img.shape[1:])
    pads = pad_amounts(size, patch)
    if any(a or b for a, b in pads):
        flat = [v for a, b in reversed(pads) for v in (a, b)]  # F.pad wants the last axis first
        img = F.pad(img, flat, mode="constant", value=0.0)
    padded = tuple(img.shape[1:])
    px, py, pz = (int(p) for p in patch)
    corners = window_grid(padded, patch, stride)
    weight = gaussian_weights(patch).to(dev) if gaussian else None

    acc = SweepAccumulator(num_classes, padded, axis=0, device=dev, capacity=px)
    full = FullSink(size, num_classes, 0, dev) if sink is None else None
    consumer: Sink = sink if sink is not None else full  # type: ignore[assignment]
    (x0, _), (y0, _), (z0, _) = pads

    def flush(upto: int) -> None:
        rel = acc.release(upto)
        if rel is None:
            return
        lo, sums, norm = rel
        sums /= norm
        a, b = max(lo, x0), min(lo + sums.shape[1], x0 + size[0])   # crop the padding back off
        if b > a:
            consumer(a - x0, sums[:, a - lo : b - lo, y0 : y0 + size[1], z0 : z0 + size[2]])

    was_training = model.training
    model.eval()
    if channels_last is None:
        channels_last = dev.type == "cpu"
    net = model
    if fold_bn and getattr(model, "bn_foldable", False):
        from cfrseg.models.fuse import fold_batchnorm

        net, _ = fold_batchnorm(model)
    if channels_last:
        net = (copy.deepcopy(net) if net is model else net).to(memory_format=torch.channels_last_3d)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    try:
        from cfrseg.stages.precision import resolve_precision

        amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=resolve_precision(precision, dev) == "bf16")
        with torch.inference_mode(), amp:
            for i in range(0, len(corners), batch_size):
                chunk = corners[i : i + batch_size]
                batch = torch.stack([img[:, x : x + px, y : y + py, z : z + pz] for x, y, z in chunk])
                out = torch.softmax(_logits(net, batch.contiguous(memory_format=fmt)).float(), dim=1)
                if out.shape[1] != num_classes:
                    raise InputError(
                        f"sliding_window: model gives {out.shape[1]} classes, expected {num_classes}"
                    )
                for corner, p in zip(chunk, out):
                    flush(corner[0])   # windows come in x order: planes before this one's start are final
                    acc.add(corner, p, weight)
                flush(corners[i + batch_size][0] if i + batch_size < len(corners) else padded[0])
    finally:
        model.train(was_training)
    return None if full is None else full.probs


# ------------------------------------------------------------------------------------- whole volumes
def check_preprocess(preprocess: Mapping[str, Any] | None) -> dict[str, Any]:
    """The preprocessing dict with defaults filled in; ConfigError on unknown keys or values.

    ``normalize="plan"`` (every model.pt cfrseg writes): ``plan`` is a :class:`cfrseg.data.plan.Plan` dict
    and ``spacing_factor`` the working grid factor; the plan's normalisation, reorientation and resampling
    are replayed and the probabilities mapped back to the source grid. Otherwise (hand-made models, tests):
    ``zoom``: None or (fx, fy, fz) resampling factors (0.5 halves an axis) applied before the network;
    ``normalize``: ``"zscore"`` (per volume, as the reference test) or ``"none"``.
    """
    pre = dict(DEFAULT_PREPROCESS)
    if preprocess:
        unknown = sorted(set(preprocess) - set(DEFAULT_PREPROCESS))
        if unknown:
            raise ConfigError(f"preprocess: unknown key(s) {unknown}; known: {sorted(DEFAULT_PREPROCESS)}")
        pre.update(preprocess)
    zoom = pre["zoom"]
    if zoom is not None:
        if not (isinstance(zoom, (list, tuple)) and len(zoom) == 3 and all(float(f) > 0 for f in zoom)):
            raise ConfigError(f"preprocess.zoom must be None or three positive factors, got {zoom!r}")
        pre["zoom"] = tuple(float(f) for f in zoom)
    if pre["normalize"] not in NORMALIZE:
        raise ConfigError(f"preprocess.normalize must be one of {list(NORMALIZE)}, got {pre['normalize']!r}")
    if (pre["normalize"] == "plan") != (pre["plan"] is not None):
        raise ConfigError("preprocess: normalize 'plan' and a plan go together")
    if pre["plan"] is not None:
        from cfrseg.data.plan import Plan

        plan = pre["plan"] if isinstance(pre["plan"], Plan) else Plan.from_dict(dict(pre["plan"]))
        pre["plan"] = plan.to_dict()
        f = pre["spacing_factor"] or (1.0, 1.0, 1.0)
        if not (isinstance(f, (list, tuple)) and len(f) == 3 and all(float(v) > 0 for v in f)):
            raise ConfigError(f"preprocess.spacing_factor must be three positive factors, got {f!r}")
        pre["spacing_factor"] = tuple(float(v) for v in f)
        if pre["zoom"] is not None:
            raise ConfigError("preprocess: zoom and a plan cannot be combined (the plan sets the grid)")
    return pre


def zscore(array: np.ndarray) -> np.ndarray:
    """(array - mean) / std over the whole volume, float32 (std 0 -> only the mean is removed)."""
    a = array.astype(np.float32, copy=False)
    mean, std = float(a.mean()), float(a.std())
    return (a - mean) / (std if std > 0 else 1.0)


def zoomed_shape(shape: Sequence[int], zoom: Sequence[float] | None) -> Triple:
    """The shape after resampling by ``zoom`` factors: round(size * factor), at least 1."""
    if zoom is None:
        return tuple(int(s) for s in shape)  # type: ignore[return-value]
    return tuple(max(1, round(s * f)) for s, f in zip(shape, zoom))  # type: ignore[return-value]


def resize(t: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Trilinear resampling (align_corners=False) of a (C, X, Y, Z) tensor to (C, *size)."""
    if tuple(t.shape[1:]) == tuple(size):
        return t
    return F.interpolate(t[None].float(), size=tuple(size), mode="trilinear", align_corners=False)[0]


def predict_probabilities(
    model: nn.Module,
    volume: Volume,
    infer_cfg: InferConfig,
    preprocess: Mapping[str, Any] | None = None,
    num_classes: int | None = None,
) -> torch.Tensor:
    """Probabilities (K, X, Y, Z) in the source grid of ``volume``, on the compute device: normalise,
    reorient and resample as the model's plan says (or by ``zoom`` for plan-less models), sliding window,
    then the probabilities back (trilinear to the oriented source shape, exact inverse reorientation). (The
    result is K x volume float32; :func:`segment_volume` streams the same values into its argmax instead.)"""
    k = num_classes if num_classes is not None else _num_classes(model)
    dev = resolve_device(infer_cfg.device)
    sink = _stream_probabilities(model, volume, infer_cfg, preprocess, k,
                                 lambda axis: FullSink(volume.shape, k, axis, dev))
    return sink.probs


def _stream_probabilities(model: nn.Module, volume: Volume, infer_cfg: InferConfig,
                          preprocess: Mapping[str, Any] | None, num_classes: int | None,
                          make_sink: Callable[[int], Any]) -> Any:
    """The probabilities of :func:`predict_probabilities`, handed plane by plane to the sink that
    ``make_sink(axis)`` builds for the source axis the sweep runs along; returns that sink."""
    pre = check_preprocess(preprocess)
    if volume.array.ndim != 3:
        raise InputError(f"segment: expected a 3D volume (X, Y, Z), got shape {volume.array.shape}")
    k = num_classes if num_classes is not None else _num_classes(model)
    dev = resolve_device(infer_cfg.device)
    if pre["plan"] is not None:
        from cfrseg.data.plan import Plan, prepare_image

        img, geo = prepare_image(Plan.from_dict(pre["plan"]), volume, pre["spacing_factor"], device=dev)
        sink = make_sink(geo.amap.perm[0])
        back = SweepResampler(tuple(img.shape[1:]), geo.oriented_shape, axis=0,
                              sink=Unorient(geo.amap, geo.oriented_shape, 0, sink))
    else:
        arr = zscore(volume.array) if pre["normalize"] == "zscore" else volume.array.astype(np.float32)
        img = torch.from_numpy(np.ascontiguousarray(arr))[None].to(dev)
        img = resize(img, zoomed_shape(volume.shape, pre["zoom"]))
        sink = make_sink(0)
        back = SweepResampler(tuple(img.shape[1:]), volume.shape, axis=0, sink=sink)
    sliding_window(
        model, img, infer_cfg.patch, infer_cfg.stride, k, infer_cfg.batch_size, infer_cfg.gaussian, dev,
        precision=infer_cfg.precision, sink=back.push
    )
    back.finish()
    return sink


def segment_volume(
    model: nn.Module,
    volume: Volume,
    infer_cfg: InferConfig,
    preprocess: Mapping[str, Any] | None = None,
) -> Volume:
    """Label map (X, Y, Z; uint8, or uint16 for > 256 classes) of ``volume`` in its own geometry: argmax of
    :func:`predict_probabilities` (streamed plane by plane, never held whole), then per-class largest
    connected component if ``infer_cfg`` asks."""
    k = _num_classes(model)
    sink = _stream_probabilities(model, volume, infer_cfg, preprocess, k,
                                 lambda axis: ArgmaxSink(volume.shape, k, axis=axis))
    labels = sink.labels
    if infer_cfg.largest_component:
        labels = largest_component(labels, k)
    return volume.with_array(labels)


def largest_component(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """A copy of ``labels`` (X, Y, Z) where each foreground class keeps only its largest 6-connected component
    (``scipy.ndimage.label`` default structure); removed voxels become background (0)."""
    out = labels.copy()
    for c in range(1, num_classes):
        mask = labels == c
        comp, n = ndimage.label(mask)
        if n > 1:
            sizes = np.bincount(comp.ravel())
            sizes[0] = 0
            out[mask & (comp != int(sizes.argmax()))] = 0
    return out


def _num_classes(model: nn.Module) -> int:
    k = getattr(model, "num_classes", None)
    if not isinstance(k, int):
        raise InputError("segment: cannot tell the number of classes of this model (no .num_classes)")
    return k


# -------------------------------------------------------------------------------------------- artifact
def _state(m: nn.Module | Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    if m is None:
        return None
    sd = m.state_dict() if isinstance(m, nn.Module) else m
    return {k: v.detach().cpu().clone() for k, v in sd.items()}


def save_model(
    path: str | Path | BinaryIO,
    *,
    network: str,
    num_classes: int,
    student: nn.Module | Mapping[str, torch.Tensor],
    teacher: nn.Module | Mapping[str, torch.Tensor] | None = None,
    evaluate: str | None = None,
    network_kwargs: Mapping[str, Any] | None = None,
    preprocess: Mapping[str, Any] | None = None,
    infer: InferConfig | Mapping[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> None:
    """Write the re-training artifact ``model.pt`` (docs/design.md, "Artifacts") to a file path (atomically)
    or a binary file object. ``network_kwargs`` are the registry options (may include ``in_channels``,
    default 1); ``evaluate`` picks the weights :func:`load_model` uses (default: teacher if given);
    ``class_names``: num_classes names, background first (default ``background, class_1, ...``);
    ``provenance``: the training run's digests (:mod:`cfrseg.provenance`)."""
    if network not in NETWORKS:
        raise ConfigError(f"save_model: unknown network {network!r}; choose one of {sorted(NETWORKS)}")
    evaluate = evaluate or ("teacher" if teacher is not None else "student")
    if evaluate not in ("teacher", "student"):
        raise ConfigError(f"save_model: evaluate must be 'teacher' or 'student', got {evaluate!r}")
    if evaluate == "teacher" and teacher is None:
        raise ConfigError("save_model: evaluate='teacher' but no teacher weights were given")
    infer_d = (
        infer.to_dict()
        if isinstance(infer, InferConfig)
        else InferConfig.from_dict(dict(infer or {})).to_dict()
    )
    obj = {
        "network": network,
        "network_kwargs": dict(network_kwargs or {}),
        "num_classes": int(num_classes),
        "student": _state(student),
        "teacher": _state(teacher),
        "evaluate": evaluate,
        "preprocess": check_preprocess(preprocess),
        "infer": infer_d,
        "class_names": _class_names(class_names, int(num_classes)),
        "provenance": dict(provenance or {}),
    }
    if not isinstance(path, (str, Path)):
        torch.save(obj, path)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_model(
    source: str | Path | bytes, device: str | torch.device | None = "auto"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network of a ``model.pt`` (a folder holding it, the file itself, or its bytes) with its
    ``evaluate`` weights, on ``device``, in eval mode. Returns ``(model, meta)``; ``meta`` is the artifact
    without the weights (network, network_kwargs, num_classes, evaluate, preprocess, infer) plus ``source``,
    ``class_names`` (background first; defaults for files that have none) and ``provenance``.
    A missing file raises NotFoundError; an unreadable or inconsistent one InputError."""
    if isinstance(source, (bytes, bytearray)):
        name, fileobj = "<bytes>", io.BytesIO(source)
    else:
        p = Path(source)
        p = p / MODEL_FILE if p.is_dir() else p
        if not p.is_file():
            raise NotFoundError(f"model file not found: {p}")
        name, fileobj = str(p), None
    try:
        obj = torch.load(fileobj if fileobj is not None else name, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle/zip errors vary: report them all as a bad input file
        raise InputError(f"{name}: not a readable cfrseg model.pt ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or any(k not in obj for k in _ARTIFACT_KEYS):
        missing = [k for k in _ARTIFACT_KEYS if not isinstance(obj, dict) or k not in obj]
        raise InputError(f"{name}: not a cfrseg model.pt (missing {missing})")
    evaluate = obj["evaluate"]
    state = obj.get(evaluate) if evaluate in ("teacher", "student") else None
    if state is None:
        raise InputError(f"{name}: evaluate={evaluate!r} but those weights are not in the file")
    kwargs = dict(obj["network_kwargs"])
    in_channels = int(kwargs.pop("in_channels", 1))
    try:
        model = build_network(obj["network"], in_channels, int(obj["num_classes"]), **kwargs)
        model.load_state_dict(state)
    except (ConfigError, RuntimeError) as e:
        raise InputError(f"{name}: weights do not fit network {obj['network']!r} {kwargs}: {e}") from None
    model.to(resolve_device(device)).eval()
    meta = {k: obj[k] for k in _ARTIFACT_KEYS if k not in ("student", "teacher")}
    meta["source"] = name
    meta["class_names"] = _class_names(obj.get("class_names"), int(obj["num_classes"]))
    meta["provenance"] = obj.get("provenance") or {}
    return model, meta


def _class_names(names: Sequence[str] | None, num_classes: int) -> list[str]:
    """``names`` checked (num_classes distinct names, background first), or the defaults."""
    if not names:
        return ["background"] + [f"class_{k}" for k in range(1, num_classes)]
    out = [str(n) for n in names]
    if len(out) != num_classes or len(set(out)) != len(out):
        raise ConfigError(f"class_names must be {num_classes} distinct names (background first), got {out}")
    return out
