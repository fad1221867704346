"""Gateway limits against a real local stack (fake stage functions): a decompression bomb refused from its
header, watch streams capped per client and server-wide while unary RPCs keep answering (also after a watcher
is killed), run overrides through the allow-list; and ``maximum_concurrent_rpcs`` on a plain server."""

from __future__ import annotations

import gzip
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from services.gateway.overrides import RULES, check_overrides
from services.gen.cfrseg.v1 import gateway_pb2
from services.sdk import Client
from tests.stack_helpers import FAKE_ENV, cfrseg, dump_logs, make_dataset, need_servers

ROOT = Path(__file__).resolve().parent.parent
TOKEN_A, TOKEN_B = "token-a-" + "x" * 16, "token-b-" + "y" * 16
C = grpc.StatusCode


def nifti_bomb(path: Path, shape=(2048, 2048, 300), members: int = 30, member_mb: int = 64) -> Path:
    """A ~2 MB .nii.gz whose valid NIfTI-1 header claims ``shape`` uint8 voxels (1.26e9) and whose gzip
    members really inflate to ``members * member_mb`` MiB of zeros (multi-member gzip, made in ~2 s)."""
    hdr = bytearray(352)
    struct.pack_into("<i", hdr, 0, 348)
    struct.pack_into("<8h", hdr, 40, 3, *shape, 1, 1, 1, 1)
    struct.pack_into("<hh", hdr, 70, 2, 8)                # datatype uint8, bitpix 8
    struct.pack_into("<8f", hdr, 76, 1, 1, 1, 1, 1, 1, 1, 1)
    struct.pack_into("<f", hdr, 108, 352.0)               # vox_offset
    hdr[344:348] = b"n+1\0"
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = z.compress(bytes(member_mb << 20)) + z.flush()
    with open(path, "wb") as f:
        f.write(gzip.compress(bytes(hdr) + bytes((member_mb << 20) - 352), 9))
        f.writelines(block for _ in range(members - 1))
    return path


def _hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from services.stack import LocalStack

    need_servers()
    d = tmp_path_factory.mktemp("limits") / ".stack"
    env = {**FAKE_ENV, "CFRSEG_FAKE_STEPS": "4000", "CFRSEG_FAKE_STEP_S": "0.05",
           "CFRSEG_TOKEN": f"{TOKEN_A},{TOKEN_B}", "CFRSEG_MAX_WATCHES_PER_CLIENT": "3", "CFRSEG_MAX_WATCHES": "4",
           "CFRSEG_WORKERS": "8"}
    st = LocalStack(d, env=env, token=TOKEN_A)
    st.up()
    try:
        yield st
    except BaseException:
        print(dump_logs(st))
        raise
    finally:
        st.down()


@pytest.fixture(scope="module")
def dataset(stack, tmp_path_factory):
    with Client(stack.addr("gateway"), TOKEN_A) as c:
        return c.create_dataset(make_dataset(tmp_path_factory.mktemp("set"), n=3), labeled=1, holdout=1, num_classes=2)


@pytest.mark.stack
def test_decompression_bomb_is_refused_from_its_header(stack, tmp_path):
    bomb = nifti_bomb(tmp_path / "bomb.nii.gz")
    assert bomb.stat().st_size < 3 << 20
    gw = stack.procs["gateway"].pid
    with Client(stack.addr("gateway"), TOKEN_A) as c:
        c.upload_volume(make_dataset(tmp_path / "one", n=1) / "images" / "c0.nii.gz")  # warm: imports, buffers
        before = _hwm_mb(gw)
        n_uploads = len(stack_objects(stack, "uploads/"))
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            c.upload_volume(bomb)
        took = time.monotonic() - t0
        assert e.value.code() == C.INVALID_ARGUMENT
        msg = e.value.details()
        assert "'bomb.nii.gz'" in msg and "2048 x 2048 x 300 = 1,258,291,200 voxels" in msg, msg
        assert "limit of 268,435,456 (CFRSEG_MAX_VOXELS)" in msg, msg
        assert took < 5, took
        # single files only: detached data files would make the reader open other paths on the server
        nrrd = tmp_path / "detached.nrrd"
        nrrd.write_bytes(b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 2 2\nencoding: raw\n"
                         b"data file: /etc/hostname\n\n")
        mha = tmp_path / "detached.mha"
        mha.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementType = MET_UCHAR\n"
                        b"ElementDataFile = /etc/hostname\n")
        for f, what in ((nrrd, "detached NRRD data files"), (mha, "ElementDataFile = LOCAL")):
            with pytest.raises(grpc.RpcError) as e:
                c.upload_volume(f)
            assert e.value.code() == C.INVALID_ARGUMENT and what in e.value.details(), e.value.details()
    after = _hwm_mb(gw)
    print(f"\nbomb: {bomb.stat().st_size / 2**20:.2f} MB file, refused in {took:.2f} s; gateway peak RSS "
          f"{before:.0f} -> {after:.0f} MB")
    assert after - before < 100, (before, after)  # the body (1.26 GB) was never inflated
    assert len(stack_objects(stack, "uploads/")) == n_uploads  # nothing stored


