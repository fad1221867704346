"""Conversions between the JSON records the services keep and the cfrseg.v1 protobuf messages."""

from __future__ import annotations

from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from services.gen.cfrseg.v1 import common_pb2 as pb

TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")


def ts(t: float | None) -> Timestamp | None:
    if not t:
        return None
    out = Timestamp()
    out.FromNanoseconds(int(t * 1e9))
    return out


def stage_state(name: str) -> int:
    return pb.StageState.Value(f"STAGE_STATE_{name}") if name else pb.STAGE_STATE_UNSPECIFIED


def object_ref(d: dict[str, Any] | None) -> pb.ObjectRef:
    d = d or {}
    return pb.ObjectRef(key=d.get("key", ""), sha256=d.get("sha256", ""), size=int(d.get("size", 0)))


def error_info(d: dict[str, Any] | None) -> pb.ErrorInfo | None:
    if not d:
        return None
    return pb.ErrorInfo(code=d.get("code", ""), message=d.get("message", ""), error_id=d.get("error_id", ""),
                        stage=d.get("stage", ""))


def stage_job(rec: dict[str, Any]) -> pb.StageJob:
    job = pb.StageJob(
        run_id=rec["run_id"], stage=rec["stage"], state=stage_state(rec.get("state", "")),
        step=int(rec.get("step") or 0), total=int(rec.get("total") or 0), losses=rec.get("losses") or {},
        message=rec.get("message", ""), output_prefix=rec.get("output_prefix", ""),
        outputs=[object_ref(o) for o in rec.get("outputs", [])], error=error_info(rec.get("error")),
        attempt=int(rec.get("attempt") or 0), created=ts(rec.get("created")), started=ts(rec.get("started")),
        finished=ts(rec.get("finished")), result_json=rec.get("result_json", ""),
    )
    if rec.get("eta_s") is not None:
        job.eta_s = float(rec["eta_s"])
    return job


def progress_event(ev: dict[str, Any]) -> pb.ProgressEvent:
    out = pb.ProgressEvent(
        run_id=ev["run_id"], stage=ev["stage"], step=int(ev.get("step") or 0), total=int(ev.get("total") or 0),
        losses=ev.get("losses") or {}, message=ev.get("message", ""), state=stage_state(ev.get("state", "")),
        time=ts(ev.get("time")), seq=int(ev.get("seq") or 0),
    )
    if ev.get("eta_s") is not None:
        out.eta_s = float(ev["eta_s"])
    return out
