"""The Gateway's PACS API (docs/pacs.md): list, get and retry PACS jobs, pull a study from a PACS, and the
classes of a model for ListModels.

The PACS config (``CFRSEG_PACS_CONFIG``) is optional for the gateway: without it, listing and getting jobs
work and SegmentStudy answers FAILED_PRECONDITION. Routes are checked against their models at each pull (a
model trained after the gateway started is found).
"""

from __future__ import annotations

import logging
from typing import Any

import grpc

from cfrseg.errors import ConfigError, InputError, NotFoundError
from services.common import convert
from services.common.errors import ServiceError
from services.gen.cfrseg.v1 import pacs_pb2
from services.orchestrator.records import check_id
from services.pacs.jobs import FINAL, PacsJobs, job_id_for, new_record

log = logging.getLogger("cfrseg.gateway.pacs")
METHODS = ("get", "move", "wado")
TIMINGS = ("receive_s", "quiet_s", "upload_s", "retrieve_s", "load_s", "segment_s", "encode_s", "send_s", "total_s")


def job_state(name: str) -> int:
    return pacs_pb2.PacsJobState.Value(f"PACS_JOB_STATE_{name}")


def to_job(rec: dict[str, Any]) -> pacs_pb2.PacsJob:
    o = rec.get("origin") or {}
    if o.get("kind") == "pull":
        origin = f"pull ({o.get('method')}) from {o.get('source')}"
    else:
        origin = f"push from {o.get('calling_ae', '?')}@{o.get('peer', '?')} to {o.get('called_ae', '?')}"
    t = dict(rec.get("timings") or {})
    if t.get("last_received") and t.get("first_received"):
        t["receive_s"] = t["last_received"] - t["first_received"]
    seg, series, route = rec.get("seg") or {}, rec.get("series") or {}, rec.get("route") or {}
    return pacs_pb2.PacsJob(
        job_id=rec["job_id"], state=job_state(rec["state"]), reason=rec.get("reason", ""),
        detail=rec.get("detail", ""), route=route.get("name", ""), model_id=route.get("model_id", ""),
        study_uid=series.get("study_uid", ""), series_uid=series.get("series_uid", ""),
        num_instances=int(series.get("num_instances", 0)), origin=origin,
        seg_series_uid=seg.get("series_instance_uid", ""), seg_sop_uid=seg.get("sop_instance_uid", ""),
        seg_type=seg.get("seg_type", ""), seg_frames=int(seg.get("frames", 0)),
        sends=[pacs_pb2.PacsSend(destination=k, ok=bool(v.get("ok")), detail=v.get("how") or v.get("detail", ""),
                                 time=convert.ts(v.get("time"))) for k, v in sorted((rec.get("sends") or {}).items())],
        timings={k: float(t[k]) for k in TIMINGS if isinstance(t.get(k), (int, float))},
        previous_job_id=rec.get("previous_job_id", ""), created=convert.ts(rec.get("created")),
        updated=convert.ts(rec.get("updated")), finished=convert.ts(rec.get("finished")),
        attempts=int(rec.get("attempts", 0)))


