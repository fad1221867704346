"""The Celery app (broker and result backend: Redis) that drives runs.

Reliability settings (docs/stack.md, "Orchestration"): tasks are short steps; ``acks_late`` +
``reject_on_worker_lost`` so a step whose worker dies is delivered again; a short visibility timeout with kombu's
unacked-restore sweep every 2 s, so a step held by a killed worker comes back in about 20 s; prefetch 1. The
sweep's Redis mutex expires after :data:`UNACKED_MUTEX_EXPIRE_S` instead of kombu's 300 s: a worker killed while
it holds the mutex would otherwise stop every other worker from restoring anything for five minutes.

Environment: ``CFRSEG_BROKER_URL`` (default ``CFRSEG_REDIS_URL``), ``CFRSEG_RESULT_BACKEND`` (default the
broker), ``CFRSEG_VISIBILITY_TIMEOUT_S`` (default 15; must exceed the longest step, which is bounded by the
RPC deadlines in :class:`services.orchestrator.engine.Env`).
"""

from __future__ import annotations

import os

from celery import Celery

QUEUE = "cfrseg"
UNACKED_MUTEX_EXPIRE_S = 10   # a sweep takes milliseconds; restores are transactional, so an overlap is harmless
ADVANCE = "cfrseg.advance"


def make_app(broker: str | None = None, backend: str | None = None, visibility_timeout_s: float | None = None) -> Celery:
    broker = broker or os.environ.get("CFRSEG_BROKER_URL") or os.environ.get("CFRSEG_REDIS_URL") \
        or "redis://127.0.0.1:6379/0"
    backend = backend or os.environ.get("CFRSEG_RESULT_BACKEND") or broker
    vt = float(visibility_timeout_s or os.environ.get("CFRSEG_VISIBILITY_TIMEOUT_S", "15"))
    app = Celery("cfrseg", broker=broker, backend=backend,
                 include=["services.orchestrator.tasks", "services.pacs.tasks"])  # + PACS job steps
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        task_ignore_result=True,           # run records, not task results, are the truth
        result_expires=3600,
        task_default_queue=QUEUE,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": vt, "unacked_restore_interval": 2,
                                  "unacked_restore_throttle": 1, "unacked_mutex_expire": UNACKED_MUTEX_EXPIRE_S},
        result_backend_transport_options={"retry_policy": {"timeout": 5.0}},
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    return app


app = make_app()


def enqueue(run_id: str, token: str, countdown: float = 0.0, celery: Celery | None = None) -> None:
    """Schedule the next step of ``run_id`` (by task name, so callers need not import the task module)."""
    (celery or app).send_task(ADVANCE, args=[run_id, token], countdown=max(0.0, countdown), queue=QUEUE)
