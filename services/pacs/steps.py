"""One step of a PACS job (the Celery task :mod:`services.pacs.tasks` calls :func:`step`; no Celery here).

States: ``RECEIVING`` (pull: retrieve the series) -> ``QUEUED``/``CHECKING`` (pre-check the geometry, decode the
series, store it as NIfTI) -> ``SEGMENTING`` (RetrainService.Segment with the route's model: the Gateway's code
path, so ``CFRSEG_SEGMENT_IMPL`` fakes work) -> ``ENCODING`` (DICOM SEG, then the post-check of the written
bytes against the source) -> ``SENDING`` (C-STORE, one association per SEG, or STOW-RS + QIDO check) -> ``DONE``;
or ``IGNORED``/``REJECTED``/``FAILED`` with a reason code. Each step is short and idempotent: its results go to
the object store before the record moves on, so a redelivered step redoes at most its own work (a SEG re-sent
after a crash has the same SOP Instance UID: the PACS stores it once).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from services.pacs.jobs import FINAL, prefix, unpack

log = logging.getLogger("cfrseg.pacs.steps")
WAIT_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)
REJECT_CODES = ("irregular_geometry", "too_few_slices", "multiframe_unsupported", "mixed_series", "no_pixel_data",
                "oversized", "not_dicom", "own_output")


@dataclass
class PacsEnv:
    store: Any                       # S3Store at the bucket root
    jobs: Any                        # services.pacs.jobs.PacsJobs
    retrain: Any                     # RetrainService stub (Segment)
    audit: Any                       # services.pacs.audit.Audit
    workdir: Path                    # local cache of sources (per job)
    segment_timeout_s: float = 600.0
    wait_limit_s: float = 600.0      # retrain service or destination unreachable this long: FAILED
    move_wait_s: float = 120.0       # a C-MOVE done but the series not handed over by the node: FAILED
    max_backoff_s: float = 10.0      # below the Celery visibility timeout (docs/stack.md)
    clock: Any = field(default=time.time)


def _now(env: PacsEnv) -> float:
    return float(env.clock())


def _end(rec: dict[str, Any], env: PacsEnv, state: str, reason: str = "", detail: str = "") -> None:
    if state == "FAILED":
        rec["failed_state"] = rec["state"]
    rec.update(state=state, reason=reason, detail=detail, finished=_now(env))
    rec.pop("waiting_since", None)
    level = logging.INFO if state == "DONE" else logging.WARNING
    log.log(level, "job %s %s %s %s", rec["job_id"], state, reason, detail)


def _wait(rec: dict[str, Any], env: PacsEnv, reason: str, detail: str) -> float | None:
    """Something needed is unreachable: back off, or fail once it has lasted ``wait_limit_s``."""
    since = rec.setdefault("waiting_since", _now(env))
    n = int(rec.get("waits", 0))
    rec["waits"] = n + 1
    rec["detail"] = f"waiting: {detail}"
    if _now(env) - since > env.wait_limit_s:
        _end(rec, env, "FAILED", reason, f"{detail} (for more than {env.wait_limit_s:.0f} s)")
        return None
    return min(env.max_backoff_s, 0.5 * 2 ** min(n, 6))


def _ok(rec: dict[str, Any]) -> None:
    rec.pop("waiting_since", None)
    rec["waits"] = 0
    rec["detail"] = ""


def _mark(rec: dict[str, Any], name: str, t0: float, env: PacsEnv) -> None:
    t = rec.setdefault("timings", {})
    t[f"{name}_s"] = round(_now(env) - t0, 4)
    t[f"{name}_end"] = _now(env)


# ---------------------------------------------------------------------------------------------- sources


def local_dir(env: PacsEnv, job_id: str) -> Path:
    return env.workdir / "pacs-jobs" / job_id


def sources(rec: dict[str, Any], env: PacsEnv) -> list[Path]:
    """The job's instances as local files (downloaded and unpacked once per worker)."""
    d = local_dir(env, rec["job_id"]) / "src"
    done = d / ".complete"
    if not done.is_file():
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True, exist_ok=True)
        tar = d.parent / "source.tar"
        env.store.get_file(prefix(rec["job_id"]) + "source.tar", tar)
        unpack(tar, d)
        tar.unlink(missing_ok=True)
        done.touch()
    return sorted(d.glob("*.dcm"))


_PARSED: dict[str, tuple[list[Path], list[Any], Any]] = {}   # job id -> (files, metas, geometry), this process


