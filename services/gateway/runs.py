"""Runs: submission (validation, per-stage configs, the run's manifest), cancel, listing, and conversion of run
records (:mod:`services.orchestrator.records`) to API messages."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import grpc

from cfrseg.config import PROFILES, load_profile
from cfrseg.errors import InputError, NotFoundError
from services.common import convert
from services.common.errors import ServiceError
from services.common.jobstore import JobStore
from services.common.s3store import S3Store
from services.gateway.datasets import Datasets, request_hash, request_key
from services.gateway.overrides import check_overrides
from services.gen.cfrseg.v1 import common_pb2, gateway_pb2
from services.orchestrator.records import (
    FINAL_STATES,
    STAGES,
    Record,
    check_id,
    new_id,
    new_run_record,
    run_key,
    run_lock,
)

SECTIONS = ("data", "finetune", "pseudolabel", "retrain", "infer", "pipeline")
SSL_METHODS = ("none", "mt", "st", "uamt", "acmt", "magicnet")  # = cfrseg.ssl.methods.METHODS (tested)
DEFAULT_PAGE = 50


# ---------------------------------------------------------------------------------------------- configs


def resolve_configs(profile: str, ssl_method: str, overrides_json: str) -> dict[str, dict[str, Any]]:
    """Per-stage config sections of a run: the named profile, the overrides, the SSL method; validated by the
    core's config classes (ConfigError -> INVALID_ARGUMENT)."""
    if profile not in PROFILES:
        raise InputError(f"unknown profile {profile!r}; choose one of {list(PROFILES)}")
    if ssl_method not in SSL_METHODS:
        raise InputError(f"unknown SSL method {ssl_method!r}; choose one of {list(SSL_METHODS)}")
    prof = load_profile(profile)
    if overrides_json:
        try:
            over = json.loads(overrides_json)
        except json.JSONDecodeError as e:
            raise InputError(f"config_overrides_json is not valid JSON: {e}") from None
        if not isinstance(over, dict) or not all(isinstance(v, dict) for v in over.values()):
            raise InputError('config_overrides_json must be an object of sections, e.g. {"retrain": {...}}')
        unknown = sorted(set(over) - set(SECTIONS))
        if unknown:
            raise InputError(f"config_overrides_json: unknown section(s) {unknown}; known: {list(SECTIONS)}")
        check_overrides(over)  # allow-list with bounds: no file paths, no device, bounded sizes
        for sec, vals in over.items():
            prof[sec] = {**prof.get(sec, {}), **vals}
    try:
        from cfrseg.stages.pipeline import PipelineConfig
    except ImportError:  # the pipeline module is optional for the services: validate section by section
        return _sections(prof, ssl_method)
    cfg = PipelineConfig.from_profile(prof, ssl=ssl_method)
    return {s: getattr(cfg, s).to_dict() for s in ("finetune", "pseudolabel", "retrain", "infer")
            if getattr(cfg, s, None) is not None}


def _sections(prof: dict[str, dict[str, Any]], ssl_method: str) -> dict[str, dict[str, Any]]:
    import importlib

    out = {s: dict(prof.get(s, {})) for s in ("finetune", "pseudolabel", "retrain", "infer")}
    out["retrain"]["ssl"] = ssl_method
    for stage, cls in (("finetune", "FinetuneConfig"), ("pseudolabel", "PseudolabelConfig"),
                       ("retrain", "RetrainConfig")):
        try:
            mod = importlib.import_module(f"cfrseg.{stage}")
        except ImportError:
            continue
        out[stage] = getattr(mod, cls).from_dict(out[stage]).to_dict()
    return out


# ---------------------------------------------------------------------------------------------- conversion


def _finite(d: dict[str, Any] | None) -> dict[str, float]:
    return {k: float(v) for k, v in (d or {}).items() if isinstance(v, (int, float)) and math.isfinite(v)}


def run_state(name: str) -> int:
    return common_pb2.RunState.Value(f"RUN_STATE_{name}")


