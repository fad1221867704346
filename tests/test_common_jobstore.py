"""JobStore: records in Redis mirrored to the object store; survives a Redis flush/restart and Redis down;
sequence numbers make a Redis restarted from an OLD append-only file harmless (the newer copy wins and repairs
the stale one)."""

from __future__ import annotations

import json
import shutil
import signal

import pytest

from cfrseg.errors import NotFoundError
from cfrseg.store import LocalStore
from services.common.jobstore import SEQ, JobStore, job_record_key, run_record_key
from services.common.s3store import S3Store
from services.common.settings import Settings
from tests.servers import bucket, free_port, redis_server, run_redis, s3_server  # noqa: F401

pytestmark = pytest.mark.stack


def _plain(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k != SEQ}


def test_put_get_mirror_and_fallback(redis_server, s3_server, bucket) -> None:
    store = S3Store.from_settings(Settings.from_env(s3_server.env(bucket)))
    store.ensure_bucket()
    js = JobStore.connect(store, redis_server.url, namespace=f"ns-{bucket}")
    key = run_record_key("r1")
    js.put(key, {"run_id": "r1", "state": "RUNNING"})
    assert json.loads(store.get_bytes(key)) == {"run_id": "r1", "state": "RUNNING", SEQ: 1}  # mirrored
    r = redis_server.client()
    assert r.get(f"ns-{bucket}:rec:{key}") is not None
    r.delete(f"ns-{bucket}:rec:{key}")  # Redis loses it (restart without persistence)
    assert js.get(key)["state"] == "RUNNING"  # from the object store...
    assert r.get(f"ns-{bucket}:rec:{key}") is not None  # ...and Redis is re-populated
    js.update(key, lambda rec: {**rec, "state": "SUCCEEDED"})
    assert js.get(key)["state"] == "SUCCEEDED" and js.get(key)[SEQ] == 2
    js.put(job_record_key("r1", "finetune"), {"state": "RUNNING"})
    assert js.keys("runs/", "record.json") == [key]
    assert js.find(run_record_key("nope")) is None
    with pytest.raises(NotFoundError):
        js.get(run_record_key("nope"))


def test_redis_restart_loses_nothing(tmp_path) -> None:
    store = LocalStore(tmp_path / "objects")
    with run_redis(tmp_path / "r1") as r1:
        js = JobStore.connect(store, r1.url)
        js.put(run_record_key("r2"), {"state": "QUEUED"})
    js.redis.connection_pool.disconnect()
    assert _plain(js.get(run_record_key("r2"))) == {"state": "QUEUED"}  # Redis down: object store only
    with run_redis(tmp_path / "r2") as r2:  # a fresh, empty Redis
        js2 = JobStore.connect(store, r2.url)
        assert _plain(js2.get(run_record_key("r2"))) == {"state": "QUEUED"}
        assert r2.client().get(f"cfrseg:rec:{run_record_key('r2')}") is not None


def test_without_redis(tmp_path) -> None:
    js = JobStore.connect(LocalStore(tmp_path), "")
    js.put("runs/r3/record.json", {"a": 1})
    assert js.get("runs/r3/record.json") == {"a": 1, SEQ: 1}
    js.delete("runs/r3/record.json")
    assert js.find("runs/r3/record.json") is None


def test_sequence_numbers_grow_on_every_write(tmp_path) -> None:
    js = JobStore.connect(LocalStore(tmp_path), "")
    key = run_record_key("s1")
    rec = {"state": "QUEUED"}
    js.put(key, rec)
    assert rec[SEQ] == 1  # set in place on the caller's record
    js.put(key, rec)
    js.put(key, rec)
    assert js.get(key)[SEQ] == 3
    js.put(key, {"state": "stale copy", SEQ: 1})  # a writer holding an old copy still writes a larger number
    assert js.get(key)[SEQ] == 4
    other = JobStore.connect(LocalStore(tmp_path), "")  # a restarted writer continues from the stored number
    r = other.get(key)
    other.put(key, r)
    assert other.get(key)[SEQ] == 5


def test_newer_copy_wins_and_repairs_the_stale_side(redis_server, tmp_path) -> None:
    store = LocalStore(tmp_path / "objects")
    ns = f"ns-{tmp_path.name}"
    js = JobStore.connect(store, redis_server.url, namespace=ns)
    r = redis_server.client()
    key = run_record_key("n1")
    old = {"state": "RUNNING"}
    js.put(key, old)
    old_bytes = r.get(f"{ns}:rec:{key}")
    js.put(key, {"state": "CANCELLING", "cancel_requested": True})
    # Redis goes back to the old state (e.g. restarted from an old append-only file)
    r.set(f"{ns}:rec:{key}", old_bytes)
    got = js.get(key)
    assert got["state"] == "CANCELLING" and got[SEQ] == 2
    assert json.loads(r.get(f"{ns}:rec:{key}"))["state"] == "CANCELLING"  # Redis repaired
    # the object store goes back instead (restored from an old backup): Redis's newer copy wins, S3 is repaired
    store.put_bytes(key, old_bytes)
    assert js.get(key)["state"] == "CANCELLING"
    assert json.loads(store.get_bytes(key))["state"] == "CANCELLING"
    # the repair of Redis never replaces a newer value (compare-and-set on write_seq)
    newer = json.dumps({"state": "CANCELLED", SEQ: 9}).encode()
    r.set(f"{ns}:rec:{key}", newer)
    assert js._cas(keys=[f"{ns}:rec:{key}"], args=[old_bytes, 1], client=r) == 0
    assert r.get(f"{ns}:rec:{key}") == newer


