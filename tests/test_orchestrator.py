"""The run-advancing step (services.orchestrator.engine) against in-memory stage stubs: no servers, fast."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest

from cfrseg.store import LocalStore
from services.gen.cfrseg.v1 import common_pb2
from services.orchestrator import engine
from services.orchestrator.records import new_run_record

S = common_pb2.StageState


class RpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class FakeStage:
    """A stage service: each Start advances the job by one poll; ``script`` lists states to go through."""

    def __init__(self, name: str, script: list[Any]) -> None:
        self.name = name
        self.script = list(script)
        self.starts: list[common_pb2.StartStageRequest] = []
        self.cancels = 0

    def Start(self, req, timeout=None):
        self.starts.append(req)
        item = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(item, Exception):
            raise item
        state, extra = item if isinstance(item, tuple) else (item, {})
        return common_pb2.StageJob(run_id=req.run_id, stage=self.name, state=state, step=3, total=5,
                                   attempt=1, **extra)

    def Cancel(self, req, timeout=None):
        self.cancels += 1
        return common_pb2.StageJob(run_id=req.run_id, stage=self.name, state=S.Value("STAGE_STATE_CANCELLED"))


def record(test=()) -> dict:
    return new_run_record(run_id="r1", name="n", dataset_id="ds-1", profile="tiny", ssl_method="mt",
                          labeled=["a"], unlabeled=["b"], test=list(test),
                          configs={"finetune": {}, "pseudolabel": {}, "retrain": {"network": "tiny"}},
                          manifest_key="runs/r1/manifest.json")


def env_for(tmp_path, stages: dict[str, FakeStage]) -> engine.Env:
    return engine.Env(store=LocalStore(tmp_path), stubs=stages, max_backoff_s=2.0, unavailable_limit_s=60.0)


def run_steps(rec: dict, env: engine.Env, limit: int = 50) -> list[float | None]:
    delays = []
    for _ in range(limit):
        d = engine.step(rec, env)
        delays.append(d)
        if d is None:
            break
    return delays


RUNNING, DONE = S.Value("STAGE_STATE_RUNNING"), S.Value("STAGE_STATE_SUCCEEDED")
FAILED = S.Value("STAGE_STATE_FAILED")


def stages_ok() -> dict[str, FakeStage]:
    return {s: FakeStage(s, [RUNNING, RUNNING, DONE]) for s in ("finetune", "pseudolabel", "retrain")}


def test_run_goes_through_all_stages_in_order_with_inputs(tmp_path):
    st = stages_ok()
    rec = record()
    run_steps(rec, env_for(tmp_path, st))
    assert rec["state"] == "SUCCEEDED"
    assert [rec["stages"][s]["state"] for s in engine.STAGES] == ["SUCCEEDED"] * 4
    assert rec["model_id"] == "r1" and rec["model"]["network"] == "tiny"
    assert dict(st["pseudolabel"].starts[0].inputs) == {"finetuned": "runs/r1/finetune/"}
    assert dict(st["retrain"].starts[0].inputs) == {"pseudo_labels": "runs/r1/pseudolabel/labels/"}
    assert (tmp_path / "runs/r1/report.md").is_file()
    # a finished stage is never started again: each got exactly its three polls
    assert [len(st[s].starts) for s in ("finetune", "pseudolabel", "retrain")] == [3, 3, 3]


def test_repeated_step_after_success_does_not_restart_finished_stages(tmp_path):
    st = stages_ok()
    rec = record()
    env = env_for(tmp_path, st)
    while rec["stages"]["pseudolabel"]["state"] != "SUCCEEDED":
        engine.step(rec, env)
    n_ft = len(st["finetune"].starts)
    snapshot = json.loads(json.dumps(rec))
    engine.step(snapshot, env)  # a redelivered copy of a step from the same record
    engine.step(rec, env)
    assert len(st["finetune"].starts) == n_ft and len(st["pseudolabel"].starts) == 3


def test_unavailable_service_is_waited_for_then_resumed(tmp_path):
    st = stages_ok()
    st["finetune"] = FakeStage("finetune", [RpcError(grpc.StatusCode.UNAVAILABLE, "down")] * 3 + [RUNNING, DONE])
    rec = record()
    delays = run_steps(rec, env_for(tmp_path, st))
    assert rec["state"] == "SUCCEEDED"
    assert delays[:3] == [0.5, 1.0, 2.0]  # exponential backoff, capped at max_backoff_s


def test_unavailable_for_too_long_fails_the_run(tmp_path):
    st = stages_ok()
    st["finetune"] = FakeStage("finetune", [RpcError(grpc.StatusCode.UNAVAILABLE, "down")])
    t = [1000.0]
    env = env_for(tmp_path, st)
    env.clock = lambda: t[0]
    rec = record()
    for _ in range(5):
        if engine.step(rec, env) is None:
            break
        t[0] += 30
    assert rec["state"] == "FAILED" and rec["error"]["code"] == "UNAVAILABLE"
    assert "unreachable" in rec["error"]["message"]


def test_failed_stage_is_resumed_with_retry_then_gives_up(tmp_path):
    err = common_pb2.ErrorInfo(code="INTERNAL", message="boom")
    st = stages_ok()
    st["finetune"] = FakeStage("finetune", [(FAILED, {"error": err})])
    rec = record()
    run_steps(rec, env_for(tmp_path, st))
    assert rec["state"] == "FAILED" and rec["error"]["stage"] == "finetune"
    assert [r.retry for r in st["finetune"].starts] == [False, True, True]


def test_bad_input_failure_is_not_retried(tmp_path):
    err = common_pb2.ErrorInfo(code="INVALID_ARGUMENT", message="label geometry differs")
    st = stages_ok()
    st["finetune"] = FakeStage("finetune", [(FAILED, {"error": err})])
    rec = record()
    run_steps(rec, env_for(tmp_path, st))
    assert rec["error"] == {"code": "INVALID_ARGUMENT", "message": "finetune: label geometry differs",
                            "error_id": "", "stage": "finetune"}
    assert len(st["finetune"].starts) == 1


def test_busy_device_waits(tmp_path):
    st = stages_ok()
    st["finetune"] = FakeStage("finetune", [RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy"), DONE])
    rec = record()
    assert engine.step(rec, env_for(tmp_path, st)) == 0.5
    assert "waiting for the finetune device" in rec["stages"]["finetune"]["message"]
    run_steps(rec, env_for(tmp_path, st))
    assert rec["state"] == "SUCCEEDED"


def test_cancel_running_stage(tmp_path):
    st = stages_ok()
    rec = record()
    env = env_for(tmp_path, st)
    engine.step(rec, env)
    rec["cancel_requested"] = True
    rec["state"] = "CANCELLING"
    assert engine.step(rec, env) is None
    assert st["finetune"].cancels == 1
    assert rec["state"] == "CANCELLED" and rec["stages"]["finetune"]["state"] == "CANCELLED"
    assert rec["stages"]["retrain"]["state"] == "CANCELLED"


def test_cancel_before_start(tmp_path):
    st = stages_ok()
    rec = record()
    rec["cancel_requested"] = True
    assert engine.step(rec, env_for(tmp_path, st)) is None
    assert rec["state"] == "CANCELLED" and st["finetune"].cancels == 0 and not st["finetune"].starts


def test_seq_increases_only_on_visible_change(tmp_path):
    st = stages_ok()
    st["finetune"] = FakeStage("finetune", [RUNNING, RUNNING, RUNNING, DONE])
    rec = record()
    env = env_for(tmp_path, st)
    engine.step(rec, env)
    s1 = rec["seq"]
    engine.step(rec, env)
    assert rec["seq"] == s1  # same progress: no event
    assert s1 >= 1


@pytest.mark.parametrize("bad", ["../x", "", "a/b", "x" * 65])
def test_run_ids_are_checked(bad):
    from cfrseg.errors import InputError
    from services.orchestrator.records import run_key

    with pytest.raises(InputError):
        run_key(bad)
