"""The generic stage servicer behind the finetune, pseudolabel and retrain services.

Semantics (see docs/services.md):
- One job at a time per service process (= per device). A Start for another run while a job is running gives
  RESOURCE_EXHAUSTED; the orchestrator retries later.
- Start is idempotent per (run_id, stage): it attaches to the running job, or returns the finished one
  (SUCCEEDED is never re-run; FAILED/CANCELLED only with ``retry``). A job recorded as PENDING/RUNNING but not
  running here (the service was killed or restarted) is resumed: the stage is called again and continues from
  its last checkpoint in the object store. A Start with different inputs gives ALREADY_EXISTS.
- The job runs in a background thread with an S3-backed store at ``runs/{run_id}/{stage}/``. Its record lives
  in the JobStore (Redis + ``runs/{run_id}/jobs/{stage}.json``).
- SIGTERM: the running job is asked to stop (it checkpoints) and stays RUNNING, to be resumed on the next Start.
- Preconditions, checked at Start (FAILED_PRECONDITION, the run fails at once with the reason): the device asked
  for (CFRSEG_DEVICE) is usable, and the weights the job needs are in the weights folder (services/common/weights.py).
- One job per device across processes: the job thread waits for the device lock (services/common/device.py) as
  PENDING with a "waiting for GPU n" message, and frees the allocator cache when it ends.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import importlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from cfrseg.data.manifest import Manifest
from cfrseg.errors import Cancelled, ConfigError
from cfrseg.progress import ProgressEvent
from cfrseg.store import Store, check_key
from services.common import convert
from services.common.device import DeviceLock, check_cuda, cuda_index, release_memory, service_device
from services.common.errors import ServiceError, status_of, stream, unary
from services.common.inputs import load_manifest, localize
from services.common.jobstore import SEQ, JobStore, job_record_key
from services.common.retry import is_transient
from services.common.s3store import S3Store
from services.common.settings import Settings
from services.common.weights import WeightsDir, job_needs, required
from services.gen.cfrseg.v1 import common_pb2 as pb

log = logging.getLogger("cfrseg.services.stage")
RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
PERSIST_EVERY_S = 2.0
KEEP_EVENTS = 256


@dataclass
class StageContext:
    """What a stage implementation gets: the core stage's arguments, with inputs already local."""

    run_id: str
    stage: str
    config: dict[str, Any]          # the stage's config section (CFRSEG_DEVICE applied by stage_config)
    manifest: Manifest              # file fields are local paths
    store: Store                    # runs/{run_id}/{stage}/ in the object store
    inputs: dict[str, S3Store]      # the request's named input prefixes
    workdir: Path                   # local scratch for this run and stage
    progress: Callable[[ProgressEvent], None]
    cancel: threading.Event
    device: str = ""                # the service's device (CFRSEG_DEVICE resolved: cuda:N, cpu; "" = the config's)
    weights: Path | None = None     # the weights folder (CFRSEG_CACHE), for default base checkpoints


StageImpl = Callable[[StageContext], Any]


def load_impl(spec: str) -> Callable[..., Any]:
    """``module:function`` -> the function (imported now)."""
    mod, _, fn = spec.partition(":")
    if not mod or not fn:
        raise ConfigError(f"stage implementation {spec!r}: expected module:function")
    return getattr(importlib.import_module(mod), fn)


def stage_config(cls: type, ctx: StageContext) -> Any:
    """Build the stage's config dataclass from ``ctx.config`` with resume=True (the stage's prefix belongs to this
    run, so any checkpoint there is this job's) and the device override, when the config has those fields."""
    names = {f.name for f in dataclasses.fields(cls)}
    d = dict(ctx.config)
    if "resume" in names:
        d["resume"] = True
    if ctx.device and "device" in names:
        d["device"] = ctx.device
    return cls.from_dict(d)