def stack_objects(stack, prefix: str) -> list[str]:
    from minio import Minio

    m = Minio(stack.addr("s3"), access_key=stack.s3_access_key, secret_key=stack.s3_secret_key, secure=False,
              region="us-east-1")
    return [o.object_name for o in m.list_objects(stack.bucket, prefix=prefix, recursive=True)]


class _Watcher:
    """One open WatchRun stream: the first event is received before the constructor returns (so the server
    holds its slot), the rest is drained in a thread until :meth:`close`."""

    def __init__(self, client: Client, run_id: str) -> None:
        self.call = client.stub.WatchRun(gateway_pb2.WatchRunRequest(run_id=run_id), **client._kw(None))
        next(self.call)
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        try:
            for _ in self.call:
                pass
        except grpc.RpcError:
            pass

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(10)


def _refused(client: Client, run_id: str) -> str:
    with pytest.raises(grpc.RpcError) as e:
        _Watcher(client, run_id)
    assert e.value.code() == C.RESOURCE_EXHAUSTED, e.value
    return e.value.details()


def _unary_ok(client: Client, run_id: str) -> None:
    t0 = time.monotonic()
    assert client.get_run(run_id).run_id == run_id
    client.list_runs()
    assert client.health(include_components=False).serving
    assert time.monotonic() - t0 < 5


@pytest.mark.stack
def test_watch_streams_are_capped_and_unary_rpcs_still_answer(stack, dataset):
    a, b = Client(stack.addr("gateway"), TOKEN_A), Client(stack.addr("gateway"), TOKEN_B)
    run = a.submit_run(dataset.dataset_id, profile="tiny")  # fake stages: 4000 x 0.05 s, cancelled below
    watchers: list[_Watcher] = []
    try:
        watchers += [_Watcher(a, run.run_id) for _ in range(3)]
        msg = _refused(a, run.run_id)
        assert "too many open watch streams from this client (3 open, limit 3" in msg, msg
        assert "CFRSEG_MAX_WATCHES_PER_CLIENT" in msg
        _unary_ok(a, run.run_id)
        watchers.append(_Watcher(b, run.run_id))          # another client: its own quota ...
        msg = _refused(b, run.run_id)                     # ... but the server-wide cap is reached
        assert "the server has 4 open watch streams (limit 4: CFRSEG_MAX_WATCHES)" in msg, msg
        _unary_ok(b, run.run_id)
        for w in watchers:
            w.close()
        watchers.clear()
        deadline = time.monotonic() + 10                  # closed streams give their slots back
        while True:
            try:
                watchers += [_Watcher(a, run.run_id) for _ in range(3 - len(watchers))]
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, "slots of closed watch streams were not released"
                time.sleep(0.2)
        for w in watchers:
            w.close()
        watchers.clear()

        # a watcher process killed -9 gives its slots back too (its connection closes)
        code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r})\n"
                "from tests.test_limits import _Watcher\nfrom services.sdk import Client\n"
                f"c = Client({stack.addr('gateway')!r}, {TOKEN_A!r})\n"
                f"ws = [_Watcher(c, {run.run_id!r}) for _ in range(3)]\nprint('open', flush=True)\n"
                "time.sleep(600)\n")
        p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            assert p.stdout.readline().strip() == "open"
            assert "limit 3" in _refused(a, run.run_id)
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait()
        deadline = time.monotonic() + 15
        while True:
            try:
                watchers += [_Watcher(a, run.run_id) for _ in range(3 - len(watchers))]
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, "a killed client's watch slots were not released"
                time.sleep(0.2)
    finally:
        for w in watchers:
            w.close()
        a.cancel_run(run.run_id)
        a.close()
        b.close()