def to_run(rec: Record) -> gateway_pb2.Run:
    stages = []
    for s in STAGES:
        st = rec["stages"][s]
        m = gateway_pb2.StageStatus(stage=s, state=convert.stage_state(st["state"]), step=int(st["step"]),
                                    total=int(st["total"]), losses=_finite(st.get("losses")),
                                    started=convert.ts(st.get("started")), finished=convert.ts(st.get("finished")),
                                    attempt=int(st.get("attempt") or 0))
        if st.get("eta_s") is not None:
            m.eta_s = float(st["eta_s"])
        stages.append(m)
    return gateway_pb2.Run(
        run_id=rec["run_id"], name=rec.get("name", ""), dataset_id=rec["dataset_id"], profile=rec["profile"],
        ssl_method=rec["ssl_method"], state=run_state(rec["state"]), stage=rec.get("stage", ""), stages=stages,
        metrics=_finite(rec.get("metrics")), error=convert.error_info(rec.get("error")),
        model_id=rec.get("model_id", ""), created=convert.ts(rec.get("created")),
        started=convert.ts(rec.get("started")), finished=convert.ts(rec.get("finished")),
        labeled_case_ids=rec.get("labeled_case_ids", []), unlabeled_case_ids=rec.get("unlabeled_case_ids", []))


def to_event(rec: Record, stage: str = "") -> gateway_pb2.RunEvent:
    """The run's state with the progress of ``stage`` (default: the current stage)."""
    stage = stage or rec.get("stage") or STAGES[0]
    st = rec["stages"].get(stage, {})
    prog = common_pb2.ProgressEvent(
        run_id=rec["run_id"], stage=stage, step=int(st.get("step", 0)), total=int(st.get("total", 0)),
        losses=_finite(st.get("losses")), message=st.get("message", ""),
        state=convert.stage_state(st.get("state", "")), time=convert.ts(rec.get("updated")),
        seq=int(rec.get("seq", 0)))
    if st.get("eta_s") is not None:
        prog.eta_s = float(st["eta_s"])
    return gateway_pb2.RunEvent(run_id=rec["run_id"], state=run_state(rec["state"]), progress=prog,
                                error=convert.error_info(rec.get("error")), time=convert.ts(time.time()))


def to_model(rec: Record) -> gateway_pb2.Model:
    m = rec.get("model") or {}
    return gateway_pb2.Model(
        model_id=rec["model_id"], run_id=rec["run_id"], dataset_id=rec["dataset_id"],
        network=str(m.get("network", "")), num_classes=int(m.get("num_classes") or rec.get("num_classes", 0)),
        ssl_method=rec["ssl_method"], metrics=_finite(rec.get("metrics")),
        artifact=common_pb2.ObjectRef(key=m.get("key", f"runs/{rec['run_id']}/retrain/model.pt")),
        created=convert.ts(rec["stages"]["retrain"].get("finished") or rec.get("finished")))


def page(items: list, page_size: int, token: str) -> tuple[list, str]:
    size = page_size if page_size > 0 else DEFAULT_PAGE
    if size > 1000:
        raise InputError(f"page_size must be <= 1000, got {page_size}")
    try:
        start = int(token) if token else 0
    except ValueError:
        raise InputError(f"invalid page_token {token!r}") from None
    if start < 0:
        raise InputError(f"invalid page_token {token!r}")
    chunk = items[start:start + size]
    return chunk, (str(start + size) if start + size < len(items) else "")


# ---------------------------------------------------------------------------------------------- runs


