"""What a trained model segments: its classes (value, name, code), for ListModels, SEG segment descriptions and
the route checks at start-up.

Class names come from the run record (``model.class_names``, or the re-train stage's result), else from the
``class_names`` entry of ``model.pt`` (read once per model file and cached by its sha256), else ``class_1..``.
Codes come from ``class_codes`` in model.pt when present, else from :data:`cfrseg.dicom.codes.DEFAULT_TYPES`
by name ("" when unknown).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from typing import Any

from cfrseg.errors import ConfigError, NotFoundError

log = logging.getLogger("cfrseg.pacs.models")
_CACHE: dict[str, dict[str, Any]] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    num_classes: int                      # including background
    class_names: tuple[str, ...]          # foreground classes, value 1.. (len = num_classes - 1)
    class_codes: tuple[str, ...]          # "SCT:82471001:Left atrium" or "" per foreground class
    network: str = ""
    sha256: str = ""


def _from_artifact(store: Any, key: str, sha: str) -> dict[str, Any]:
    """``class_names``/``class_codes`` stored in model.pt (cached by sha256; {} when unreadable: a fake model)."""
    with _LOCK:
        if sha in _CACHE:
            return _CACHE[sha]
    out: dict[str, Any] = {}
    try:
        import io

        import torch

        obj = torch.load(io.BytesIO(store.get_bytes(key)), map_location="cpu", weights_only=True)
        if isinstance(obj, dict):
            out = {k: list(obj[k]) for k in ("class_names", "class_codes") if isinstance(obj.get(k), (list, tuple))}
    except Exception as e:  # noqa: BLE001  (no names in the file: defaults are used)
        log.debug("model %s: no class names in model.pt (%s)", key, type(e).__name__)
    with _LOCK:
        _CACHE[sha] = out
    return out


def model_info(store: Any, jobs: Any, model_id: str) -> ModelInfo:
    """The classes of ``model_id`` (NotFoundError when there is no trained model with that id)."""
    from cfrseg.dicom.codes import code_for

    rec = jobs.find(f"runs/{model_id}/record.json")
    key = f"runs/{model_id}/retrain/model.pt"
    if rec is None or not rec.get("model_id") or not store.exists(key):
        raise NotFoundError(f"no trained model {model_id!r}")
    m = rec.get("model") or {}
    result = ((rec.get("stages") or {}).get("retrain") or {}).get("result") or {}
    k = int(m.get("num_classes") or result.get("num_classes") or rec.get("num_classes") or 0)
    if k < 2:
        raise NotFoundError(f"model {model_id!r}: unknown number of classes")
    names = m.get("class_names") or result.get("class_names")
    codes = m.get("class_codes") or result.get("class_codes")
    sha = ""
    if not names or not codes:
        ref = getattr(store, "ref", None)   # S3Store knows the sha256; a LocalStore (tests) does not
        sha = ref(key).sha256 if ref is not None else hashlib.sha256(store.get_bytes(key)).hexdigest()
        art = _from_artifact(store, key, sha)
        names = names or art.get("class_names")
        codes = codes or art.get("class_codes")
    names = [str(n) for n in (names or [])]
    if len(names) == k:          # names given with the background first
        names = names[1:]
    if len(names) != k - 1:
        names = [f"class_{i}" for i in range(1, k)]
    codes = [str(c) for c in (codes or [])]
    if len(codes) == k:
        codes = codes[1:]
    if len(codes) != k - 1:
        codes = [code_for(n) for n in names]
    return ModelInfo(model_id, k, tuple(names), tuple(codes), str(m.get("network", "")), sha)


def resolve_segments(route: Any, info: ModelInfo) -> list[Any]:
    """The route's segments, checked against the model: "auto" builds one per class from the model's names
    and codes; a list must cover exactly the model's foreground values 1..K-1. ConfigError otherwise."""
    from cfrseg.dicom.codes import ANATOMICAL_STRUCTURE, CodeSpec, SegmentSpec, default_segments

    want = list(range(1, info.num_classes))
    if route.segments == "auto":
        segs = default_segments(list(info.class_names))
        out = []
        for s, code in zip(segs, info.class_codes):
            out.append(SegmentSpec(s.value, s.label, CodeSpec.parse(ANATOMICAL_STRUCTURE),
                                   CodeSpec.parse(code) if code else s.type, s.rgb))
        return out
    values = sorted(s.value for s in route.segments)
    if values != want:
        raise ConfigError(f"route {route.name!r}: its segments have values {values} but model "
                          f"{info.model_id!r} has {info.num_classes} classes (foreground values {want}, "
                          f"names {list(info.class_names)})")
    return list(route.segments)


def check_routes(config: Any, store: Any, jobs: Any) -> dict[str, dict[str, Any]]:
    """Check every route against the trained models (model exists, segments match its classes) and return
    each route resolved: ``{name: {"route": {...}, "segments": [...], "model": {...}}}``. ConfigError naming the
    route on the first problem."""
    out = {}
    for r in config.routes:
        try:
            out[r.name] = resolve_route(config, r.name, store, jobs)
        except NotFoundError as e:
            raise ConfigError(f"route {r.name!r}: {e} (train it first, or fix model_id)") from None
    return out


def resolve_route(config: Any, name: str, store: Any, jobs: Any) -> dict[str, Any]:
    """One route checked against its model now (ConfigError / NotFoundError when it does not fit)."""
    r = config.route(name)
    info = model_info(store, jobs, r.model_id)
    segs = resolve_segments(r, info)
    return {"route": r.to_dict(), "segments": [s.to_dict() for s in segs],
            "model": {"model_id": info.model_id, "num_classes": info.num_classes,
                      "class_names": list(info.class_names), "network": info.network, "sha256": info.sha256}}


def snapshot(config: Any, name: str, resolved: dict[str, Any]) -> dict[str, Any]:
    """A checked route as a job record keeps it (the worker needs nothing else): the route, its segments, the
    model, the destinations (no secrets: token files are read when sending), our AE title and the limits."""
    route = config.route(name)
    lim = config.limits
    return {**resolved["route"], "segments": resolved["segments"], "model": resolved["model"],
            "ae_title": config.ae_title,
            "destinations": {d: config.destinations[d].to_dict() for d in route.send_to},
            "limits": {"min_slices": lim.min_slices, "max_voxels": lim.max_voxels}}
