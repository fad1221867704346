"""One step of a run: the pure decision logic the Celery task calls (no Celery here, so it is testable alone).

A step reads the run record, starts or polls the current stage (``Start`` is idempotent per run and stage, so
"start" and "poll" are the same call, and a stage service restarted after a crash resumes the job from its
checkpoint when asked), records what it saw, and returns how long to wait before the next step (``None`` once
the run is final). A step never waits for a stage: the stage services hold the long work. Stages already
SUCCEEDED in the record are never started again, so a redelivered or repeated step continues from where the
run is.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from services.gen.cfrseg.v1 import common_pb2, retrain_pb2
from services.orchestrator.records import FINAL_STATES, SERVICE_STAGES, STAGES, Record

log = logging.getLogger("cfrseg.orchestrator")

STAGE_STATE = {v: k.removeprefix("STAGE_STATE_") for k, v in common_pb2.StageState.items()}
WAIT_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
RETRYABLE_FAILURES = ("INTERNAL", "UNKNOWN", "UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "CANCELLED")
#: a stage job that failed on an unreachable dependency (S3, Redis): resumed without using up max_stage_retries
TRANSIENT_FAILURES = ("UNAVAILABLE", "DEADLINE_EXCEEDED")


@dataclass
class Env:
    """What a step needs: the object store (root), stubs of the stage services and the timing policy."""

    store: Any                                   # cfrseg.store.Store at the bucket root (S3Store in services)
    stubs: Mapping[str, Any]                     # stage name -> gRPC stub (Start/Get/Cancel; retrain: Segment)
    poll_s: float = 1.0                          # between polls of a running stage
    rpc_timeout_s: float = 10.0                  # Start/Get/Cancel deadline
    segment_timeout_s: float = 90.0              # one evaluation case
    max_backoff_s: float = 10.0
    unavailable_limit_s: float = 600.0           # a stage service down longer than this fails the run
    max_stage_retries: int = 2                   # resumes of a FAILED stage (from its checkpoint)
    max_transient_retries: int = 20              # resumes of a stage that FAILED with UNAVAILABLE (S3 down)
    tmp_dir: str | None = None
    clock: Any = field(default=time.time)


def _now(env: Env) -> float:
    return float(env.clock())


def _backoff(rec: Record, env: Env) -> float:
    n = int(rec.get("waits", 0))
    rec["waits"] = n + 1
    return min(env.max_backoff_s, 0.5 * 2 ** min(n, 6))


def _fail(rec: Record, env: Env, code: str, message: str, stage: str = "", error_id: str = "") -> None:
    rec["state"] = "FAILED"
    rec["error"] = {"code": code, "message": message, "error_id": error_id, "stage": stage}
    rec["finished"] = _now(env)
    if stage:
        st = rec["stages"][stage]
        if st["state"] not in ("SUCCEEDED",):
            st["state"], st["finished"] = "FAILED", _now(env)
    log.warning("run %s failed in %s: %s %s", rec["run_id"], stage or "-", code, message)


def current_stage(rec: Record) -> str | None:
    for s in STAGES:
        if rec["stages"][s]["state"] != "SUCCEEDED":
            return s
    return None


def _inputs(run_id: str, stage: str) -> dict[str, str]:
    if stage == "pseudolabel":
        return {"finetuned": f"runs/{run_id}/finetune/"}
    if stage == "retrain":
        return {"pseudo_labels": f"runs/{run_id}/pseudolabel/labels/"}
    return {}


def start_request(rec: Record, stage: str) -> common_pb2.StartStageRequest:
    st = rec["stages"][stage]
    return common_pb2.StartStageRequest(
        run_id=rec["run_id"], config_json=json.dumps(rec["configs"][stage], sort_keys=True),
        manifest=common_pb2.ObjectRef(key=rec["manifest_key"]), inputs=_inputs(rec["run_id"], stage),
        retry=bool(st.get("retry")))


def _apply_job(st: Record, job: Any, env: Env) -> None:
    st["state"] = STAGE_STATE.get(job.state, "PENDING")
    st["step"], st["total"] = int(job.step), int(job.total)
    st["losses"] = {k: float(v) for k, v in job.losses.items() if math.isfinite(v)}
    st["eta_s"] = float(job.eta_s) if job.HasField("eta_s") else None
    st["message"] = job.message
    st["attempt"] = int(job.attempt)
    if st["state"] in ("RUNNING", "SUCCEEDED") and not st["started"]:
        st["started"] = _now(env)


def _unavailable(rec: Record, env: Env, stage: str, e: grpc.RpcError) -> float | None:
    """The stage service cannot be reached: wait (with backoff) unless it has been down for too long."""
    since = rec.setdefault("unavailable_since", _now(env))
    rec["stages"][stage]["message"] = f"waiting for the {stage} service ({e.code().name})"
    if _now(env) - since > env.unavailable_limit_s:
        _fail(rec, env, "UNAVAILABLE", f"the {stage} service was unreachable for more than "
              f"{env.unavailable_limit_s:.0f} s: {e.details()}", stage)
        return None
    return _backoff(rec, env)


def _service_step(rec: Record, env: Env, stage: str) -> float | None:
    st = rec["stages"][stage]
    try:
        job = env.stubs[stage].Start(start_request(rec, stage), timeout=env.rpc_timeout_s)
    except grpc.RpcError as e:
        if e.code() in WAIT_CODES:
            return _unavailable(rec, env, stage, e)
        if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            st["message"] = f"waiting for the {stage} device: {e.details()}"
            return _backoff(rec, env)
        _fail(rec, env, e.code().name, f"{stage}: {e.details()}", stage)
        return None
    rec.pop("unavailable_since", None)
    st["retry"] = False
    _apply_job(st, job, env)
    if st["state"] == "SUCCEEDED":
        rec["waits"] = 0
        st["finished"] = st["finished"] or _now(env)
        st["result"] = json.loads(job.result_json) if job.result_json else {}
        st["outputs"] = [{"key": o.key, "sha256": o.sha256, "size": o.size} for o in job.outputs]
        if stage == "retrain":
            _record_model(rec)
        nxt = current_stage(rec)
        rec["stage"] = nxt or stage
        return 0.0
    if st["state"] in ("FAILED", "CANCELLED"):
        err = job.error
        code = err.code or ("CANCELLED" if st["state"] == "CANCELLED" else "INTERNAL")
        if code in TRANSIENT_FAILURES and st.get("transient_retries", 0) < env.max_transient_retries:
            st["transient_retries"] = st.get("transient_retries", 0) + 1
            st["retry"] = True  # a dependency was down: resume from the checkpoint once it answers again
            st["message"] = f"{stage} interrupted ({code}: {err.message}); resuming, " \
                            f"transient retry {st['transient_retries']}/{env.max_transient_retries}"
            return _backoff(rec, env)
        if code in RETRYABLE_FAILURES and st["retries"] < env.max_stage_retries:
            st["retries"] += 1
            st["retry"] = True  # the next Start resumes the job from its checkpoint
            st["message"] = f"{stage} {st['state'].lower()} ({code}: {err.message}); resuming, " \
                            f"retry {st['retries']}/{env.max_stage_retries}"
            return _backoff(rec, env)
        _fail(rec, env, code, f"{stage}: {err.message or st['state'].lower()}", stage, err.error_id)
        return None
    rec["waits"] = 0
    return env.poll_s


def _record_model(rec: Record) -> None:
    res = rec["stages"]["retrain"].get("result") or {}
    rec["model_id"] = rec["run_id"]
    rec["model"] = {
        "network": str(res.get("network", rec["configs"].get("retrain", {}).get("network", ""))),
        "num_classes": int(res.get("num_classes", rec.get("num_classes", 0)) or 0),
        "key": f"runs/{rec['run_id']}/retrain/model.pt",
    }


# ---------------------------------------------------------------------------------------------- evaluation


def _evaluate_step(rec: Record, env: Env) -> float | None:
    """Segment one not-yet-evaluated test case with the run's model (retrain service) and score it."""
    st = rec["stages"]["evaluate"]
    ev = rec.setdefault("eval", {})
    done: dict[str, Any] = ev.setdefault("cases", {})
    todo = [c for c in rec.get("test_case_ids", []) if c not in done]
    st["state"], st["total"], st["step"] = "RUNNING", len(rec.get("test_case_ids", [])), len(done)
    st["started"] = st["started"] or _now(env)
    if not todo:
        return _finish_evaluation(rec, env)
    try:
        case = _manifest_case(rec, env, todo[0])
    except Exception as e:  # noqa: BLE001
        return _store_wait(rec, env, e)
    try:
        resp = env.stubs["retrain"].Segment(retrain_pb2.SegmentVolumeRequest(
            model_id=rec["run_id"], volume=common_pb2.ObjectRef(key=case["image"])),
            timeout=env.segment_timeout_s)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:  # the device is busy (another job): no time limit
            st["message"] = f"waiting for the retrain device: {e.details()}"
            return _backoff(rec, env)
        if e.code() in WAIT_CODES:
            return _unavailable(rec, env, "evaluate", e)
        _fail(rec, env, e.code().name, f"evaluate: case {case['case_id']!r}: {e.details()}", "evaluate")
        return None
    rec.pop("unavailable_since", None)
    try:
        done[case["case_id"]] = _score(env, rec, case, resp.label.key)
    except Exception as e:  # noqa: BLE001
        return _store_wait(rec, env, e)
    st["step"] = len(done)
    st["message"] = f"evaluated {case['case_id']}"
    return 0.0