def test_reads_from_redis_while_the_object_store_is_down(redis_server, tmp_path) -> None:
    s = Settings.from_env({"CFRSEG_S3_ENDPOINT": f"127.0.0.1:{free_port()}", "CFRSEG_S3_ACCESS_KEY": "x",
                           "CFRSEG_S3_SECRET_KEY": "y" * 8, "CFRSEG_S3_RETRY_S": "0"})
    down = S3Store.from_settings(s)  # nothing listens there
    ns = f"ns-{tmp_path.name}"
    js = JobStore(down, redis_server.client(), namespace=ns)
    key = run_record_key("d1")
    redis_server.client().set(f"{ns}:rec:{key}", json.dumps({"state": "RUNNING", SEQ: 3}))
    assert js.get(key) == {"state": "RUNNING", SEQ: 3}  # S3 unreachable: Redis's copy
    from services.common.retry import StoreUnavailable

    with pytest.raises(StoreUnavailable):
        js.get(run_record_key("d2"))  # neither copy reachable: UNAVAILABLE, not "not found"
    with pytest.raises(StoreUnavailable):
        js.put(key, {"state": "CANCELLING"})  # writes need the durable copy


def _kill(srv) -> None:
    srv.proc.send_signal(signal.SIGKILL)
    srv.proc.wait()


def test_redis_restarted_from_an_old_aof_loses_no_cancel_and_no_finished_stage(tmp_path) -> None:
    """A real redis-server with AOF: snapshot its files, advance the records (cancel a run, finish a stage), then
    restart Redis from the OLD files: Redis really serves the old state, yet JobStore returns the newer records
    (and repairs Redis)."""
    store = LocalStore(tmp_path / "objects")
    rdir, snap = tmp_path / "redis", tmp_path / "snapshot"
    port = free_port()
    run_key, job_key = run_record_key("a1"), job_record_key("a1", "finetune")
    with run_redis(rdir, aof=True, port=port) as r1:
        js = JobStore.connect(store, r1.url)
        run = {"run_id": "a1", "state": "RUNNING", "cancel_requested": False}
        job = {"run_id": "a1", "stage": "finetune", "state": "RUNNING", "attempt": 1}
        js.put(run_key, run)
        js.put(job_key, job)
        assert r1.client().config_get("appendonly") == {"appendonly": "yes"}
        shutil.copytree(rdir / "appendonlydir", snap)  # the old state (appendfsync always: complete)
        js.put(run_key, {**run, "state": "CANCELLING", "cancel_requested": True})   # a cancel
        js.put(job_key, {**job, "state": "SUCCEEDED"})                              # a finished stage
        _kill(r1)
    shutil.rmtree(rdir / "appendonlydir")
    shutil.copytree(snap, rdir / "appendonlydir")
    with run_redis(rdir, aof=True, port=port) as r2:
        raw = r2.client()
        assert json.loads(raw.get(f"cfrseg:rec:{run_key}"))["state"] == "RUNNING"   # Redis came back OLD
        assert json.loads(raw.get(f"cfrseg:rec:{job_key}"))["state"] == "RUNNING"
        fresh = JobStore.connect(store, r2.url)  # a restarted process: nothing in memory
        got_run, got_job = fresh.get(run_key), fresh.get(job_key)
        assert got_run["state"] == "CANCELLING" and got_run["cancel_requested"] is True  # the cancel is kept
        assert got_job["state"] == "SUCCEEDED" and got_job["attempt"] == 1  # not to be run again
        assert json.loads(raw.get(f"cfrseg:rec:{run_key}"))["state"] == "CANCELLING"  # Redis repaired
        assert json.loads(raw.get(f"cfrseg:rec:{job_key}"))["state"] == "SUCCEEDED"
        js.redis = raw  # the old writer, reconnected, keeps numbering above what is stored
        js.put(run_key, {**got_run, "state": "CANCELLED"})
        assert fresh.get(run_key)[SEQ] > got_run[SEQ]


class _TornStore(LocalStore):
    """A store whose next ``torn`` reads return a half-written object (as some S3 servers do mid-replace)."""

    torn = 0

    def get_bytes(self, key: str) -> bytes:
        data = super().get_bytes(key)
        if self.torn > 0:
            self.torn -= 1
            return data[: len(data) // 2]
        return data


def test_torn_object_store_reads_are_read_again_or_served_from_redis(redis_server, tmp_path) -> None:
    from services.common.jobstore import TornRecord
    from services.common.retry import is_transient

    store = _TornStore(tmp_path / "objects")
    js = JobStore.connect(store, redis_server.url, namespace="torn")
    key = run_record_key("t1")
    js.put(key, {"state": "RUNNING"})
    store.torn = 2  # two torn reads, then a whole one: read again, same record, Redis left intact
    assert _plain(js.get(key)) == {"state": "RUNNING"}
    assert json.loads(redis_server.client().get(f"torn:rec:{key}"))["state"] == "RUNNING"
    store.torn = 10  # stays torn: Redis's copy is the answer
    assert _plain(js.get(key)) == {"state": "RUNNING"}
    store.torn = 0
    js.redis.delete(f"torn:rec:{key}")
    store.torn = 10  # torn and no Redis copy: a retryable error, not a JSONDecodeError
    with pytest.raises(TornRecord) as e:
        js.get(key)
    assert is_transient(e.value)
    store.torn = 0
    assert _plain(js.get(key)) == {"state": "RUNNING"}