def _plain(x: Any) -> Any:
    """JSON-able copy of a stage result without deep-copying it (``dataclasses.asdict`` would deep-copy fields
    such as the result's Store, whose S3 client holds sockets): dataclasses/dicts/sequences recurse, numbers and
    strings stay, anything else becomes its ``str``."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)


def to_json(result: Any) -> str:
    if result is None:
        return ""
    if not dataclasses.is_dataclass(result) and hasattr(result, "to_dict"):
        result = result.to_dict()
    return json.dumps(_plain(result), sort_keys=True)


class Job:
    """A job running in this process: its record, recent events, cancel flag and watchers' condition."""

    def __init__(self, rec: dict[str, Any]) -> None:
        self.rec = rec
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=KEEP_EVENTS)
        self.cond = threading.Condition()
        self.cancel = threading.Event()
        self.interrupted = False     # stopping for a shutdown, not a user cancel
        self.thread: threading.Thread | None = None
        self.last_persist = 0.0
        self.dirty = False           # its last forced write failed (S3 down): written again on the next Start/Get
        self.lock: Any = None        # the device lock it holds (services.common.device.DeviceLock)

    @property
    def run_id(self) -> str:
        return self.rec["run_id"]

    def publish(self, **fields: Any) -> dict[str, Any]:
        with self.cond:
            self.rec.update({k: v for k, v in fields.items() if k in ("step", "total", "losses", "message",
                                                                     "eta_s", "state")})
            self.rec["seq"] = int(self.rec.get("seq", 0)) + 1
            ev = {k: self.rec.get(k) for k in ("run_id", "stage", "step", "total", "losses", "message",
                                              "eta_s", "state", "seq")}
            ev["time"] = time.time()
            self.rec["last_event"] = ev
            self.events.append(ev)
            self.cond.notify_all()
            return ev