class PacsApi:
    def __init__(self, store: Any, jobs: Any, config: Any | None, workdir: str = "/tmp/cfrseg-work",
                 enqueue: Any = None) -> None:
        self.store = store
        self.workdir = workdir
        self.jobstore = jobs
        self.config = config
        self.jobs = PacsJobs(store, jobs, enqueue)

    # ---- models ----
    def model_classes(self, model_id: str) -> list[pacs_pb2.ModelClass]:
        from services.pacs.models import model_info

        try:
            info = model_info(self.store, self.jobstore, model_id)
        except NotFoundError:
            return []
        return [pacs_pb2.ModelClass(value=i, name=n, code=c)
                for i, (n, c) in enumerate(zip(info.class_names, info.class_codes), start=1)]

    # ---- jobs ----
    def get(self, job_id: str) -> dict[str, Any]:
        return self.jobs.get(check_id(job_id, "PACS job id"))

    def list(self, req: pacs_pb2.ListPacsJobsRequest) -> list[dict[str, Any]]:
        recs = self.jobs.all()
        if req.state:
            name = pacs_pb2.PacsJobState.Name(req.state).removeprefix("PACS_JOB_STATE_")
            recs = [r for r in recs if r["state"] == name]
        for field, key in (("study_uid", "study_uid"), ("series_uid", "series_uid")):
            if getattr(req, field):
                recs = [r for r in recs if (r.get("series") or {}).get(key) == getattr(req, field)]
        if req.route:
            recs = [r for r in recs if (r.get("route") or {}).get("name") == req.route]
        return recs

    def retry(self, job_id: str, force: bool) -> dict[str, Any]:
        check_id(job_id, "PACS job id")
        with self.jobs.lock(job_id) as got:
            if not got:
                raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"PACS job {job_id!r} is busy; try again")
            rec = self.jobs.get(job_id)
            state = rec["state"]
            if state not in FINAL:
                raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"PACS job {job_id!r} is {state}: it is still running")
            if state != "FAILED" and not force:
                raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"PACS job {job_id!r} ended {state}; pass force to run it again")
            if not rec.get("route"):
                raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"PACS job {job_id!r} has no route ({rec.get('reason')}); nothing to run")
            has_sources = not rec.get("sources_deleted") and self.store.exists(f"pacs/jobs/{job_id}/source.tar")
            if not has_sources:
                if (rec.get("origin") or {}).get("kind") == "pull":
                    return self.jobs.restart(rec, "RECEIVING")
                rec["redo"] = True
                rec["detail"] = "the next delivery of this series runs it again (its sources were deleted)"
                self.jobs.put(rec)
                return rec
            resume = (rec.get("failed_state") or "QUEUED") if state == "FAILED" and not force else "QUEUED"
            if resume == "SENDING" and not self.store.exists(f"pacs/jobs/{job_id}/seg.dcm"):
                resume = "QUEUED"
            if force:
                rec["sends"] = {}
                rec.pop("seg_type_override", None)
            return self.jobs.restart(rec, resume)

    # ---- pull mode ----
    def segment_study(self, req: pacs_pb2.SegmentStudyRequest) -> pacs_pb2.SegmentStudyResponse:
        from services.pacs import dicomweb, dimse
        from services.pacs.audit import Audit
        from services.pacs.models import resolve_route, snapshot

        if self.config is None:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               "no PACS configured on the gateway (set CFRSEG_PACS_CONFIG)")
        cfg = self.config
        if req.source not in cfg.destinations:
            raise InputError(f"unknown source {req.source!r}; configured: {sorted(cfg.destinations)}")
        node = cfg.destinations[req.source]
        if not _uid_ok(req.study_uid) or (req.series_uid and not _uid_ok(req.series_uid)):
            raise InputError("study_uid (and series_uid) must be DICOM UIDs (digits and dots, <= 64)")
        method = req.method or ("get" if node.dimse else "wado")
        if method not in METHODS:
            raise InputError(f"method must be one of {list(METHODS)}, got {req.method!r}")
        if method == "wado" and not node.dicomweb_url:
            raise InputError(f"source {req.source!r} has no dicomweb_url: use method 'get' or 'move'")
        if method != "wado" and not node.dimse:
            raise InputError(f"source {req.source!r} is DICOMweb only: use method 'wado'")
        route = None
        if req.route:
            try:
                route = cfg.route(req.route)
            except ConfigError as e:
                raise InputError(str(e)) from None
        try:
            found = (dimse.find_series(node, cfg.ae_title, req.study_uid, req.series_uid) if method != "wado"
                     else dicomweb.find_series(node, req.study_uid, req.series_uid))
        except dimse.RemoteError as e:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"query of {req.source!r} failed: {e.detail}") from None
        Audit(self.store, "gateway", self.workdir).event("query", study_uid=req.study_uid, series_uid=req.series_uid,
                                                   destination=req.source, detail=f"{len(found)} series")
        if not found:
            raise NotFoundError(f"{req.source!r} has no series for study {req.study_uid}"
                                + (f" / series {req.series_uid}" if req.series_uid else ""))
        out = pacs_pb2.SegmentStudyResponse()
        for s in found:
            attrs = s["attrs"]
            if attrs.get("Modality") == "SEG" or attrs.get("Manufacturer", "").strip().lower() == "cfrseg" \
                    or any(c.startswith("1.2.840.10008.5.1.4.1.1.66") for c in s["sop_classes"]):
                out.skipped_series.append(f"{s['series_uid']}: own_output")
                continue
            r = route or cfg.match(cfg.ae_title, attrs)
            if r is None:
                out.skipped_series.append(f"{s['series_uid']}: no_route")
                continue
            try:
                snap = snapshot(cfg, r.name, resolve_route(cfg, r.name, self.store, self.jobstore))
            except (ConfigError, NotFoundError) as e:
                raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, f"route {r.name!r}: {e}") from None
            out.jobs.append(to_job(self._pull_job(s, snap, req, method, node)))
        return out

    def _pull_job(self, s: dict[str, Any], snap: dict[str, Any], req: Any, method: str, node: Any) -> dict[str, Any]:
        job_id = job_id_for(snap["name"], snap["model_id"], s["series_uid"], s["sop_uids"])
        with self.jobs.lock(job_id):
            old = self.jobs.find(job_id)
            if old is not None:
                return old
            origin = {"kind": "pull", "source": req.source, "method": method, "node": node.to_dict(),
                      "sop_classes": s["sop_classes"]}
            series = {"study_uid": req.study_uid, "series_uid": s["series_uid"], "num_instances": len(s["sop_uids"]),
                      "modality": s["attrs"].get("Modality", "")}
            rec = new_record(job_id, state="RECEIVING", origin=origin, series=series, route=snap)
            self.jobs.put(rec)
            self.jobs.index(s["series_uid"], job_id)
            self.jobs.enqueue(rec)
            log.info("pull job %s: series %s from %s (%s)", job_id, s["series_uid"], req.source, method)
            return rec


def _uid_ok(uid: str) -> bool:
    return bool(uid) and len(uid) <= 64 and all(c.isdigit() or c == "." for c in uid)