def _checked(rec: dict[str, Any], env: PacsEnv) -> tuple[list[Path], list[Any], Any]:
    """The job's files, their metadata and checked geometry (parsed once per worker process and job)."""
    from cfrseg.dicom.series import check_series, read_metadata

    hit = _PARSED.get(rec["job_id"])
    if hit is not None and all(f.is_file() for f in hit[0]):
        return hit
    files = sources(rec, env)
    metas = read_metadata(files)
    lim = (rec.get("route") or {}).get("limits") or {}
    out = (files, metas, check_series(metas, min_slices=int(lim.get("min_slices", 8))))
    while len(_PARSED) >= 2:
        _PARSED.pop(next(iter(_PARSED)))
    _PARSED[rec["job_id"]] = out
    return out


# ---------------------------------------------------------------------------------------------- steps


def _check(rec: dict[str, Any], env: PacsEnv) -> float | None:
    from cfrseg.data.io import write_volume
    from cfrseg.dicom import DicomInputError
    from cfrseg.dicom.series import load_series, scan_series

    t0 = _now(env)
    rec["state"] = "CHECKING"
    rec.setdefault("timings", {})["start"] = rec["timings"].get("start") or t0
    try:
        files, metas, geom = _checked(rec, env)
        info = scan_series(metas, [f.stat().st_size for f in files])
        rec["series"].update(num_instances=info.num_instances, num_bytes=info.num_bytes, modality=info.modality,
                             transfer_syntaxes=list(info.transfer_syntaxes))
        if info.is_own_output:
            _end(rec, env, "IGNORED", "own_output", "a segmentation is never segmented again")
            return None
        lim = (rec.get("route") or {}).get("limits") or {}
        vol = load_series(files, geom, max_voxels=int(lim.get("max_voxels", 512 * 512 * 2000)))
    except DicomInputError as e:
        if e.code == "decode_error":
            ts = ",".join(rec["series"].get("transfer_syntaxes") or []) or "?"
            _end(rec, env, "FAILED", "decode_error", f"{e.detail} (TS={ts})")
        else:
            _end(rec, env, "REJECTED", e.code if e.code in REJECT_CODES else "irregular_geometry", e.detail)
        return None
    rec["geometry"] = {"shape": list(geom.shape), "spacing": list(geom.spacing), "origin": list(geom.origin)}
    with tempfile.TemporaryDirectory(dir=local_dir(env, rec["job_id"])) as d:
        p = write_volume(vol, Path(d) / "volume.nii")   # uncompressed: gzip costs ~1.5 s for 13 MB
        env.store.put_file(prefix(rec["job_id"]) + "volume.nii", p)
    rec["volume"] = env.store.ref(prefix(rec["job_id"]) + "volume.nii").__dict__
    rec["state"] = "SEGMENTING"
    _mark(rec, "load", t0, env)
    return 0.0


def _segment(rec: dict[str, Any], env: PacsEnv) -> float | None:
    from services.gen.cfrseg.v1 import common_pb2, retrain_pb2

    t0 = _now(env)
    model_id = rec["route"]["model_id"]
    try:
        resp = env.retrain.Segment(retrain_pb2.SegmentVolumeRequest(
            model_id=model_id, volume=common_pb2.ObjectRef(key=rec["volume"]["key"], sha256=rec["volume"]["sha256"])),
            timeout=env.segment_timeout_s)
    except grpc.RpcError as e:
        if e.code() in WAIT_CODES:
            return _wait(rec, env, "inference_unavailable", f"retrain service: {e.code().name} {e.details()}")
        if e.code() == grpc.StatusCode.NOT_FOUND:
            _end(rec, env, "FAILED", "inference_unavailable", f"model {model_id}: {e.details()}")
        else:
            _end(rec, env, "FAILED", "inference_failed", f"{e.code().name}: {e.details()}")
        return None
    _ok(rec)
    rec["label"] = {"key": resp.label.key, "sha256": resp.label.sha256}
    rec["state"] = "ENCODING"
    _mark(rec, "segment", t0, env)
    return 0.0


def _label_on_source(label: Any, geom: Any) -> Any:
    """The predicted label with the source's double-precision geometry when it lies on the source grid (NIfTI
    stores float32 geometry, too coarse for highdicom far from the scanner centre); else as it is (write_seg
    then maps it through highdicom's geometry matching, or refuses)."""
    import numpy as np

    src = geom.volume_of(np.zeros(geom.shape, np.uint8))
    if label.shape == src.shape and np.allclose(label.spacing, src.spacing, rtol=1e-4, atol=1e-4) \
            and np.allclose(label.origin, src.origin, atol=1e-2) and np.allclose(label.direction, src.direction,
                                                                                  atol=1e-4):
        return src.with_array(label.array)
    return label