class Runs:
    def __init__(self, store: S3Store, jobs: JobStore, datasets: Datasets,
                 enqueue: Callable[[str, str, float], None], default_profile: str = "lite") -> None:
        if default_profile not in PROFILES:
            raise InputError(f"CFRSEG_DEFAULT_PROFILE={default_profile!r}: choose one of {list(PROFILES)}")
        self.store = store
        self.jobs = jobs
        self.datasets = datasets
        self.enqueue = enqueue
        self.default_profile = default_profile  # a run without a profile gets it (tiny only when asked for)

    def get(self, run_id: str) -> Record:
        try:
            return self.jobs.get(run_key(run_id))
        except NotFoundError:
            raise NotFoundError(f"no run {run_id!r}") from None

    def all(self) -> list[Record]:
        ids = [k.split("/")[1] for k in self.jobs.keys("runs/", "/record.json") if k.count("/") == 2]
        recs = [r for r in (self.jobs.find(run_key(i)) for i in ids) if r is not None]
        return sorted(recs, key=lambda r: (r.get("created", 0), r["run_id"]), reverse=True)

    def submit(self, req: gateway_pb2.SubmitRunRequest) -> Record:
        if req.request_id:
            key = request_key("runs", req.request_id)
            with self.jobs.lock(key):
                seen = self.jobs.find(key)
                if seen is not None:
                    if seen["hash"] != request_hash(req):
                        raise ServiceError(grpc.StatusCode.ALREADY_EXISTS,
                                           f"request_id {req.request_id!r} was already used for a different run "
                                           f"({seen['run_id']}); use a new request_id")
                    return self.get(seen["run_id"])
                rec = self._submit(req)
                self.jobs.put(key, {"run_id": rec["run_id"], "hash": request_hash(req)})
        else:
            rec = self._submit(req)
        self.enqueue(rec["run_id"], rec["token"], 0.0)
        return rec

    def _submit(self, req: gateway_pb2.SubmitRunRequest) -> Record:
        ds = self.datasets.get(req.dataset_id)
        manifest = self.datasets.manifest(req.dataset_id)
        if len(req.name) > 128:
            raise InputError("run name must be at most 128 characters")
        profile = req.profile or self.default_profile
        ssl_method = req.ssl_method or "mt"
        configs = resolve_configs(profile, ssl_method, req.config_overrides_json)
        labeled = _select(req.labeled_case_ids, [c.case_id for c in manifest.labeled], "labeled", manifest)
        unlabeled = _select(req.unlabeled_case_ids, [c.case_id for c in manifest.unlabeled], "unlabeled",
                            manifest, allow=[c.case_id for c in manifest.labeled])
        both = sorted(set(labeled) & set(unlabeled))
        if both:
            raise InputError(f"case(s) {both} are both in labeled_case_ids and unlabeled_case_ids")
        if not labeled:
            raise InputError(f"dataset {ds.dataset_id!r}: the run needs at least one labeled case")
        test = [c.case_id for c in manifest.test]
        roles = {**{i: "labeled" for i in labeled}, **{i: "unlabeled" for i in unlabeled},
                 **{i: "test" for i in test}}
        cases = tuple(replace(c, role=roles[c.case_id]) for c in manifest.cases  # type: ignore[arg-type]
                      if c.case_id in roles)
        run_id = new_id("run")
        mkey = f"runs/{run_id}/manifest.json"
        self.store.put_bytes(mkey, replace(manifest, cases=cases).to_json().encode())
        rec = new_run_record(run_id=run_id, name=req.name, dataset_id=ds.dataset_id, profile=profile,
                             ssl_method=ssl_method, labeled=labeled, unlabeled=unlabeled, test=test,
                             configs=configs, manifest_key=mkey, request_id=req.request_id,
                             request_hash=request_hash(req))
        rec["num_classes"] = manifest.num_classes
        self.jobs.put(run_key(run_id), rec)
        return rec

    def cancel(self, run_id: str) -> Record:
        check_id(run_id, "run id")
        with run_lock(self.jobs.redis, run_id) as got:
            if not got:
                raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"run {run_id!r} is busy; try again")
            rec = self.get(run_id)
            if rec["state"] in ("CANCELLED", "CANCELLING"):
                return rec
            if rec["state"] in FINAL_STATES:
                raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"run {run_id!r} already finished ({rec['state']}); there is nothing to cancel")
            rec["cancel_requested"] = True
            rec["state"] = "CANCELLING"
            rec["seq"] = int(rec.get("seq", 0)) + 1
            rec["updated"] = time.time()
            self.jobs.put(run_key(run_id), rec)
            return rec


def _select(given: Any, available: list[str], what: str, manifest, allow: list[str] = ()) -> list[str]:
    if not given:
        return list(available)
    ids = list(given)
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise InputError(f"{what}_case_ids lists {dup} more than once")
    known = {c.case_id for c in manifest.cases}
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise InputError(f"{what}_case_ids: no case(s) {unknown} in dataset {manifest.name!r}")
    wrong = [i for i in ids if i not in available and i not in allow]
    if wrong:
        raise InputError(f"{what}_case_ids: case(s) {wrong} cannot be {what} (check their role in the dataset)")
    return ids
