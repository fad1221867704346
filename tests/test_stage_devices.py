"""Weights and devices checked at start, and one job per device across processes (services/common/weights.py,
services/common/device.py), with the stage services as real processes against real Redis and S3 servers.

The stage function is the TEST DOUBLE of tests/test_stage_services.py (counts steps, checkpoints; trains
nothing). CPU only here: the device lock applies to the CPU when CFRSEG_LOCK_DIR is set, so contention is
tested with real processes without CUDA; the CUDA-only checks skip without a GPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest

from cfrseg.errors import ConfigError
from cfrseg.sam import weights as core_weights
from services.common import weights as svc_weights
from services.common.device import DeviceLock, release_memory, service_device
from services.common.s3store import S3Store
from services.common.settings import Settings
from services.gen.cfrseg.v1 import common_pb2 as pb
from services.gen.cfrseg.v1 import pseudolabel_pb2_grpc, retrain_pb2, retrain_pb2_grpc
from tests.servers import ROOT, free_port, health_ok, redis_server, s3_server, start_service, wait_for  # noqa: F401
from tests.test_stage_services import TOKEN, code_of, start_req, stub, watch

pytestmark = pytest.mark.stack
S = pb
HAVE_CUDA = False
try:
    import torch

    HAVE_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    pass


# ------------------------------------------------------------------ units: weights

@pytest.fixture
def fake_weight(monkeypatch):
    payload = b"weights " * 1000
    spec = core_weights.WeightSpec("", "", "", "fake.pth", hashlib.sha256(payload).hexdigest(), len(payload),
                                   origin="the test")
    monkeypatch.setitem(core_weights.WEIGHTS, "fake", spec)
    return payload


def test_weights_dir_problems_and_hash_cache(fake_weight, tmp_path, monkeypatch) -> None:
    d = svc_weights.WeightsDir(tmp_path)
    assert "fake.pth is missing" in d.problem("fake") and "cfrseg weights fetch fake --file" in d.problem("fake")
    (tmp_path / "fake.pth").write_bytes(fake_weight[:-1])
    assert "bytes, expected" in d.problem("fake")
    (tmp_path / "fake.pth").write_bytes(fake_weight[:-1] + b"!")
    assert "sha256" in d.problem("fake") and "corrupted" in d.problem("fake")
    (tmp_path / "fake.pth").write_bytes(fake_weight)
    calls = []
    real = svc_weights.sha256_file
    monkeypatch.setattr(svc_weights, "sha256_file", lambda p: calls.append(p) or real(p))
    assert d.problem("fake") is None and d.problem("fake") is None
    assert len(calls) == 1  # hashed once while size, mtime and inode stay
    assert "unknown weight" in d.problem("nope")


def test_operator_weight_is_never_downloaded_but_can_be_copied_in(fake_weight, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CFRSEG_CACHE", str(tmp_path / "home"))
    with pytest.raises(core_weights.NotFoundError, match="operator-provided"):
        core_weights.fetch("sam_vit_b", tmp_path / "w")
    src = tmp_path / "download.pth"
    src.write_bytes(fake_weight)
    p = core_weights.fetch("fake", tmp_path / "w", source=src)
    assert p == tmp_path / "w" / "fake.pth" and p.read_bytes() == fake_weight
    src.write_bytes(b"tampered")
    (tmp_path / "w2").mkdir()
    with pytest.raises(core_weights.InputError, match="sha256"):
        core_weights.fetch("fake", tmp_path / "w2", source=src)
    assert not list((tmp_path / "w2").iterdir())  # nothing half-copied
    assert core_weights.WEIGHTS["sam_vit_b"].size == 375042383  # Meta's published checkpoint


def test_weights_cli_dest_and_check(fake_weight, tmp_path, monkeypatch, capsys) -> None:
    from cfrseg.cli import main as cli

    monkeypatch.setenv("CFRSEG_CACHE", str(tmp_path / "home"))
    src = tmp_path / "x.pth"
    src.write_bytes(fake_weight)
    assert cli(["weights", "fetch", "fake", "--dest", str(tmp_path / "weights"), "--file", str(src)]) == 0
    assert (tmp_path / "weights" / "fake.pth").read_bytes() == fake_weight
    assert cli(["weights", "check", "fake", "--dest", str(tmp_path / "weights")]) == 0
    assert cli(["weights", "check", "sam_vit_b", "--dest", str(tmp_path / "weights")]) == 1
    out = capsys.readouterr().out
    assert "fake" in out and "ok" in out and "sam_vit_b_01ec64.pth is missing" in out


def test_what_needs_which_weights() -> None:
    assert svc_weights.required("finetune", "auto", "lite") == ["lite_medsam"]
    assert svc_weights.required("pseudolabel", "auto", "paper") == ["sam_vit_b"]
    assert svc_weights.required("retrain", "auto", "lite") == []
    assert svc_weights.required("finetune", "auto", "tiny") == []
    assert svc_weights.required("finetune", "none", "lite") == []
    assert svc_weights.required("finetune", "lite_medsam, sam_vit_b", "lite") == ["lite_medsam", "sam_vit_b"]
    with pytest.raises(ConfigError, match="unknown weight"):
        svc_weights.required("finetune", "sam_vit_z", "lite")
    assert svc_weights.job_needs("finetune", {"model": "vit_b"}, {}) == ["sam_vit_b"]
    assert svc_weights.job_needs("finetune", {"model": "vit_b", "checkpoint": "/w/x.pth"}, {}) == []
    assert svc_weights.job_needs("finetune", {"model": "tiny"}, {}) == []
    assert svc_weights.job_needs("retrain", {"network": "vnet"}, {}) == []


def test_service_device_strings() -> None:
    assert service_device("", 0) == ("", None) and service_device("cpu", 3) == ("cpu", None)
    if not HAVE_CUDA:
        dev, why = service_device("cuda", 1)
        assert dev == "cuda:1" and "torch.cuda.is_available() is False" in why
        assert service_device("auto", 0) == ("cpu", None)  # auto: CPU, with a warning in the log
    with pytest.raises(ConfigError):
        Settings.from_env({"CFRSEG_DEVICE": "gpu0"})


# ------------------------------------------------------------------ units: the device lock, two real processes

HOLD = """
import sys, time
from services.common.device import DeviceLock
lock = DeviceLock("cpu", sys.argv[1])
assert lock.try_acquire({"service": "other-process", "run_id": "r-held"})
print("held", flush=True)
time.sleep(120)
"""


def test_device_lock_across_processes_and_released_on_crash(tmp_path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline().strip() == b"held"
        mine = DeviceLock("cpu", str(tmp_path))
        assert not mine.try_acquire({"service": "test"})
        msgs: list[str] = []
        t0 = time.monotonic()
        assert not mine.acquire({"service": "test"}, timeout=0.6, on_wait=msgs.append)
        assert time.monotonic() - t0 >= 0.5
        assert msgs and msgs[0].startswith("waiting for the CPU (held by other-process r-held")
        proc.send_signal(signal.SIGKILL)  # a crash: the kernel drops its flock
        proc.wait()
        assert mine.acquire({"service": "test"}, timeout=5)
        # in-process: a second holder (another thread's acquisition, e.g. Segment) waits too
        assert not DeviceLock("cpu", str(tmp_path)).try_acquire({"service": "segment"})
        mine.release()
        again = DeviceLock("cpu", str(tmp_path))
        assert again.try_acquire({"service": "segment"})
        again.release()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    release_memory()  # no CUDA in use: a plain gc, never an error


# ------------------------------------------------------------------ services: fixtures

@pytest.fixture(scope="module")
def env(s3_server, redis_server) -> dict[str, str]:
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    e = {**s3_server.env(bucket), "CFRSEG_REDIS_URL": redis_server.url, "CFRSEG_INTERNAL_TOKEN": TOKEN,
         "CFRSEG_STAGE_IMPL": "tests.test_stage_services:fake_stage",
         "CFRSEG_SEGMENT_IMPL": "tests.test_stage_services:fake_segment"}
    store = S3Store.from_settings(Settings.from_env(e))
    store.ensure_bucket()
    store.put_bytes("datasets/d1/images/c1.nii.gz", b"image-1")
    store.put_bytes("datasets/d1/labels/c1.nii.gz", b"label-1")
    store.put_bytes("datasets/d1/manifest.json", json.dumps({"name": "d1", "num_classes": 2, "cases": [
        {"case_id": "c1", "image": "datasets/d1/images/c1.nii.gz", "label": "datasets/d1/labels/c1.nii.gz"}]}).encode())
    store.put_bytes("runs/m1/retrain/model.pt", b"model")
    store.put_bytes("uploads/u1/volume.nii.gz", b"a volume")
    return e


def launch(module: str, env: dict[str, str], tmp: Path) -> tuple[subprocess.Popen, str, Path]:
    """Start a service without waiting for SERVING (it may rightly be NOT_SERVING); wait until health answers."""
    port = free_port()
    log = tmp / f"{module.rsplit('.', 1)[-1]}-{port}.log"
    full = {**os.environ, "PYTHONPATH": str(ROOT), "CFRSEG_GRACE_S": "5", "CFRSEG_WORKDIR": str(tmp / "work"), **env}
    proc = subprocess.Popen([sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT,
                            env=full, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    addr = f"127.0.0.1:{port}"
    wait_for(lambda: b"serving " in log.read_bytes(), 60, module, proc, log)
    return proc, addr, log


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------ services: weights and device at start

def test_missing_weights_not_serving_and_jobs_fail_fast(env, tmp_path) -> None:
    empty = tmp_path / "weights"
    empty.mkdir()
    proc, addr, log = launch("services.finetune", {**env, "CFRSEG_CACHE": str(empty)}, tmp_path)
    try:
        wait_for(lambda: b"health check weights: NOT SERVING" in log.read_bytes(), 20, "weights check", proc, log)
        assert not health_ok(addr)
        text = log.read_text()
        assert "lite_medsam.pth is missing" in text and "cfrseg weights fetch lite_medsam --dest ./weights" in text
        st = stub(addr)
        with pytest.raises(grpc.RpcError) as e:
            st.Start(start_req("w1", model="lite_medsam", steps=2), timeout=10)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "lite_medsam.pth is missing" in e.value.details() and "cfrseg weights fetch" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            st.Start(start_req("w2", model="vit_b", steps=2), timeout=10)
        assert "sam_vit_b_01ec64.pth is missing" in e.value.details()
        # a profile that needs no weights still runs
        assert st.Start(start_req("w3", model="tiny", steps=2, step_s=0.01), timeout=10).run_id == "w3"
        assert watch(st, "w3")[-1].state == S.STAGE_STATE_SUCCEEDED
        cached = core_weights.cached_path("lite_medsam")
        if cached is not None:  # the operator fills the folder: the service turns SERVING, no restart needed
            (empty / "lite_medsam.pth").symlink_to(cached)
            wait_for(lambda: health_ok(addr), 30, "SERVING after the weights were added", proc, log)
    finally:
        stop(proc)


@pytest.mark.skipif(HAVE_CUDA, reason="checks the failure without a GPU")
def test_cuda_asked_without_gpu_is_not_serving(env, tmp_path) -> None:
    proc, addr, log = launch("services.retrain", {**env, "CFRSEG_DEVICE": "cuda", "CFRSEG_GPU": "0"}, tmp_path)
    try:
        wait_for(lambda: b"health check device: NOT SERVING" in log.read_bytes(), 20, "device check", proc, log)
        assert not health_ok(addr)
        assert "torch.cuda.is_available() is False" in log.read_text()
        st = stub(addr, cls=retrain_pb2_grpc.RetrainServiceStub)
        with pytest.raises(grpc.RpcError) as e:
            st.Start(start_req("g1", steps=2), timeout=10)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "GPU" in e.value.details()
        seg = retrain_pb2.SegmentVolumeRequest(model_id="m1", volume=pb.ObjectRef(key="uploads/u1/volume.nii.gz"))
        assert code_of(lambda: st.Segment(seg, timeout=10)) == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        stop(proc)


# ------------------------------------------------------------------ services: one job per device

def test_one_job_per_device_across_services_and_crash_release(env, tmp_path) -> None:
    locks = tmp_path / "locks"
    common = {**env, "CFRSEG_DEVICE": "cpu", "CFRSEG_LOCK_DIR": str(locks), "CFRSEG_REQUIRED_WEIGHTS": "none"}
    ft = start_service("services.finetune", {**common, "CFRSEG_WORKDIR": str(tmp_path / "w1")}, log_dir=tmp_path)
    pl = start_service("services.pseudolabel", {**common, "CFRSEG_WORKDIR": str(tmp_path / "w2")}, log_dir=tmp_path)
    try:
        a, b = stub(ft.addr), stub(pl.addr, cls=pseudolabel_pb2_grpc.PseudolabelServiceStub)
        a.Start(start_req("l1", steps=25, step_s=0.08), timeout=10)
        watch(a, "l1", until=lambda e: e.step >= 1)
        assert json.loads((locks / "cpu.lock").read_bytes())["run_id"] == "l1"
        b.Start(start_req("l2", steps=3, step_s=0.01), timeout=10)
        waiting = wait_for(lambda: (j := b.Get(pb.GetRequest(run_id="l2"), timeout=5)).message.startswith(
            "waiting for the CPU") and j, 10, "l2 waiting")
        assert waiting.state == S.STAGE_STATE_PENDING and "held by finetune l1" in waiting.message
        while a.Get(pb.GetRequest(run_id="l1"), timeout=5).state != S.STAGE_STATE_SUCCEEDED:
            assert b.Get(pb.GetRequest(run_id="l2"), timeout=5).state == S.STAGE_STATE_PENDING  # never together
            time.sleep(0.1)
        assert watch(b, "l2")[-1].state == S.STAGE_STATE_SUCCEEDED
        # a holder killed -9 frees the device at once (flock dies with the process)
        a.Start(start_req("l3", steps=400, step_s=0.05), timeout=10)
        watch(a, "l3", until=lambda e: e.step >= 1)
        b.Start(start_req("l4", steps=2, step_s=0.01), timeout=10)
        wait_for(lambda: b.Get(pb.GetRequest(run_id="l4"), timeout=5).message.startswith("waiting"), 10, "l4 waits")
        ft.kill()
        t0 = time.monotonic()
        assert watch(b, "l4")[-1].state == S.STAGE_STATE_SUCCEEDED
        assert time.monotonic() - t0 < 10
    finally:
        ft.stop()
        pl.stop()


def test_segment_waits_for_the_device_then_gives_up(env, tmp_path) -> None:
    locks = tmp_path / "locks"
    svc = start_service("services.retrain", {**env, "CFRSEG_DEVICE": "cpu", "CFRSEG_LOCK_DIR": str(locks),
                                             "CFRSEG_GPU_WAIT_S": "1", "CFRSEG_WORKDIR": str(tmp_path / "w")},
                        log_dir=tmp_path)
    held = DeviceLock("cpu", str(locks))
    try:
        st = stub(svc.addr, cls=retrain_pb2_grpc.RetrainServiceStub)
        seg = retrain_pb2.SegmentVolumeRequest(model_id="m1", volume=pb.ObjectRef(key="uploads/u1/volume.nii.gz"))
        assert held.try_acquire({"service": "finetune", "run_id": "r-busy"})
        with pytest.raises(grpc.RpcError) as e:
            st.Segment(seg, timeout=30)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "busy: the CPU (held by finetune r-busy" in e.value.details()
        held.release()
        assert st.Segment(seg, timeout=30).label.key.startswith("segmentations/m1/")
    finally:
        held.release()
        svc.stop()


# ------------------------------------------------------------------ CUDA only (run on a GPU host)

@pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA GPU")
def test_cuda_device_lock_name_and_cache_release() -> None:
    dev, why = service_device("cuda", 0)
    assert dev == "cuda:0" and why is None
    lock = DeviceLock(dev)
    assert lock.name.startswith("gpu-") or lock.name == "cuda0"
    x = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    del x
    assert torch.cuda.memory_reserved(0) > 0
    release_memory()
    assert torch.cuda.memory_reserved(0) == 0