def fingerprint(req: pb.StartStageRequest) -> str:
    try:
        cfg = json.loads(req.config_json or "{}")
    except json.JSONDecodeError as e:
        raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"config_json is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "config_json must be a JSON object")
    blob = json.dumps({"config": cfg, "manifest": req.manifest.key, "manifest_sha256": req.manifest.sha256,
                       "inputs": dict(sorted(req.inputs.items()))}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class StageServicer:
    """Start/Watch/Get/Cancel of one stage; register with the generated ``add_<Service>Servicer_to_server``."""

    def __init__(self, stage: str, impl: StageImpl, store: S3Store, jobs: JobStore, settings: Settings) -> None:
        self.stage = stage
        self.impl = impl
        self.store = store            # bucket root
        self.jobs = jobs
        self.settings = settings
        self.workdir = Path(settings.workdir)
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}     # jobs started by this process (finished ones stay for Watch)
        self._busy: Job | None = None
        # a running job's store retries S3 for longer than an RPC does: a stage rides out an S3 restart
        self.job_store = store.with_retry(settings.s3_job_retry_s) if hasattr(store, "with_retry") else store
        self.weights = WeightsDir(settings.weights_path)
        self.required = required(stage, settings.required_weights, settings.default_profile)
        self.device, self._device_problem = service_device(settings.device, settings.gpu)
        self.lock_name = DeviceLock(self.device or "cpu").name
        log.info("%s service: device %s (lock %s%s), weights %s (required: %s)", stage, self.device or "per config",
                 self.lock_name, f" in {settings.lock_dir}" if settings.lock_dir else ", in-process only",
                 self.weights.path, ", ".join(self.required) or "none")

    def new_device_lock(self) -> DeviceLock:
        """A lock object for one acquisition of this service's device (locks are shared by name)."""
        return DeviceLock(self.device or "cpu", self.settings.lock_dir, name=self.lock_name)

    # ---- health checks (registered with server.monitor by stage_main) ----
    def device_check(self) -> str | None:
        """None when the configured device is usable (re-checked every round for a GPU, except while a job of
        this service runs on it: the job proves it works, and a test allocation could fail on a full GPU)."""
        idx = cuda_index(self.device)
        if idx is not None and self._busy is None:
            self._device_problem = check_cuda(idx)
        return self._device_problem

    def weights_check(self) -> str | None:
        """None when every required weight is present with its sha256."""
        return self.weights.problems(self.required)

    def _preconditions(self, req: pb.StartStageRequest) -> None:
        """FAILED_PRECONDITION when the device is unusable or a weight this job needs is missing or wrong."""
        if self._device_problem:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"{self.stage} service: {self._device_problem}")
        cfg = json.loads(req.config_json or "{}")
        inputs = {k: self.store.sub(v) for k, v in req.inputs.items()}
        problem = self.weights.problems(job_needs(self.stage, cfg, inputs))
        if problem:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, f"{self.stage} service: {problem}")

    # ---- helpers ----
    def _key(self, run_id: str) -> str:
        return job_record_key(run_id, self.stage)

    def _check_run_id(self, run_id: str) -> str:
        if not RUN_ID.match(run_id or ""):
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"invalid run_id {run_id!r}: use 1-64 of [A-Za-z0-9_-]")
        return run_id

    def _record(self, run_id: str) -> dict[str, Any]:
        job = self._jobs.get(run_id)
        if job is not None:
            if job.dirty:
                self._persist(job)
            with job.cond:
                return dict(job.rec)
        rec = self.jobs.find(self._key(self._check_run_id(run_id)))
        if rec is None:
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"no {self.stage} job for run {run_id!r}")
        return rec

    def _persist(self, job: Job, force: bool = False) -> None:
        """Write the job's record (every PERSIST_EVERY_S, or now with ``force``). Progress writes are best effort;
        forced ones retry transient errors for the job's S3 budget, then raise (and the job stays ``dirty``:
        the next Start or Get writes it again)."""
        now = time.monotonic()
        if not (force or job.dirty or now - job.last_persist >= PERSIST_EVERY_S):
            return
        job.last_persist = now
        deadline = now + (self.settings.s3_job_retry_s if force else 0.0)
        while True:
            with job.cond:
                rec = dict(job.rec)
            try:
                self.jobs.put(self._key(job.run_id), rec)
                with job.cond:
                    job.rec[SEQ] = rec[SEQ]
                job.dirty = False
                return
            except Exception as e:
                if force and is_transient(e) and time.monotonic() < deadline:
                    time.sleep(1.0)
                    continue
                job.dirty = job.dirty or force
                if force:
                    raise
                log.warning("could not persist progress of %s: %s", job.run_id, e)
                return

    # ---- RPCs ----
    @unary
    def Start(self, req: pb.StartStageRequest, context: grpc.ServicerContext) -> pb.StageJob:
        run_id = self._check_run_id(req.run_id)
        fp = fingerprint(req)
        if not req.manifest.key:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "manifest.key is required")
        for prefix in req.inputs.values():
            check_key(prefix.rstrip("/"))
        with self._lock:
            job = self._jobs.get(run_id)
            if job is not None and job.dirty:
                self._persist(job)  # its last state could not be written (S3 was down): try again now
            rec = dict(job.rec) if job is not None else self.jobs.find(self._key(run_id))
            if rec is not None and rec.get("fingerprint") != fp:
                raise ServiceError(grpc.StatusCode.ALREADY_EXISTS,
                                   f"run {run_id!r} already has a {self.stage} job with different inputs")
            running_here = job is not None and job.thread is not None and job.thread.is_alive()
            if rec is not None and (running_here or rec["state"] == "SUCCEEDED"
                                    or (rec["state"] in ("FAILED", "CANCELLED") and not req.retry)):
                return convert.stage_job(rec)
            self._preconditions(req)
            if self._busy is not None:
                raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"{self.stage} device busy with run {self._busy.run_id!r}; retry later")
            load_manifest(self.store, req.manifest.key, req.manifest.sha256)  # reject bad input before queueing
            now = time.time()
            rec = {"step": 0, "total": 0, "losses": {}, "eta_s": None, **(rec or {}),
                   "run_id": run_id, "stage": self.stage, "fingerprint": fp,
                   "state": "PENDING", "message": "starting", "error": None,
                   "attempt": int((rec or {}).get("attempt", 0)) + 1,
                   "created": (rec or {}).get("created", now), "started": now, "finished": None,
                   "output_prefix": f"runs/{run_id}/{self.stage}/",
                   "request": {"config_json": req.config_json, "manifest": {"key": req.manifest.key,
                                                                             "sha256": req.manifest.sha256},
                               "inputs": dict(req.inputs)}}
            job = Job(rec)
            job.publish(state="PENDING", message="resuming" if rec["attempt"] > 1 else "starting")
            self._persist(job, force=True)
            self._jobs[run_id] = job
            self._busy = job
            job.thread = threading.Thread(target=self._run, args=(job, req), name=f"{self.stage}-{run_id}",
                                          daemon=True)
            job.thread.start()
            return convert.stage_job(job.rec)

    @stream
    def Watch(self, req: pb.WatchRequest, context: grpc.ServicerContext) -> Iterator[pb.ProgressEvent]:
        run_id = self._check_run_id(req.run_id)
        job = self._jobs.get(run_id)
        if job is None:
            rec = self._record(run_id)
            ev = rec.get("last_event") or {k: rec.get(k) for k in ("run_id", "stage", "step", "total", "losses",
                                                                   "message", "eta_s", "state", "seq")}
            yield convert.progress_event({**ev, "state": rec["state"]})
            return
        last = req.after_seq
        with job.cond:
            if last == 0 and job.events:
                last = job.events[-1]["seq"] - 1
        while context.is_active():
            with job.cond:
                pending = [e for e in job.events if e["seq"] > last]
                if not pending:
                    job.cond.wait(1.0)
                    continue
            for ev in pending:
                yield convert.progress_event(ev)
                last = ev["seq"]
                if ev["state"] in convert.TERMINAL:
                    return

    @unary
    def Get(self, req: pb.GetRequest, context: grpc.ServicerContext) -> pb.StageJob:
        return convert.stage_job(self._record(self._check_run_id(req.run_id)))

    @unary
    def Cancel(self, req: pb.CancelRequest, context: grpc.ServicerContext) -> pb.StageJob:
        run_id = self._check_run_id(req.run_id)
        with self._lock:
            job = self._jobs.get(run_id)
            if job is not None and job.thread is not None and job.thread.is_alive():
                job.cancel.set()
                job.publish(message="cancelling")
                return convert.stage_job(job.rec)
            rec = self._record(run_id)
            if rec["state"] in ("PENDING", "RUNNING"):  # recorded by a process that is gone
                rec.update(state="CANCELLED", message="cancelled", finished=time.time())
                self.jobs.put(self._key(run_id), rec)
            return convert.stage_job(rec)

    # ---- the job thread ----
    def _wait_for_device(self, job: Job) -> None:
        """Take the device lock (one job per device across processes), PENDING with a message while waiting;
        Cancelled when the job is cancelled or the service stops meanwhile."""
        def waiting(msg: str) -> None:
            job.publish(state="PENDING", message=msg)
            self._persist(job)

        holder = {"service": self.stage, "run_id": job.run_id, "what": "job"}
        lock = self.new_device_lock()
        if not lock.acquire(holder, should_stop=job.cancel.is_set, on_wait=waiting):
            raise Cancelled(f"{self.stage} job {job.run_id} stopped while waiting for the device")
        job.lock = lock

    def _run(self, job: Job, req: pb.StartStageRequest) -> None:
        run_id = job.run_id
        try:
            work = self.workdir / run_id / self.stage
            store = self.job_store
            manifest = localize(load_manifest(store, req.manifest.key, req.manifest.sha256), store,
                                self.workdir / "objects")
            ctx = StageContext(
                run_id=run_id, stage=self.stage, config=json.loads(req.config_json or "{}"), manifest=manifest,
                store=store.sub(f"runs/{run_id}/{self.stage}"),
                inputs={k: store.sub(v) for k, v in req.inputs.items()},
                workdir=work, progress=lambda ev: self._on_progress(job, ev), cancel=job.cancel,
                device=self.device, weights=self.weights.path)
            work.mkdir(parents=True, exist_ok=True)
            self._wait_for_device(job)
            job.publish(state="RUNNING", message="running")
            self._persist(job, force=True)
            result = self.impl(ctx)
            outputs = [dataclasses.asdict(ctx.store.ref(k)) for k in ctx.store.list()]
            for o in outputs:
                o["key"] = f"runs/{run_id}/{self.stage}/{o['key']}"
            with job.cond:
                job.rec.update(outputs=outputs, result_json=to_json(result), eta_s=0.0)
            self._finish(job, "SUCCEEDED", "done")
        except Cancelled:
            if job.interrupted:
                self._finish(job, "RUNNING", "interrupted: the service stopped; resumes on the next Start",
                             final=False)
            else:
                self._finish(job, "CANCELLED", "cancelled")
        except Exception as e:  # noqa: BLE001
            code, msg, eid = status_of(e, f"{self.stage} job {run_id}")
            with job.cond:
                job.rec["error"] = {"code": code.name, "message": msg, "error_id": eid, "stage": self.stage}
            log.warning("%s job %s failed: %s %s", self.stage, run_id, code.name, msg)
            self._finish(job, "FAILED", msg)
        finally:
            self._release_device(job)

    def _release_device(self, job: Job) -> None:
        """Free the allocator cache, then the device lock (idempotent)."""
        lock, job.lock = job.lock, None
        if lock is not None:
            try:
                release_memory()
            finally:
                lock.release()

    def _finish(self, job: Job, state: str, message: str, final: bool = True) -> None:
        self._release_device(job)
        with job.cond:
            job.rec.update(state=state, message=message, finished=time.time() if final else None)
        try:
            self._persist(job, force=True)
        except Exception:
            log.exception("could not record the end of %s job %s", self.stage, job.run_id)
        with self._lock:
            if self._busy is job:
                self._busy = None
            if not final:
                self._jobs.pop(job.run_id, None)  # a later Start resumes it from the record
        job.publish(state=state, message=message)
        log.info("%s job %s: %s (%s)", self.stage, job.run_id, state, message)

    def _on_progress(self, job: Job, ev: ProgressEvent) -> None:
        job.publish(step=ev.step, total=ev.total, losses={k: float(v) for k, v in ev.losses.items()},
                    message=ev.message, eta_s=ev.eta_s, state="RUNNING")
        self._persist(job)

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop the running job (it checkpoints and stays RUNNING, to resume on the next Start)."""
        job = self._busy
        if job is None or job.thread is None:
            return
        job.interrupted = True
        job.cancel.set()
        job.thread.join(self.settings.grace_s if timeout is None else timeout)
