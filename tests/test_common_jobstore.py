"""JobStore: records in Redis mirrored to the object store; survives a Redis flush/restart and Redis down."""

from __future__ import annotations

import json

import pytest

from cfrseg.errors import NotFoundError
from cfrseg.store import LocalStore
from services.common.jobstore import JobStore, job_record_key, run_record_key
from services.common.s3store import S3Store
from services.common.settings import Settings
from tests.servers import bucket, redis_server, run_redis, s3_server  # noqa: F401

pytestmark = pytest.mark.stack


def test_put_get_mirror_and_fallback(redis_server, s3_server, bucket) -> None:
    store = S3Store.from_settings(Settings.from_env(s3_server.env(bucket)))
    store.ensure_bucket()
    js = JobStore.connect(store, redis_server.url, namespace=f"ns-{bucket}")
    key = run_record_key("r1")
    js.put(key, {"run_id": "r1", "state": "RUNNING"})
    assert json.loads(store.get_bytes(key)) == {"run_id": "r1", "state": "RUNNING"}  # mirrored
    r = redis_server.client()
    assert r.get(f"ns-{bucket}:rec:{key}") is not None
    r.delete(f"ns-{bucket}:rec:{key}")  # Redis loses it (restart without persistence)
    assert js.get(key)["state"] == "RUNNING"  # from the object store...
    assert r.get(f"ns-{bucket}:rec:{key}") is not None  # ...and Redis is re-populated
    js.update(key, lambda rec: {**rec, "state": "SUCCEEDED"})
    assert js.get(key)["state"] == "SUCCEEDED"
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
    assert js.get(run_record_key("r2")) == {"state": "QUEUED"}  # Redis down: object store only
    with run_redis(tmp_path / "r2") as r2:  # a fresh, empty Redis
        js2 = JobStore.connect(store, r2.url)
        assert js2.get(run_record_key("r2")) == {"state": "QUEUED"}
        assert r2.client().get(f"cfrseg:rec:{run_record_key('r2')}") is not None


def test_without_redis(tmp_path) -> None:
    js = JobStore.connect(LocalStore(tmp_path), "")
    js.put("runs/r3/record.json", {"a": 1})
    assert js.get("runs/r3/record.json") == {"a": 1}
    js.delete("runs/r3/record.json")
    assert js.find("runs/r3/record.json") is None