def _encode(rec: dict[str, Any], env: PacsEnv) -> float | None:
    from cfrseg.data.io import read_volume
    from cfrseg.dicom import DicomInputError
    from cfrseg.dicom.codes import SegmentSpec
    from cfrseg.dicom.seg import AlgorithmInfo, check_seg, to_bytes, write_seg

    t0 = _now(env)
    route = rec["route"]
    _, metas, geom = _checked(rec, env)
    with tempfile.TemporaryDirectory(dir=local_dir(env, rec["job_id"])) as d:
        p = Path(d) / "label.nii.gz"
        env.store.get_file(rec["label"]["key"], p)
        label = _label_on_source(read_volume(p), geom)
    segments = [SegmentSpec.from_dict(s) for s in route["segments"]]
    seg_type = rec.get("seg_type_override") or route["seg_type"]
    model = route.get("model") or {}
    algo = AlgorithmInfo(name="cfrseg", version=route["model_id"], network=model.get("network", ""),
                         model_sha256=model.get("sha256", ""))
    try:
        ds = write_seg(metas, geom, label, segments, algo, seg_type=seg_type, series_number=route["series_number"],
                       series_description=route["series_description"],
                       omit_empty_frames=bool(route.get("omit_empty_frames", True)))
        data = to_bytes(ds)
        summary = check_seg(data, metas, geom, label.array, segments)
    except DicomInputError as e:
        _end(rec, env, "FAILED", e.code if e.code.startswith("seg_") else "seg_encode_failed", e.detail)
        return None
    env.store.put_bytes(prefix(rec["job_id"]) + "seg.dcm", data)
    rec["seg"] = {**summary, "bytes": len(data), "sop_class_uid": str(ds.SOPClassUID)}
    env.audit.event("seg_created", study_uid=rec["series"]["study_uid"], series_uid=rec["series"]["series_uid"],
                    seg_series_uid=summary["series_instance_uid"], seg_sop_uid=summary["sop_instance_uid"],
                    patient_id=str(metas[0].get("PatientID", "")), route=route["name"], model_id=route["model_id"],
                    job_id=rec["job_id"], detail=f"{seg_type} SEG, {summary['frames']} frames")
    rec["state"] = "SENDING"
    _mark(rec, "encode", t0, env)
    return 0.0


def _send(rec: dict[str, Any], env: PacsEnv) -> float | None:
    from services.pacs import dicomweb, dimse
    from services.pacs.config import Node

    t0 = _now(env)
    route = rec["route"]
    seg_path = local_dir(env, rec["job_id"]) / "seg.dcm"
    env.store.get_file(prefix(rec["job_id"]) + "seg.dcm", seg_path)
    sends = rec.setdefault("sends", {})
    for name, nd in route["destinations"].items():
        if sends.get(name, {}).get("ok"):
            continue
        node = Node(**nd)
        try:
            if node.dimse:
                status = dimse.store(node, route["ae_title"], seg_path, rec["seg"]["sop_class_uid"])
                how = f"C-STORE 0x{status:04X}"
            else:
                dicomweb.stow(node, seg_path.read_bytes(), rec["series"]["study_uid"], rec["seg"]["sop_instance_uid"])
                how = "STOW-RS"
        except dimse.RemoteError as e:
            if e.code == "destination_unreachable":
                return _wait(rec, env, "destination_unreachable", e.detail)
            fallback = route.get("fallback_seg_type") or ""
            if fallback and fallback != (rec.get("seg_type_override") or route["seg_type"]):
                rec["seg_type_override"] = fallback
                rec["state"] = "ENCODING"
                rec["detail"] = f"{name} refused the {rec['seg']['seg_type']} SEG ({e.detail}); re-encoding as {fallback}"
                log.warning("job %s: %s", rec["job_id"], rec["detail"])
                return 0.0
            sends[name] = {"ok": False, "detail": e.detail, "time": _now(env)}
            _end(rec, env, "FAILED", "destination_rejected", e.detail)
            return None
        _ok(rec)
        sends[name] = {"ok": True, "how": how, "time": _now(env)}
        env.audit.event("instances_sent", study_uid=rec["series"]["study_uid"],
                        seg_sop_uid=rec["seg"]["sop_instance_uid"], destination=name,
                        called_ae=nd.get("ae_title", ""), peer=nd.get("host") or nd.get("dicomweb_url", ""),
                        job_id=rec["job_id"], route=route["name"], detail=how)
    _mark(rec, "send", t0, env)
    _end(rec, env, "DONE")
    t = rec["timings"]
    if t.get("last_received"):
        t["total_s"] = round(rec["finished"] - t["last_received"], 4)
    cleanup(rec, env)
    return None


