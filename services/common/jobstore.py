"""``JobStore``: JSON records (stage jobs, runs) in Redis, mirrored to the object store.

Each record is addressed by its object key (``runs/{run_id}/record.json``, ``runs/{run_id}/jobs/{stage}.json``).
``put`` writes the object store first (durable), then Redis (fast). Without Redis (no URL, or Redis down) it works
from the object store alone. ``update`` is a read-modify-write under a per-key lock (in-process; each record has a
single writer by design: a stage service for its jobs, the worker or the gateway, under the run's Redis lock, for
runs).

**Sequence numbers.** Every ``put`` sets ``record["write_seq"]`` to one more than the record's own value (as read)
and than any value this process wrote before, so each write of a record carries a larger number than the one it
replaces. ``get`` reads both copies (Redis first, then the object store) and returns the one with the larger
``write_seq`` (the object store's on a tie, since it is written first), then repairs the stale side: Redis with a
compare-and-set (it never replaces a newer value), the object store when its copy is older. So a Redis restarted
from an old AOF file, or a flushed one, can neither bring back an old state (a lost cancel, a finished stage run
again) nor lose anything. When the object store cannot be reached and Redis has the record, Redis's copy is
returned (reads keep working during an S3 outage; writes fail with UNAVAILABLE). See docs/services.md,
"Reliability".
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from cfrseg.errors import NotFoundError
from cfrseg.store import Store, check_key
from services.common.retry import StoreUnavailable, is_transient

log = logging.getLogger("cfrseg.services.jobstore")
Record = dict[str, Any]
SEQ = "write_seq"

#: SET KEYS[1] = ARGV[1] unless the stored record's write_seq is already > ARGV[2]; returns 1 when written.
_CAS_LUA = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, obj = pcall(cjson.decode, cur)
  if ok and type(obj) == 'table' and tonumber(obj['write_seq'] or 0) > tonumber(ARGV[2]) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""


class TornRecord(StoreUnavailable):
    """The object store's copy of a record could not be parsed (read while being replaced); retryable."""


def run_record_key(run_id: str) -> str:
    return f"runs/{run_id}/record.json"


def job_record_key(run_id: str, stage: str) -> str:
    return f"runs/{run_id}/jobs/{stage}.json"


def seq_of(record: Record | None) -> int:
    """The record's write sequence number (0 for records written before sequence numbers existed)."""
    try:
        return int((record or {}).get(SEQ, 0) or 0)
    except (TypeError, ValueError):
        return 0


class JobStore:
    def __init__(self, store: Store, redis: Any | None = None, namespace: str = "cfrseg") -> None:
        self.store = store
        # the comparison read when Redis already answered: one attempt, so reads stay fast during an S3 outage
        with_retry = getattr(store, "with_retry", None)
        self._quick = with_retry(0.0) if with_retry is not None else store
        self.redis = redis
        self.ns = namespace
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._written: dict[str, int] = {}   # key -> the last write_seq this process wrote
        self._cas = redis.register_script(_CAS_LUA) if redis is not None else None

    @classmethod
    def connect(cls, store: Store, redis_url: str, namespace: str = "cfrseg") -> JobStore:
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
        """Write ``record`` (object store, then Redis). Sets ``record["write_seq"]`` in place to the new number."""
        check_key(key)
        with self._guard:
            seq = max(seq_of(record), self._written.get(key, 0)) + 1
            self._written[key] = seq
        record[SEQ] = seq
        data = json.dumps(record, sort_keys=True).encode()
        self.store.put_bytes(key, data)
        self._redis(lambda r: r.set(self._rkey(key), data))

    def get(self, key: str) -> Record:
        """The newer of the Redis and object-store copies (NotFoundError when neither exists); see the module
        docstring."""
        check_key(key)
        rdata = self._redis(lambda r: r.get(self._rkey(key)))
        try:
            sdata = (self._quick if rdata is not None else self.store).get_bytes(key)
        except NotFoundError:
            sdata = None
        except Exception as e:
            if rdata is None or not is_transient(e):
                raise
            log.warning("object store unavailable reading %s (%s); using Redis's copy", key, e)
            return json.loads(rdata)
        if sdata is None:
            if rdata is None:
                raise NotFoundError(f"no record {key!r}")
            # only in Redis (lost from the object store, or deleted there a moment ago): not resurrected
            log.warning("record %s is in Redis but not in the object store", key)
            return json.loads(rdata)
        rrec = json.loads(rdata) if rdata is not None else None
        srec, sdata = self._parse_store_copy(key, sdata, rrec)
        if srec is None:  # the object store's copy stayed unreadable: Redis's copy is the record
            return rrec
        if rrec is not None and seq_of(rrec) > seq_of(srec):
            log.warning("object store copy of %s is older (write_seq %d < %d); repairing it from Redis",
                        key, seq_of(srec), seq_of(rrec))
            try:
                self.store.put_bytes(key, rdata)
            except Exception as e:  # noqa: BLE001  (best effort: the next write repairs it too)
                log.warning("could not repair %s in the object store: %s", key, e)
            return rrec
        if rdata != sdata:
            if rrec is not None and seq_of(rrec) < seq_of(srec):
                log.warning("redis copy of %s is stale (write_seq %d < %d); repairing it", key, seq_of(rrec),
                            seq_of(srec))
            self._redis(lambda r: self._cas(keys=[self._rkey(key)], args=[sdata, seq_of(srec)], client=r))
        return srec

    def _parse_store_copy(self, key: str, sdata: bytes, rrec: Record | None) -> tuple[Record | None, bytes]:
        """Parse the object store's copy; a torn read (some S3 servers expose a half-written object while it is
        being replaced) is read again a few times. Returns (record, the bytes it was parsed from), or (None, ...)
        when it stays unreadable and Redis has a copy; raises a retryable error when neither copy is readable."""
        for attempt in range(4):
            try:
                return json.loads(sdata), sdata
            except ValueError:
                if attempt == 3:
                    break
                time.sleep(0.05 * (attempt + 1))
                try:
                    sdata = self.store.get_bytes(key)
                except NotFoundError:
                    break
        if rrec is not None:
            log.warning("object store copy of %s is unreadable (torn read?); using Redis's copy", key)
            return None, sdata
        raise TornRecord(f"record {key!r} is being rewritten (unreadable object-store copy); retry")

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
