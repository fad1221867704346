"""Faults on a real local stack (fake stage double, slow enough to hit mid-stage): kill -9 of a stage service, of the
worker, and a Redis restart. Each run must finish, no finished stage may run twice, and an interrupted stage must
resume from its checkpoint."""

from __future__ import annotations

import json
import time

import pytest

from services.sdk import Client, state_name
from tests.stack_helpers import (
    dump_logs,
    fault_stack,
    small_dataset,
    wait_until,
)

pytestmark = [pytest.mark.stack, pytest.mark.slow]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    yield from fault_stack(tmp_path_factory, "faults")


@pytest.fixture(scope="module")
def client(stack):
    with Client(stack.addr("gateway"), stack.token) as c:
        yield c


@pytest.fixture(scope="module")
def dataset(client, tmp_path_factory):
    return small_dataset(client, tmp_path_factory, "faults")


def executions(client, run_id, stage, tmp_path) -> list[dict]:
    p = client.download_artifact(run_id, f"{stage}/executions.json", tmp_path / f"{stage}.json")
    return json.loads(p.read_text())


def stage_step(client, run_id, stage) -> int:
    r = client.get_run(run_id)
    st = next(s for s in r.stages if s.stage == stage)
    return st.step if r.stage == stage and st.total else -1


def finish(client, stack, run_id, timeout=150):
    try:
        r = client.wait_run(run_id, timeout=timeout)
    except Exception as e:  # noqa: BLE001
        raise AssertionError(f"{e}\n{client.get_run(run_id)}\n{dump_logs(stack)}") from None
    assert state_name(r.state) == "SUCCEEDED", f"{r}\n{dump_logs(stack)}"
    return r


def test_kill_stage_service_mid_stage(client, stack, dataset, tmp_path):
    run = client.submit_run(dataset.dataset_id, profile="tiny")
    wait_until(lambda: stage_step(client, run.run_id, "pseudolabel") >= 2, 60, "pseudolabel at step 2")
    stack.kill("pseudolabel")
    time.sleep(1.0)
    stack.start("pseudolabel")
    r = finish(client, stack, run.run_id)
    attempts = {s.stage: s.attempt for s in r.stages if s.stage != "evaluate"}
    assert attempts == {"finetune": 1, "pseudolabel": 2, "retrain": 1}, r.stages  # as GetRun reports them
    pl = executions(client, run.run_id, "pseudolabel", tmp_path)
    assert len(pl) == 2 and pl[0]["start"] == 0 and pl[1]["start"] >= 2, pl  # resumed from its checkpoint
    for stage in ("finetune", "retrain"):
        assert len(executions(client, run.run_id, stage, tmp_path)) == 1  # finished stages never ran twice


def test_kill_worker_redelivers_the_step(client, stack, dataset, tmp_path):
    run = client.submit_run(dataset.dataset_id, profile="tiny")
    wait_until(lambda: stage_step(client, run.run_id, "finetune") >= 1, 60, "finetune running")
    stack.kill("worker")
    t0 = time.monotonic()
    time.sleep(1.0)
    stack.start("worker")
    finish(client, stack, run.run_id)
    assert time.monotonic() - t0 < 120
    for stage in ("finetune", "pseudolabel", "retrain"):
        assert len(executions(client, run.run_id, stage, tmp_path)) == 1


def test_redis_restart_loses_no_run(client, stack, dataset, tmp_path):
    before = {r.run_id: state_name(r.state) for r in client.list_runs()}
    run = client.submit_run(dataset.dataset_id, profile="tiny")
    wait_until(lambda: stage_step(client, run.run_id, "finetune") >= 1, 60, "finetune running")
    old_server = _redis(stack).info("server")["run_id"]
    assert not before or any(rid.encode() in k for rid in before for k in _redis_keys(stack))  # old runs cached
    stack.kill("redis")
    stack.start("redis")
    assert stack._redis_ping() and not stack.procs["redis"].poll()
    assert _redis(stack).info("server")["run_id"] != old_server  # a new Redis process, started without persistence
    # The running worker may already have written the live run back, so only the finished runs are checked here.
    assert not [k for k in _redis_keys(stack) if any(rid.encode() in k for rid in before)]  # their cache is gone
    after = {r.run_id: state_name(r.state) for r in client.list_runs()}
    assert {k: after[k] for k in before} == before  # every record came back from the object store
    finish(client, stack, run.run_id, timeout=180)
    for stage in ("finetune", "pseudolabel", "retrain"):
        assert len(executions(client, run.run_id, stage, tmp_path)) == 1


def _redis(stack):
    import redis

    return redis.Redis(host="127.0.0.1", port=stack.ports["redis"])


def _redis_keys(stack) -> list[bytes]:
    return list(_redis(stack).keys("cfrseg:rec:*"))