@pytest.mark.stack
def test_run_overrides_go_through_the_allow_list(stack, dataset):
    c = Client(stack.addr("gateway"), TOKEN_A)
    bad = {
        "finetune.checkpoint is not allowed (file paths are not accepted": {"finetune": {"checkpoint": "/etc/x"}},
        "pseudolabel.checkpoint is not allowed": {"pseudolabel": {"checkpoint": "/weights/x.pth"}},
        "finetune.device is not allowed (the server decides device": {"finetune": {"device": "cuda:3"}},
        "retrain.network_kwargs is not allowed": {"retrain": {"network_kwargs": {"n_filters": 4096}}},
        "retrain.iterations=10000000 is out of bounds: it must be an integer in [1, 100000]":
            {"retrain": {"iterations": 10_000_000}},
        "finetune.batch_size=64 is out of bounds: it must be an integer in [1, 32]": {"finetune": {"batch_size": 64}},
        "retrain.patch=[4096, 4096, 4096] is out of bounds: it must be a list of 3 integers, each in [8, 512]":
            {"retrain": {"patch": [4096, 4096, 4096]}},
        "retrain.infer.batch_size=1000 is out of bounds": {"retrain": {"infer": {"batch_size": 1000}}},
        "retrain.lr='0.1' is out of bounds: it must be a number": {"retrain": {"lr": "0.1"}},
    }
    for want, over in bad.items():
        with pytest.raises(grpc.RpcError) as e:
            c.submit_run(dataset.dataset_id, profile="tiny", overrides=over)
        assert e.value.code() == C.INVALID_ARGUMENT and want in e.value.details(), (want, e.value.details())
    run = c.submit_run(dataset.dataset_id, profile="tiny",
                       overrides={"retrain": {"iterations": 3, "infer": {"batch_size": 2}}, "finetune": {"lr": 0.01}})
    c.cancel_run(run.run_id)
    c.close()
    # the real CLI, --set
    r = cfrseg("client", "--address", stack.addr("gateway"), "--token", TOKEN_A, "submit", "--dataset",
               dataset.dataset_id, "--set", 'finetune.checkpoint="/etc/passwd"')
    assert r.returncode == 2 and "INVALID_ARGUMENT" in r.stderr and "finetune.checkpoint" in r.stderr, r.stderr


def test_allow_list_names_real_config_fields():
    """Every allowed key is a field of its stage's config class (a renamed field cannot slip through)."""
    import dataclasses

    from cfrseg.stages.finetune import FinetuneConfig
    from cfrseg.stages.infer import InferConfig
    from cfrseg.stages.pseudolabel import PseudolabelConfig
    from cfrseg.stages.retrain import RetrainConfig

    for sec, cls in (("finetune", FinetuneConfig), ("pseudolabel", PseudolabelConfig),
                     ("retrain", RetrainConfig), ("infer", InferConfig)):
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(RULES[sec]) <= fields, (sec, set(RULES[sec]) - fields)
        assert not {"checkpoint", "device", "resume"} & set(RULES[sec])
        for value in RULES[sec]["precision"].choices:   # every allowed precision is one the stage accepts
            assert cls(precision=value).precision == value
    check_overrides({"retrain": {"zoom": None, "lr_steps": [0.5]}, "pseudolabel": {"roles": ["test"]}})
    with pytest.raises(Exception, match="retrain.iterations=True is out of bounds"):
        check_overrides({"retrain": {"iterations": True}})


def test_maximum_concurrent_rpcs_refuses_beyond_the_limit():
    from services.common.server import Server, channel
    from services.common.settings import Settings
    from tests.servers import free_port

    gate = threading.Event()

    def slow(req, ctx):
        gate.wait(20)
        return req

    s = replace(Settings.from_env({}), port=free_port(), workers=4, max_concurrent_rpcs=2)
    srv = Server(s, tokens=["t"], service_names=["test.Slow"])
    ident = {"request_deserializer": None, "response_serializer": None}
    srv.grpc.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "test.Slow", {"Call": grpc.unary_unary_rpc_method_handler(slow, **ident)}),))
    srv.start()
    try:
        with channel(f"127.0.0.1:{srv.port}", "t") as ch:
            call = ch.unary_unary("/test.Slow/Call")
            running = [call.future(b"x", timeout=20) for _ in range(2)]
            time.sleep(0.5)
            with pytest.raises(grpc.RpcError) as e:
                call(b"y", timeout=5)
            assert e.value.code() == C.RESOURCE_EXHAUSTED
            gate.set()
            assert [f.result() for f in running] == [b"x", b"x"]
            assert call(b"z", timeout=5) == b"z"
    finally:
        gate.set()
        srv.stop(0)