def _store_wait(rec: Record, env: Env, e: Exception) -> float:
    """The object store failed transiently inside the worker's own work: wait with backoff (other errors raise)."""
    from services.common.retry import is_transient

    if not is_transient(e):
        raise e
    rec["stages"]["evaluate"]["message"] = f"waiting for the object store ({type(e).__name__})"
    return _backoff(rec, env)


def _manifest_case(rec: Record, env: Env, case_id: str) -> dict[str, Any]:
    cache = rec.setdefault("eval", {}).setdefault("_manifest", None)
    if cache is None:
        m = json.loads(env.store.get_bytes(rec["manifest_key"]))
        cache = {c["case_id"]: c for c in m["cases"] if c.get("role") == "test"}
        rec["eval"]["_manifest"] = cache
        rec["eval"]["num_classes"] = int(m["num_classes"])
        rec["eval"]["spacing"] = m.get("spacing")
        rec["eval"]["class_names"] = m.get("class_names")
    return cache[case_id]


def _score(env: Env, rec: Record, case: dict[str, Any], pred_key: str) -> dict[str, list[float]]:
    from cfrseg.data.io import read_volume
    from cfrseg.metrics import compute_case

    with tempfile.TemporaryDirectory(dir=env.tmp_dir, prefix="cfrseg-eval-") as d:
        pred_p = Path(d) / ("pred" + _suffix(pred_key))
        gt_p = Path(d) / ("gt" + _suffix(case["label"]))
        env.store.get_file(pred_key, pred_p)
        env.store.get_file(case["label"], gt_p)
        pred, gt = read_volume(pred_p), read_volume(gt_p)
    spacing = rec["eval"].get("spacing") or gt.spacing
    return compute_case(pred.array.astype("int64"), gt.array.astype("int64"), spacing, rec["eval"]["num_classes"])


