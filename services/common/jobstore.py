"""``JobStore``: JSON records (stage jobs, runs) in Redis, mirrored to the object store.

Each record is addressed by its object key (``runs/{run_id}/record.json``, ``runs/{run_id}/jobs/{stage}.json``).
``put`` writes the object store first (durable), then Redis (fast); ``get`` reads Redis and falls back to the
object store, re-populating Redis, so a Redis restart (or flush) loses nothing. Without Redis (no URL, or Redis
down) it works from the object store alone. ``update`` is a read-modify-write under a per-key lock (in-process;
each record has a single writer process by design: a stage service for its jobs, the worker for runs).
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any, Callable

from cfrseg.errors import NotFoundError
from cfrseg.store import Store, check_key

log = logging.getLogger("cfrseg.services.jobstore")
Record = dict[str, Any]


def run_record_key(run_id: str) -> str:
    return f"runs/{run_id}/record.json"


def job_record_key(run_id: str, stage: str) -> str:
    return f"runs/{run_id}/jobs/{stage}.json"


class JobStore:
    def __init__(self, store: Store, redis: Any | None = None, namespace: str = "cfrseg") -> None:
        self.store = store
        self.redis = redis
        self.ns = namespace
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    @classmethod
    def connect(cls, store: Store, redis_url: str, namespace: str = "cfrseg") -> "JobStore":
        client = None
        if redis_url:
            import redis

            client = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
        return cls(store, client, namespace)

    def _rkey(self, key: str) -> str:
        return f"{self.ns}:rec:{key}"

    def _redis(self, op: Callable[[Any], Any]) -> Any:
        if self.redis is None:
            return None
        try:
            return op(self.redis)
        except Exception as e:  # noqa: BLE001  (redis down: the object store still has everything)
            log.warning("redis unavailable (%s); using the object store only", e)
            return None

    def put(self, key: str, record: Record) -> None:
        data = json.dumps(record, sort_keys=True).encode()
        self.store.put_bytes(check_key(key), data)
        self._redis(lambda r: r.set(self._rkey(key), data))

    def get(self, key: str) -> Record:
        data = self._redis(lambda r: r.get(self._rkey(check_key(key))))
        if data is None:
            data = self.store.get_bytes(check_key(key))  # NotFoundError when missing
            self._redis(lambda r: r.set(self._rkey(key), data))
        return json.loads(data)

    def find(self, key: str) -> Record | None:
        try:
            return self.get(key)
        except NotFoundError:
            return None

    def lock(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def update(self, key: str, fn: Callable[[Record | None], Record]) -> Record:
        """Read the record (None when missing), apply ``fn``, write the result back; returns it."""
        with self.lock(key):
            rec = fn(self.find(key))
            self.put(key, rec)
            return rec

    def delete(self, key: str) -> None:
        self.store.delete(check_key(key))
        self._redis(lambda r: r.delete(self._rkey(key)))

    def keys(self, prefix: str = "runs/", suffix: str = "") -> list[str]:
        """Record keys under ``prefix`` ending with ``suffix`` (listed from the object store: authoritative)."""
        return [k for k in self.store.list(prefix) if k.endswith(suffix)]
