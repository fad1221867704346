"""The one Celery task: ``advance(run_id, token)``, a short idempotent step of a run.

Exactly one step chain lives per run: each step carries the run's current ``token``; a step whose token is not
the record's (a duplicate from a redelivery or a watchdog kick) does nothing. A step holds the run's Redis lock,
schedules its successor with a fresh token, then writes the record with that token; so whatever point a worker
dies at, the chain continues exactly once (see docs/stack.md, "Orchestration").
"""

from __future__ import annotations

import logging
import os
import time
from functools import lru_cache

from celery.exceptions import Retry

from services.common.jobstore import JobStore
from services.common.retry import is_transient
from services.common.s3store import S3Store
from services.common.server import internal_channel
from services.common.settings import Settings
from services.gen.cfrseg.v1 import finetune_pb2_grpc, pseudolabel_pb2_grpc, retrain_pb2_grpc
from services.orchestrator import engine
from services.orchestrator.app import ADVANCE, app, enqueue
from services.orchestrator.records import FINAL_STATES, new_token, run_key, run_lock

log = logging.getLogger("cfrseg.orchestrator")
TRANSIENT_MAX_DELAY_S = 10.0  # a step that failed on S3/Redis is retried every <= 10 s, without a count limit
STUBS = {"finetune": finetune_pb2_grpc.FinetuneServiceStub,
         "pseudolabel": pseudolabel_pb2_grpc.PseudolabelServiceStub,
         "retrain": retrain_pb2_grpc.RetrainServiceStub}


class WorkerEnv:
    """Per-process connections (created lazily after the prefork fork)."""

    def __init__(self, settings: Settings) -> None:
        missing = [s for s in STUBS if s not in settings.addrs]
        if missing:
            raise RuntimeError(f"set CFRSEG_{missing[0].upper()}_ADDR (stage service addresses) for the worker")
        self.settings = settings
        # short S3 retries inside a step (steps must stay well under the visibility timeout); a step that still
        # fails on S3 is retried as a whole by the task (see advance)
        self.store = S3Store.from_settings(settings).with_retry(min(2.0, settings.s3_retry_s))
        self.jobs = JobStore.connect(self.store, settings.redis_url)
        stubs = {s: cls(internal_channel(settings.addrs[s], settings)) for s, cls in STUBS.items()}
        self.engine = engine.Env(store=self.store, stubs=stubs,
                                 poll_s=float(os.environ.get("CFRSEG_POLL_S", "1.0")),
                                 unavailable_limit_s=float(os.environ.get("CFRSEG_UNAVAILABLE_LIMIT_S", "600")),
                                 tmp_dir=settings.workdir if os.path.isdir(settings.workdir) else None)


@lru_cache(maxsize=1)
def worker_env() -> WorkerEnv:
    return WorkerEnv(Settings.from_env())


@app.task(name=ADVANCE, bind=True, max_retries=8, acks_late=True, reject_on_worker_lost=True)
def advance(self, run_id: str, token: str) -> str:
    """One step of run ``run_id``. Returns what it did (for logs)."""
    env = worker_env()
    try:
        return _advance(env, run_id, token)
    except Retry:
        raise
    except Exception as e:
        if is_transient(e):  # S3 or Redis down: the step cannot even record itself; retry until they are back
            log.warning("step of run %s: a dependency is unavailable (%s); retrying", run_id, e)
            raise self.retry(exc=e, countdown=min(TRANSIENT_MAX_DELAY_S, 1.0 * 2 ** min(self.request.retries, 4)),
                             max_retries=None) from None
        log.warning("step of run %s failed (%r); retrying", run_id, e, exc_info=True)
        raise self.retry(exc=e, countdown=min(30.0, 1.0 * 2 ** self.request.retries))


def _advance(env: WorkerEnv, run_id: str, token: str) -> str:
    with run_lock(env.jobs.redis, run_id, blocking_s=2.0) as got:
        if not got:  # another step of this run holds the lock: look again shortly, same token
            enqueue(run_id, token, countdown=1.0)
            return "busy"
        rec = env.jobs.get(run_key(run_id))
        if rec["state"] in FINAL_STATES:
            return "final"
        if rec.get("token") != token:
            return "stale"
        delay = engine.step(rec, env.engine)
        rec["token"] = new_token()
        rec["updated"] = time.time()
        if delay is not None:
            enqueue(run_id, rec["token"], countdown=delay)
        env.jobs.put(run_key(run_id), rec)
        return f"{rec['state']} {rec['stage']} next={delay}"