def _suffix(key: str) -> str:
    from cfrseg.data.io import volume_suffix

    return volume_suffix(key) or ".nii.gz"


def _finish_evaluation(rec: Record, env: Env) -> float | None:
    from cfrseg.metrics import METRICS, format_table, summarize

    st = rec["stages"]["evaluate"]
    cases = rec["eval"].get("cases", {})
    run_dir = f"runs/{rec['run_id']}"
    if cases:
        summary = summarize(list(cases.values()))
        names = {"dice": "dice", "jaccard": "jaccard", "asd": "asd_mm", "hd95": "hd95_mm"}
        rec["metrics"] = {names[m]: v for m in METRICS
                          if math.isfinite(v := float(summary["metrics"][m]["class_mean"]))}
        body = {"summary": summary, "cases": cases}
        env.store.put_bytes(f"{run_dir}/evaluate/metrics.json",
                            json.dumps(body, indent=2, sort_keys=True, default=float).encode())
        try:
            cls_names = rec["eval"].get("class_names")   # background first; None: default names
            table = format_table(summary, class_names=cls_names[1:] if cls_names else None)
        except Exception:  # noqa: BLE001  (a report without the table is still a report)
            table = json.dumps(rec["metrics"], indent=2)
        st["message"] = f"{len(cases)} test case(s)"
    else:
        table = "No test cases in the dataset: the model was not evaluated."
        st["message"] = "no test cases"
    env.store.put_bytes(f"{run_dir}/report.md", _report(rec, table).encode())
    rec["eval"].pop("_manifest", None)
    st["state"], st["finished"] = "SUCCEEDED", _now(env)
    st["step"] = st["total"] = len(cases)
    rec["state"], rec["finished"], rec["stage"] = "SUCCEEDED", _now(env), "evaluate"
    return None


