"""The stage services as real processes (``python -m services.<stage>``) against real Redis and S3 servers:
Start idempotency, busy device, Watch streaming, Get, Cancel, retry, kill -9 + restart resume, SIGTERM,
bad input, auth on every RPC, health, and retrain's Segment.

The stage function is a TEST DOUBLE (``fake_stage`` below, plugged in with CFRSEG_STAGE_IMPL): it does not
train anything; it counts steps, writes a checkpoint per step to its store and resumes from it, like the core
stages do.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from cfrseg.errors import Cancelled, InputError
from cfrseg.progress import ProgressEvent
from services.common.s3store import S3Store
from services.common.server import channel
from services.common.settings import Settings
from services.gen.cfrseg.v1 import common_pb2 as pb
from services.gen.cfrseg.v1 import finetune_pb2_grpc, retrain_pb2, retrain_pb2_grpc
from tests.servers import (ServiceProcess, free_port, health_ok, redis_server, s3_server,  # noqa: F401
                           start_service)

pytestmark = pytest.mark.stack
TOKEN = "internal-" + uuid.uuid4().hex
S = pb  # states
WATCH_TIMEOUT = 60


# ------------------------------------------------------------------ test doubles (not production code)

def fake_stage(ctx) -> dict:
    """TEST DOUBLE of a core stage: ``steps`` steps of ``step_s`` seconds; checkpoint.json after each step;
    resumes from it; records where each execution started in starts.json; fails on request."""
    cfg = ctx.config
    steps, step_s = int(cfg.get("steps", 10)), float(cfg.get("step_s", 0.02))
    start = json.loads(ctx.store.get_bytes("checkpoint.json"))["step"] if ctx.store.exists("checkpoint.json") else 0
    starts = json.loads(ctx.store.get_bytes("starts.json")) if ctx.store.exists("starts.json") else []
    ctx.store.put_bytes("starts.json", json.dumps(starts + [start]).encode())
    sizes = sum(Path(c.image).stat().st_size for c in ctx.manifest.cases)  # inputs are local files
    for step in range(start + 1, steps + 1):
        if ctx.cancel.is_set():
            raise Cancelled(f"{ctx.stage} cancelled")
        if step == cfg.get("fail_at"):
            if cfg.get("fail_kind") == "input":
                raise InputError(f"case c1: bad label values at step {step}")
            raise RuntimeError("something broke")
        time.sleep(step_s)
        ctx.store.put_bytes("checkpoint.json", json.dumps({"step": step}).encode())
        ctx.progress(ProgressEvent(ctx.stage, step, steps, {"loss": 1.0 / step}, f"step {step}",
                                   eta_s=(steps - step) * step_s))
    ctx.store.put_bytes("artifact.txt", b"trained")
    return {"steps": steps, "input_bytes": sizes}


def fake_segment(model_dir: Path, image: Path, out: Path, overrides: dict, device: str) -> dict:
    """TEST DOUBLE of segmentation: the 'label' is the image bytes reversed."""
    assert (model_dir / "model.pt").read_bytes() == b"model"
    out.write_bytes(image.read_bytes()[::-1])
    return {"num_classes": 2}


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def env(s3_server, redis_server) -> dict[str, str]:
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    e = {**s3_server.env(bucket), "CFRSEG_REDIS_URL": redis_server.url, "CFRSEG_INTERNAL_TOKEN": TOKEN,
         "CFRSEG_STAGE_IMPL": "tests.test_stage_services:fake_stage",
         "CFRSEG_SEGMENT_IMPL": "tests.test_stage_services:fake_segment"}
    store = S3Store.from_settings(Settings.from_env(e))
    store.ensure_bucket()
    store.put_bytes("datasets/d1/images/c1.nii.gz", b"image-1")
    store.put_bytes("datasets/d1/images/c2.nii.gz", b"image-22")
    store.put_bytes("datasets/d1/labels/c1.nii.gz", b"label-1")
    store.put_bytes("datasets/d1/manifest.json", json.dumps({"name": "d1", "num_classes": 2, "cases": [
        {"case_id": "c1", "image": "datasets/d1/images/c1.nii.gz", "label": "datasets/d1/labels/c1.nii.gz"},
        {"case_id": "c2", "image": "datasets/d1/images/c2.nii.gz", "role": "unlabeled"}]}).encode())
    return e


@pytest.fixture(scope="module")
def store(env) -> S3Store:
    return S3Store.from_settings(Settings.from_env(env))


@pytest.fixture(scope="module")
def finetune(env, tmp_path_factory) -> Iterator[ServiceProcess]:
    svc = start_service("services.finetune", {**env, "CFRSEG_WORKDIR": str(tmp_path_factory.mktemp("work"))})
    yield svc
    svc.stop()


def stub(addr: str, token: str = TOKEN, cls=finetune_pb2_grpc.FinetuneServiceStub):
    return cls(channel(addr, token))


def start_req(run_id: str, **cfg) -> pb.StartStageRequest:
    return pb.StartStageRequest(run_id=run_id, config_json=json.dumps(cfg),
                                manifest=pb.ObjectRef(key="datasets/d1/manifest.json"))


def watch(st, run_id: str, until=None) -> list[pb.ProgressEvent]:
    """Events until the stream ends (or ``until(event)`` is true)."""
    out = []
    for ev in st.Watch(pb.WatchRequest(run_id=run_id), timeout=WATCH_TIMEOUT):
        out.append(ev)
        if until is not None and until(ev):
            break
    return out


def code_of(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code()


# ------------------------------------------------------------------ tests

def test_start_is_idempotent_and_watch_streams(finetune, store) -> None:
    st = stub(finetune.addr)
    job = st.Start(start_req("r1", steps=30, step_s=0.03), timeout=10)
    assert job.state in (S.STAGE_STATE_PENDING, S.STAGE_STATE_RUNNING) and job.attempt == 1
    assert job.output_prefix == "runs/r1/finetune/"
    again = st.Start(start_req("r1", steps=30, step_s=0.03), timeout=10)  # attaches
    assert again.attempt == 1 and again.run_id == "r1"
    assert code_of(lambda: st.Start(start_req("r1", steps=31), timeout=10)) == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(lambda: st.Start(start_req("r2", steps=3), timeout=10)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    events = watch(st, "r1")
    seqs = [e.seq for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert events[-1].state == S.STAGE_STATE_SUCCEEDED
    steps = [e.step for e in events if e.state == S.STAGE_STATE_RUNNING and e.step]
    assert steps and steps[-1] == 30 and steps == sorted(steps)
    ran = [e for e in events if e.losses]
    assert ran and ran[-1].losses["loss"] == pytest.approx(1 / 30) and ran[-1].total == 30
    done = st.Get(pb.GetRequest(run_id="r1"), timeout=10)
    assert done.state == S.STAGE_STATE_SUCCEEDED and done.step == 30 and done.finished.seconds > 0
    keys = {o.key: o for o in done.outputs}
    art = keys["runs/r1/finetune/artifact.txt"]
    assert art.sha256 == hashlib.sha256(b"trained").hexdigest() and art.size == 7
    assert json.loads(done.result_json) == {"steps": 30, "input_bytes": len(b"image-1") + len(b"image-22")}
    # finished stays finished: a repeated Start never re-runs it
    assert st.Start(start_req("r1", steps=30, step_s=0.03), timeout=10).state == S.STAGE_STATE_SUCCEEDED
    assert json.loads(store.get_bytes("runs/r1/finetune/starts.json")) == [0]
    final = watch(st, "r1")  # Watch on a finished job replays its final state and ends
    assert final[-1].state == S.STAGE_STATE_SUCCEEDED
    # the record is mirrored to the object store
    assert json.loads(store.get_bytes("runs/r1/jobs/finetune.json"))["state"] == "SUCCEEDED"
    # the device is free again
    assert st.Start(start_req("r2", steps=2, step_s=0.01), timeout=10).run_id == "r2"
    assert watch(st, "r2")[-1].state == S.STAGE_STATE_SUCCEEDED


def test_cancel_then_retry_resumes(finetune, store) -> None:
    st = stub(finetune.addr)
    st.Start(start_req("c1", steps=60, step_s=0.03), timeout=10)
    watch(st, "c1", until=lambda e: e.step >= 3)
    st.Cancel(pb.CancelRequest(run_id="c1"), timeout=10)
    assert watch(st, "c1")[-1].state == S.STAGE_STATE_CANCELLED
    job = st.Get(pb.GetRequest(run_id="c1"), timeout=10)
    assert job.state == S.STAGE_STATE_CANCELLED and 3 <= job.step < 60
    # cancelled stays cancelled on a plain Start; retry resumes from the checkpoint
    assert st.Start(start_req("c1", steps=60, step_s=0.03), timeout=10).state == S.STAGE_STATE_CANCELLED
    r = pb.StartStageRequest(run_id="c1", config_json=json.dumps({"steps": 60, "step_s": 0.03}),
                             manifest=pb.ObjectRef(key="datasets/d1/manifest.json"), retry=True)
    assert st.Start(r, timeout=10).attempt == 2
    assert watch(st, "c1")[-1].state == S.STAGE_STATE_SUCCEEDED
    starts = json.loads(store.get_bytes("runs/c1/finetune/starts.json"))
    assert starts[0] == 0 and starts[1] >= 3
    assert st.Cancel(pb.CancelRequest(run_id="c1"), timeout=10).state == S.STAGE_STATE_SUCCEEDED  # no-op


def test_bad_input_and_failures(finetune, store) -> None:
    st = stub(finetune.addr)
    I = grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: st.Start(start_req("bad/id"), timeout=10)) == I
    assert code_of(lambda: st.Start(pb.StartStageRequest(run_id="x1", config_json="{nope"), timeout=10)) == I
    assert code_of(lambda: st.Start(pb.StartStageRequest(run_id="x1", config_json="[1]",
                                                         manifest=pb.ObjectRef(key="m")), timeout=10)) == I
    assert code_of(lambda: st.Start(pb.StartStageRequest(run_id="x1", config_json="{}"), timeout=10)) == I
    missing = pb.StartStageRequest(run_id="x1", config_json="{}", manifest=pb.ObjectRef(key="datasets/no/m.json"))
    assert code_of(lambda: st.Start(missing, timeout=10)) == grpc.StatusCode.NOT_FOUND
    wrong_sha = pb.StartStageRequest(run_id="x1", config_json="{}",
                                     manifest=pb.ObjectRef(key="datasets/d1/manifest.json", sha256="0" * 64))
    assert code_of(lambda: st.Start(wrong_sha, timeout=10)) == I
    escape = pb.StartStageRequest(run_id="x1", config_json="{}", manifest=pb.ObjectRef(key="datasets/d1/manifest.json"),
                                  inputs={"finetuned": "../other"})
    assert code_of(lambda: st.Start(escape, timeout=10)) == I
    assert code_of(lambda: st.Get(pb.GetRequest(run_id="unknown"), timeout=10)) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: list(st.Watch(pb.WatchRequest(run_id="unknown"), timeout=10))) == \
        grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: st.Cancel(pb.CancelRequest(run_id="unknown"), timeout=10)) == grpc.StatusCode.NOT_FOUND
    # a stage raising InputError fails with INVALID_ARGUMENT and its message; a crash with INTERNAL + error id
    st.Start(start_req("f1", steps=5, step_s=0.01, fail_at=3, fail_kind="input"), timeout=10)
    assert watch(st, "f1")[-1].state == S.STAGE_STATE_FAILED
    job = st.Get(pb.GetRequest(run_id="f1"), timeout=10)
    assert job.error.code == "INVALID_ARGUMENT" and "bad label values" in job.error.message
    st.Start(start_req("f2", steps=5, step_s=0.01, fail_at=2), timeout=10)
    assert watch(st, "f2")[-1].state == S.STAGE_STATE_FAILED
    job = st.Get(pb.GetRequest(run_id="f2"), timeout=10)
    assert job.error.code == "INTERNAL" and job.error.error_id and "something broke" not in job.error.message
    assert job.error.error_id in finetune.output()  # logged with its traceback


def test_auth_on_every_rpc(finetune, env, tmp_path) -> None:
    for token in ("", "wrong", TOKEN + "x"):
        st = stub(finetune.addr, token)
        calls = [lambda: st.Start(start_req("a1"), timeout=5), lambda: st.Get(pb.GetRequest(run_id="r1"), timeout=5),
                 lambda: list(st.Watch(pb.WatchRequest(run_id="r1"), timeout=5)),
                 lambda: st.Cancel(pb.CancelRequest(run_id="r1"), timeout=5)]
        for call in calls:
            assert code_of(call) == grpc.StatusCode.UNAUTHENTICATED
    assert health_ok(finetune.addr) and health_ok(finetune.addr, "cfrseg.v1.FinetuneService")


def test_kill9_restart_resumes(env, store, tmp_path) -> None:
    port = free_port()
    e = {**env, "CFRSEG_WORKDIR": str(tmp_path / "work")}
    svc = start_service("services.pseudolabel", e, port=port, log_dir=tmp_path)
    req = start_req("k1", steps=40, step_s=0.05)
    req.inputs["finetuned"] = "runs/k1/finetune/"
    from services.gen.cfrseg.v1 import pseudolabel_pb2_grpc

    try:
        st = stub(svc.addr, cls=pseudolabel_pb2_grpc.PseudolabelServiceStub)
        st.Start(req, timeout=10)
        watch(st, "k1", until=lambda ev: ev.step >= 8)
        svc.kill()  # kill -9: no cleanup, the record still says RUNNING
        svc = start_service("services.pseudolabel", e, port=port, log_dir=tmp_path)
        st = stub(svc.addr, cls=pseudolabel_pb2_grpc.PseudolabelServiceStub)
        stale = st.Get(pb.GetRequest(run_id="k1"), timeout=10)
        assert stale.state == S.STAGE_STATE_RUNNING and stale.attempt == 1
        job = st.Start(req, timeout=10)  # the orchestrator's retry resumes it
        assert job.attempt == 2
        assert watch(st, "k1")[-1].state == S.STAGE_STATE_SUCCEEDED
        starts = json.loads(store.get_bytes("runs/k1/pseudolabel/starts.json"))
        assert starts[0] == 0 and 8 <= starts[1] < 40, starts  # continued from the checkpoint
        # SIGTERM stops gracefully: a running job checkpoints and stays RUNNING, to be resumed later
        req2 = start_req("k2", steps=200, step_s=0.05)
        req2.inputs["finetuned"] = "runs/k2/finetune/"
        st.Start(req2, timeout=10)
        watch(st, "k2", until=lambda ev: ev.step >= 2)
        assert svc.stop() == 0
        rec = json.loads(store.get_bytes("runs/k2/jobs/pseudolabel.json"))
        assert rec["state"] == "RUNNING" and "interrupted" in rec["message"]
    finally:
        svc.stop()


def test_retrain_segment(env, store, tmp_path) -> None:
    svc = start_service("services.retrain", {**env, "CFRSEG_WORKDIR": str(tmp_path / "work")}, log_dir=tmp_path)
    try:
        st = stub(svc.addr, cls=retrain_pb2_grpc.RetrainServiceStub)
        store.put_bytes("runs/m1/retrain/model.pt", b"model")
        store.put_bytes("uploads/u1/volume.nii.gz", b"volume-bytes")
        sha = hashlib.sha256(b"volume-bytes").hexdigest()
        req = retrain_pb2.SegmentVolumeRequest(model_id="m1", volume=pb.ObjectRef(key="uploads/u1/volume.nii.gz",
                                                                                  sha256=sha))
        r = st.Segment(req, timeout=30)
        assert r.label.key == f"segmentations/m1/{sha}/label.nii.gz" and r.num_classes == 2
        assert store.get_bytes(r.label.key) == b"volume-bytes"[::-1]
        assert r.label.sha256 == hashlib.sha256(b"volume-bytes"[::-1]).hexdigest()
        assert st.Segment(req, timeout=30).label == r.label  # same volume + model: same key
        bad = retrain_pb2.SegmentVolumeRequest(model_id="nope", volume=req.volume)
        assert code_of(lambda: st.Segment(bad, timeout=10)) == grpc.StatusCode.NOT_FOUND
        bad = retrain_pb2.SegmentVolumeRequest(model_id="m1", volume=pb.ObjectRef(key=req.volume.key, sha256="0"))
        assert code_of(lambda: st.Segment(bad, timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT
        bad = retrain_pb2.SegmentVolumeRequest(model_id="m1", volume=pb.ObjectRef(key="uploads/u1/volume.txt"))
        assert code_of(lambda: st.Segment(bad, timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(lambda: stub(svc.addr, "wrong", retrain_pb2_grpc.RetrainServiceStub).Segment(req, timeout=5)) \
            == grpc.StatusCode.UNAUTHENTICATED
    finally:
        svc.stop()
