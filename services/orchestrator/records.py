"""Run records: the JSON document that describes one run, shared by the gateway (creates, cancels, reads) and the
orchestrator (advances). Stored in the JobStore at ``runs/{run_id}/record.json`` (Redis, mirrored to S3).

Writers serialise through :func:`run_lock` (a Redis lock, so the gateway and any number of workers agree).
"""

from __future__ import annotations

import contextlib
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

from cfrseg.errors import InputError

Record = dict[str, Any]

#: Stages of a run, in order. The first three run on their stage services; "evaluate" runs in the worker.
STAGES: tuple[str, ...] = ("finetune", "pseudolabel", "retrain", "evaluate")
SERVICE_STAGES: tuple[str, ...] = ("finetune", "pseudolabel", "retrain")
FINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})
ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
LOCK_TTL_S = 120.0


def check_id(value: str, what: str) -> str:
    """A run/dataset/upload id as the servers generate them; anything else is rejected (ids become key parts)."""
    if not ID_RE.match(value or ""):
        raise InputError(f"invalid {what} {value!r}: expected 1-64 characters of [A-Za-z0-9_-]")
    return value


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def new_token() -> str:
    return uuid.uuid4().hex


def run_key(run_id: str) -> str:
    return f"runs/{check_id(run_id, 'run id')}/record.json"


def stage_status(stage: str) -> Record:
    return {"stage": stage, "state": "PENDING", "step": 0, "total": 0, "losses": {}, "eta_s": None,
            "message": "", "started": None, "finished": None, "attempt": 0, "retries": 0, "retry": False}


def new_run_record(*, run_id: str, name: str, dataset_id: str, profile: str, ssl_method: str,
                   labeled: list[str], unlabeled: list[str], test: list[str], configs: dict[str, Any],
                   manifest_key: str, request_id: str = "", request_hash: str = "") -> Record:
    now = time.time()
    return {
        "run_id": run_id, "name": name, "dataset_id": dataset_id, "profile": profile, "ssl_method": ssl_method,
        "labeled_case_ids": labeled, "unlabeled_case_ids": unlabeled, "test_case_ids": test,
        "configs": configs, "manifest_key": manifest_key, "request_id": request_id, "request_hash": request_hash,
        "state": "QUEUED", "stage": STAGES[0], "stages": {s: stage_status(s) for s in STAGES},
        "metrics": {}, "error": None, "model_id": "", "model": {}, "eval": {},
        "created": now, "started": None, "finished": None, "updated": now,
        "cancel_requested": False, "token": new_token(), "seq": 0,
    }


@contextlib.contextmanager
def run_lock(redis: Any | None, run_id: str, *, blocking_s: float = 10.0) -> Iterator[bool]:
    """Hold the run's writer lock (Redis SET NX with expiry). Yields False when it could not be had in time.

    Without Redis (tests of the engine alone) there is nothing to coordinate with and the lock always succeeds.
    """
    if redis is None:
        yield True
        return
    lock = redis.lock(f"cfrseg:lock:run:{run_id}", timeout=LOCK_TTL_S, blocking_timeout=blocking_s)
    got = bool(lock.acquire())
    try:
        yield got
    finally:
        if got:
            with contextlib.suppress(Exception):  # expired or Redis restarted: nothing left to release
                lock.release()
