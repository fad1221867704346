"""Reliability of the local stack (fake stage double, slow enough to hit mid-stage), with Redis persisted in an
append-only file like compose's:

- Redis restarted from an OLD append-only file (while the stage services crash too): a cancel made after the
  snapshot is not lost, and a stage finished after it is not run again (sequence numbers, docs/services.md).
- The S3 server stopped for 30 s mid-stage, then restarted on the same port and data folder: the run finishes
  SUCCEEDED, no finished stage ran twice, nothing stored before was lost.

Stage attempt counters come from the stage job records in the object store; executions from the fake stage's
``executions.json``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time

import grpc
import pytest
from minio import Minio

from services.common.server import channel
from services.gen.cfrseg.v1.common_pb2 import ObjectRef, StartStageRequest
from services.gen.cfrseg.v1.finetune_pb2_grpc import FinetuneServiceStub
from services.sdk import Client, state_name
from tests.servers import run_redis
from tests.stack_helpers import (
    dump_logs,
    fault_stack,
    small_dataset,
    wait_until,
)
from tests.test_orchestrator_faults import executions, finish, stage_step

pytestmark = [pytest.mark.stack, pytest.mark.slow]
OUTAGE_S = 30.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    yield from fault_stack(tmp_path_factory, "reliab", redis_aof=True)


@pytest.fixture(scope="module")
def client(stack):
    with Client(stack.addr("gateway"), stack.token) as c:
        yield c


@pytest.fixture(scope="module")
def dataset(client, tmp_path_factory):
    return small_dataset(client, tmp_path_factory, "reliab")


def s3(stack) -> Minio:
    return Minio(stack.addr("s3"), access_key=stack.s3_access_key, secret_key=stack.s3_secret_key, secure=False,
                 region="us-east-1")


def job_record(stack, run_id: str, stage: str) -> dict:
    resp = s3(stack).get_object(stack.bucket, f"runs/{run_id}/jobs/{stage}.json")
    try:
        return json.loads(resp.read())
    finally:
        resp.close()
        resp.release_conn()


def stored(stack) -> dict[str, str]:
    """Every object in the bucket -> sha256 of its bytes."""
    c = s3(stack)
    out = {}
    for o in c.list_objects(stack.bucket, recursive=True):
        resp = c.get_object(stack.bucket, o.object_name)
        try:
            out[o.object_name] = hashlib.sha256(resp.read()).hexdigest()
        finally:
            resp.close()
            resp.release_conn()
    return out


def stage_state(client, run_id: str, stage: str) -> str:
    r = client.get_run(run_id)
    return state_name(next(s for s in r.stages if s.stage == stage).state)


def redis_record(stack, run_id: str) -> dict:
    import redis

    raw = redis.Redis(host="127.0.0.1", port=stack.ports["redis"]).get(f"cfrseg:rec:runs/{run_id}/record.json")
    return json.loads(raw) if raw else {}


def test_redis_restarted_from_an_old_aof_loses_no_cancel_and_reruns_no_stage(client, stack, dataset, tmp_path):
    g = client.submit_run(dataset.dataset_id, profile="tiny")               # will finish a stage after the snapshot
    wait_until(lambda: stage_step(client, g.run_id, "finetune") >= 2, 60, "finetune of G at step 2")
    c = client.submit_run(dataset.dataset_id, profile="tiny")               # waits for the finetune device
    wait_until(lambda: state_name(client.get_run(c.run_id).state) == "RUNNING", 30, "C running")
    aof = stack.dir / "redis" / "appendonlydir"
    snap = tmp_path / "aof-snapshot"
    shutil.copytree(aof, snap)                                               # Redis's state now (fsync always)
    client.cancel_run(c.run_id)                                              # then: a cancel...
    wait_until(lambda: state_name(client.get_run(c.run_id).state) == "CANCELLED", 60, "C cancelled")
    wait_until(lambda: stage_state(client, g.run_id, "finetune") == "SUCCEEDED"  # ...and a finished stage
               and stage_step(client, g.run_id, "pseudolabel") >= 1, 90, "G in pseudolabel")
    assert job_record(stack, g.run_id, "finetune")["attempt"] == 1
    # a crash of Redis and the stage services; Redis comes back from the OLD append-only file
    for name in ("redis", "finetune", "pseudolabel", "retrain"):
        stack.kill(name)
    shutil.rmtree(aof)
    shutil.copytree(snap, aof)
    # what Redis comes back with really is old (read from a copy: the restarted one is repaired on first read)
    shutil.copytree(snap, tmp_path / "verify" / "appendonlydir")
    with run_redis(tmp_path / "verify", aof=True) as probe:
        raw = probe.client().get(f"cfrseg:rec:runs/{c.run_id}/record.json")
        old = json.loads(raw) if raw else {}
    assert old and old["state"] not in ("CANCELLING", "CANCELLED") and not old["cancel_requested"]
    stack.start("redis")
    for name in ("finetune", "pseudolabel", "retrain"):
        stack.start(name)
    r = finish(client, stack, g.run_id, timeout=300)
    assert state_name(r.state) == "SUCCEEDED"
    assert len(executions(client, g.run_id, "finetune", tmp_path)) == 1
    assert job_record(stack, g.run_id, "finetune")["attempt"] == 1           # the finished stage never ran again
    assert job_record(stack, g.run_id, "retrain")["attempt"] == 1
    final_c = client.get_run(c.run_id)
    assert state_name(final_c.state) == "CANCELLED" and final_c.error.code == "CANCELLED"  # the cancel is kept
    assert not any(o.object_name.startswith(f"runs/{c.run_id}/finetune/")
                   for o in s3(stack).list_objects(stack.bucket, prefix=f"runs/{c.run_id}/", recursive=True))
    assert redis_record(stack, c.run_id)["state"] == "CANCELLED"             # Redis repaired on read


def test_s3_outage_mid_run(client, stack, dataset, tmp_path):
    before = stored(stack)
    run = client.submit_run(dataset.dataset_id, profile="tiny")
    wait_until(lambda: stage_step(client, run.run_id, "pseudolabel") >= 2, 90, "pseudolabel at step 2")
    stack.stop("s3")
    t0 = time.monotonic()
    # reads keep working from Redis while S3 is down; what needs S3 is UNAVAILABLE (retry later), not INTERNAL
    assert state_name(client.get_run(run.run_id).state) == "RUNNING"
    with pytest.raises(grpc.RpcError) as e:
        client.list_runs()
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
    ft = FinetuneServiceStub(channel(stack.addr("finetune"), stack.internal_token))
    with pytest.raises(grpc.RpcError) as e:
        ft.Start(StartStageRequest(run_id="run-new", config_json="{}",
                                   manifest=ObjectRef(key=f"runs/{run.run_id}/manifest.json")), timeout=20)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "object store" in e.value.details()
    assert time.monotonic() - t0 < OUTAGE_S - 5
    time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - t0)))
    stack.start("s3")                                                        # same port, same data folder
    r = finish(client, stack, run.run_id, timeout=240)
    assert state_name(r.state) == "SUCCEEDED" and r.metrics
    for stage in ("finetune", "retrain"):
        assert len(executions(client, run.run_id, stage, tmp_path)) == 1
        assert job_record(stack, run.run_id, stage)["attempt"] == 1
    pl = executions(client, run.run_id, "pseudolabel", tmp_path)
    assert len(pl) == 1 and pl[0]["start"] == 0, pl  # the running stage waited for S3 instead of failing
    assert job_record(stack, run.run_id, "pseudolabel")["attempt"] == 1
    after = stored(stack)
    lost = {k for k in before if k not in after}
    changed = {k for k in before if k in after and after[k] != before[k]}
    assert not lost and not changed, (lost, changed, dump_logs(stack))