def _report(rec: Record, table: str) -> str:
    lines = [f"# cfrseg run {rec['run_id']}", "",
             f"- name: {rec.get('name') or '-'}", f"- dataset: {rec['dataset_id']}",
             f"- profile: {rec['profile']}, SSL method: {rec['ssl_method']}",
             *([f"- classes: {', '.join(rec['eval']['class_names'][1:])}"]
               if rec.get("eval", {}).get("class_names") else []),
             (f"- labeled cases: {len(rec['labeled_case_ids'])}, unlabeled: {len(rec['unlabeled_case_ids'])}, "
              f"test: {len(rec.get('test_case_ids', []))}"),
             f"- model: runs/{rec['run_id']}/retrain/model.pt", "", "## Stages", ""]
    for s in STAGES:
        st = rec["stages"][s]
        took = (st["finished"] - st["started"]) if st.get("started") and st.get("finished") else None
        lines.append(f"- {s}: {st['state'].lower()}, {st['step']}/{st['total']} steps"
                     + (f", {took:.1f} s" if took is not None else "")
                     + (f", attempt {st['attempt']}" if st.get("attempt", 0) > 1 else ""))
    lines += ["", "## Evaluation (test cases)", "", table, ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- cancel


def _cancel_step(rec: Record, env: Env) -> float | None:
    stage = current_stage(rec)
    if stage in SERVICE_STAGES and rec["stages"][stage]["state"] in ("RUNNING", "PENDING") \
            and rec["stages"][stage].get("started_rpc"):
        try:
            job = env.stubs[stage].Cancel(common_pb2.CancelRequest(run_id=rec["run_id"]),
                                          timeout=env.rpc_timeout_s)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                job = None
            elif e.code() in WAIT_CODES:
                since = rec.setdefault("unavailable_since", _now(env))
                if _now(env) - since <= env.unavailable_limit_s:
                    return _backoff(rec, env)
                job = None  # the service is gone; nothing runs there any more
            else:
                raise
        if job is not None:
            _apply_job(rec["stages"][stage], job, env)
            if STAGE_STATE.get(job.state) in ("PENDING", "RUNNING"):
                return env.poll_s  # the stage writes a checkpoint, then ends CANCELLED
    now = _now(env)
    for s in STAGES:
        st = rec["stages"][s]
        if st["state"] in ("PENDING", "RUNNING"):
            st["state"] = "CANCELLED"
            st["finished"] = st["finished"] or (now if st.get("started") else None)
    rec["state"], rec["finished"] = "CANCELLED", now
    rec["error"] = {"code": "CANCELLED", "message": "cancelled by the user", "error_id": "", "stage": stage or ""}
    return None


# ---------------------------------------------------------------------------------------------- the step


def step(rec: Record, env: Env) -> float | None:
    """Advance ``rec`` (mutated in place) by one short step; returns the delay before the next step, or None."""
    if rec["state"] in FINAL_STATES:
        return None
    before = json.dumps({k: rec.get(k) for k in ("state", "stage", "stages", "metrics", "error")},
                        sort_keys=True, default=str)
    if rec["state"] == "QUEUED" and not rec.get("cancel_requested"):
        rec["state"], rec["started"] = "RUNNING", _now(env)
    if rec.get("cancel_requested"):
        delay = _cancel_step(rec, env)
    else:
        stage = current_stage(rec)
        rec["stage"] = stage or rec["stage"]
        if stage is None:
            rec["state"], rec["finished"] = "SUCCEEDED", _now(env)
            delay = None
        elif stage == "evaluate":
            delay = _evaluate_step(rec, env)
        else:
            rec["stages"][stage]["started_rpc"] = True
            delay = _service_step(rec, env, stage)
    after = json.dumps({k: rec.get(k) for k in ("state", "stage", "stages", "metrics", "error")},
                       sort_keys=True, default=str)
    if after != before:
        rec["seq"] = int(rec.get("seq", 0)) + 1
    return delay