def _retrieve(rec: dict[str, Any], env: PacsEnv) -> float | None:
    """Pull mode: fetch the series from the source into the job's sources (C-GET, WADO-RS), or ask the source
    to C-MOVE it to our node (which then hands it over: the job stays RECEIVING until then)."""
    from services.pacs import dicomweb, dimse
    from services.pacs.config import Node
    from services.pacs.jobs import pack

    o = rec["origin"]
    node = Node(**o["node"])
    study, series = rec["series"]["study_uid"], rec["series"]["series_uid"]
    t0 = _now(env)
    if o["method"] == "move":
        if o.get("moved_at"):
            if _now(env) - o["moved_at"] > env.move_wait_s:
                _end(rec, env, "FAILED", "retrieve_failed", f"C-MOVE reported {o.get('moved')} instance(s) moved "
                     f"but the node did not receive the series within {env.move_wait_s:.0f} s")
                return None
            return 2.0
        try:
            n = dimse.move_series(node, rec["route"]["ae_title"], rec["route"]["ae_title"], study, series)
        except dimse.RemoteError as e:
            if e.code == "destination_unreachable":
                return _wait(rec, env, "retrieve_failed", e.detail)
            _end(rec, env, "FAILED", "retrieve_failed", e.detail)
            return None
        o["moved"], o["moved_at"] = n, _now(env)
        env.audit.event("retrieve", study_uid=study, series_uid=series, job_id=rec["job_id"],
                        detail=f"C-MOVE from {node.name}: {n} instance(s)")
        _mark(rec, "retrieve", t0, env)
        return 2.0
    d = local_dir(env, rec["job_id"]) / "pulled"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    count = [0]

    def on_file(data: bytes, _sop: str) -> None:
        count[0] += 1
        (d / f"{count[0]:06d}.dcm").write_bytes(data)

    try:
        if o["method"] == "get":
            dimse.get_series(node, rec["route"]["ae_title"], study, series, o.get("sop_classes") or [], on_file)
        else:
            dicomweb.retrieve_series(node, study, series, on_file)
    except dimse.RemoteError as e:
        if e.code == "destination_unreachable":
            return _wait(rec, env, "retrieve_failed", e.detail)
        _end(rec, env, "FAILED", "retrieve_failed", e.detail)
        return None
    if not count[0]:
        _end(rec, env, "FAILED", "retrieve_failed", f"{o['method']} from {node.name} returned no instance")
        return None
    tar = d.parent / "pulled.tar"
    pack(sorted(d.glob("*.dcm")), tar)
    env.jobs.put_sources(rec["job_id"], tar)
    shutil.rmtree(d, ignore_errors=True)
    tar.unlink(missing_ok=True)
    env.audit.event("retrieve", study_uid=study, series_uid=series, job_id=rec["job_id"],
                    detail=f"{o['method']} from {node.name}: {count[0]} instance(s)")
    rec["series"]["num_instances"] = count[0]
    _ok(rec)
    rec["state"] = "QUEUED"
    _mark(rec, "retrieve", t0, env)
    rec["timings"]["last_received"] = _now(env)
    return 0.0


def cleanup(rec: dict[str, Any], env: PacsEnv, objects: bool = True) -> None:
    """Delete the local cache and (``objects``) the job's patient data in the object store."""
    _PARSED.pop(rec["job_id"], None)
    shutil.rmtree(local_dir(env, rec["job_id"]), ignore_errors=True)
    if objects:
        env.jobs.delete_objects(rec["job_id"])
        rec["sources_deleted"] = True


STEPS = {"RECEIVING": _retrieve, "QUEUED": _check, "CHECKING": _check, "SEGMENTING": _segment,
         "ENCODING": _encode, "SENDING": _send}


def step(rec: dict[str, Any], env: PacsEnv) -> float | None:
    """Advance ``rec`` (mutated) by one step; returns the delay before the next step, or None when final."""
    if rec["state"] in FINAL:
        return None
    local_dir(env, rec["job_id"]).mkdir(parents=True, exist_ok=True)
    delay = STEPS[rec["state"]](rec, env)
    if rec["state"] in FINAL:
        cleanup(rec, env, objects=rec["state"] == "DONE")
        return None
    return delay
