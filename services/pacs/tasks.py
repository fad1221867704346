"""The Celery task of PACS jobs, ``cfrseg.pacs.step(job_id, token)``, on the existing worker (same app, queue
and reliability settings as run steps: acks_late, reject_on_worker_lost, bounded retries).

Exactly one step chain lives per job, as for runs: a step holds the job's Redis lock, drops itself if its token
is not the record's (a duplicate from a redelivery), schedules its successor with a fresh token, then writes the
record with that token. A worker killed mid-step has its message delivered again with the record's token, so
the step is redone and the chain continues once. Imports only light modules at load time (the ``dicom`` extra is
imported by the steps themselves).
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path

from celery.exceptions import Retry

from services.orchestrator.app import QUEUE, app
from services.orchestrator.records import new_token
from services.pacs.jobs import FINAL, STEP_TASK

log = logging.getLogger("cfrseg.pacs.tasks")


@lru_cache(maxsize=1)
def pacs_env():
    from services.common.jobstore import JobStore
    from services.common.s3store import S3Store
    from services.common.server import internal_channel
    from services.common.settings import Settings
    from services.gen.cfrseg.v1 import retrain_pb2_grpc
    from services.pacs.audit import Audit
    from services.pacs.jobs import PacsJobs
    from services.pacs.steps import PacsEnv

    s = Settings.from_env()
    logging.getLogger("highdicom").setLevel(logging.WARNING)   # its INFO lines name every copied module
    if "retrain" not in s.addrs:
        raise RuntimeError("set CFRSEG_RETRAIN_ADDR for PACS jobs (segmentation)")
    store = S3Store.from_settings(s)
    jobs = JobStore.connect(store, s.redis_url)
    work = Path(s.workdir)
    work.mkdir(parents=True, exist_ok=True)
    stub = retrain_pb2_grpc.RetrainServiceStub(internal_channel(s.addrs["retrain"], s))
    return PacsEnv(store=store, jobs=PacsJobs(store, jobs, enqueue), retrain=stub,
                   audit=Audit(store, "worker", work / "pacs"), workdir=work,
                   segment_timeout_s=float(os.environ.get("CFRSEG_PACS_SEGMENT_TIMEOUT_S", "600")),
                   wait_limit_s=float(os.environ.get("CFRSEG_PACS_WAIT_LIMIT_S", "600")))


def enqueue(job_id: str, token: str, countdown: float = 0.0) -> None:
    app.send_task(STEP_TASK, args=[job_id, token], countdown=max(0.0, countdown), queue=QUEUE)


@app.task(name=STEP_TASK, bind=True, max_retries=8, acks_late=True, reject_on_worker_lost=True)
def pacs_step(self, job_id: str, token: str) -> str:
    env = pacs_env()
    try:
        return run_step(env, job_id, token)
    except Retry:
        raise
    except Exception as e:
        log.warning("step of PACS job %s failed (%r); retrying", job_id, e, exc_info=True)
        raise self.retry(exc=e, countdown=min(30.0, 1.0 * 2 ** self.request.retries))


def run_step(env, job_id: str, token: str) -> str:
    from services.pacs import steps

    with env.jobs.lock(job_id, blocking_s=2.0) as got:
        if not got:
            env.jobs._enqueue(job_id, token, 1.0)
            return "busy"
        rec = env.jobs.get(job_id)
        if rec["state"] in FINAL:
            return "final"
        if rec.get("token") != token:
            return "stale"
        delay = steps.step(rec, env)
        rec["token"] = new_token()
        if delay is not None:
            env.jobs._enqueue(job_id, rec["token"], delay)
        env.jobs.put(rec)
        return f"{rec['state']} next={delay}"
