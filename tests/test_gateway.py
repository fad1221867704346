"""The gateway on a real local stack (redis-server, nanio S3, the four gRPC services, a Celery worker) with the fake
stage double: the public API, authentication, object-key safety and bad input (status code, clear message, and
nothing already stored lost)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc
import numpy as np
import pytest
import SimpleITK as sitk

from cfrseg.data.io import write_volume
from services.gen.cfrseg.v1 import common_pb2, finetune_pb2_grpc, gateway_pb2
from services.sdk import Client, state_name
from tests.stack_helpers import cleanup, dump_logs, label_of, make_dataset, start_stack, volume

pytestmark = pytest.mark.stack
C = grpc.StatusCode


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    d = tmp_path_factory.mktemp("gwstack")
    st = start_stack(d / "stack", env={"CFRSEG_MAX_UPLOAD_MB": "5", "CFRSEG_FAKE_STEPS": "3",
                                       "CFRSEG_FAKE_STEP_S": "0.1"})
    yield st
    st.down()
    cleanup(d / "stack")


@pytest.fixture(scope="module")
def client(stack):
    with Client(stack.addr("gateway"), stack.token) as c:
        yield c


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "set", n=3)


@pytest.fixture(scope="module")
def done_run(client, data, stack):
    """A dataset (c0 labeled, c1 unlabeled, c2 test) and a finished run on it."""
    ds = client.create_dataset(data, labeled=1, holdout=1, name="three", num_classes=2,
                               class_names=["background", "lesion"])
    run = client.submit_run(ds.dataset_id, profile="tiny", ssl_method="mt", request_id="done-run")
    final = client.wait_run(run.run_id, timeout=120)
    assert state_name(final.state) == "SUCCEEDED", f"{final}\n{dump_logs(stack)}"
    return ds, final


def expect(code: grpc.StatusCode, *fragments: str):
    class _Ctx:
        def __enter__(self):
            return self

        def __exit__(self, et, ev, tb):
            assert et is not None and issubclass(et, grpc.RpcError), f"expected {code.name}, got no error"
            assert ev.code() == code, f"expected {code.name}, got {ev.code().name}: {ev.details()}"
            for f in fragments:
                assert f in ev.details(), f"{f!r} not in {ev.details()!r}"
            return True

    return _Ctx()


def raw_upload(c: Client, data: bytes, *, filename="v.nii.gz", size=None, sha=None, kind="image",
               chunk=1 << 20, send=None):
    h = gateway_pb2.UploadHeader(filename=filename, size=len(data) if size is None else size,
                                 sha256=sha or hashlib.sha256(data).hexdigest(),
                                 kind={"image": 1, "label": 2}[kind])
    body = data if send is None else send
    msgs = [gateway_pb2.UploadVolumeRequest(header=h)]
    msgs += [gateway_pb2.UploadVolumeRequest(chunk=body[i:i + chunk]) for i in range(0, len(body), chunk)]
    return c.stub.UploadVolume(iter(msgs), **c._kw())


def vol_bytes(tmp: Path, v, name="v.nii.gz", label=False) -> bytes:
    p = tmp / name
    write_volume(v, p, label=label)
    return p.read_bytes()


# ---------------------------------------------------------------------------------------------- happy path


def test_run_end_to_end_with_fake_stages(client, done_run, tmp_path):
    ds, run = done_run
    assert (ds.num_labeled, ds.num_unlabeled, ds.num_test) == (1, 1, 1)
    assert [s.stage for s in run.stages] == ["finetune", "pseudolabel", "retrain", "evaluate"]
    assert all(s.state == common_pb2.STAGE_STATE_SUCCEEDED for s in run.stages)
    assert set(run.metrics) == {"dice", "jaccard", "asd_mm", "hd95_mm"}
    assert run.model_id == run.run_id
    models = client.list_models()
    assert run.run_id in [m.model_id for m in models]
    keys = [a.key for a in client.list_artifacts(run.run_id)]
    assert f"runs/{run.run_id}/retrain/model.pt" in keys and f"runs/{run.run_id}/report.md" in keys
    assert not any(k.endswith("record.json") or "/jobs/" in k for k in keys)
    assert list(ds.class_names) == ["background", "lesion"] and ds.modality == "MR"
    assert list(client.get_dataset(ds.dataset_id).class_names) == ["background", "lesion"]
    rep = client.download_artifact(run.run_id, "report.md", tmp_path).read_text()
    assert "Evaluation" in rep and "lesion" in rep and "classes: lesion" in rep
    assert run.run_id in [r.run_id for r in client.list_runs(state="SUCCEEDED", dataset_id=ds.dataset_id)]


def test_segment_a_file_streams_the_label_back(client, done_run, data, tmp_path):
    _, run = done_run
    out = tmp_path / "seg.nii.gz"
    res = client.segment_file(run.run_id, data / "images" / "c2.nii.gz", out)
    assert res.num_classes == 2 and res.label.key.startswith(f"segmentations/{run.run_id}/")
    img, lab = sitk.ReadImage(str(data / "images" / "c2.nii.gz")), sitk.ReadImage(str(out))
    assert lab.GetSize() == img.GetSize() and lab.GetSpacing() == img.GetSpacing()


def test_watch_reports_stage_progress(client, data):
    ds = client.create_dataset(data, labeled=1, name="watch", num_classes=2)
    run = client.submit_run(ds.dataset_id, profile="tiny")
    events = list(client.watch_run(run.run_id, timeout=120))
    stages = [e.progress.stage for e in events]
    assert stages[0] == "finetune" and "retrain" in stages
    assert any(e.progress.total > 0 and e.progress.step > 0 for e in events)
    assert events[-1].state == common_pb2.RUN_STATE_SUCCEEDED


def test_cancel_a_running_run(client, data):
    ds = client.create_dataset(data, labeled=2, name="cancel", num_classes=2)
    run = client.submit_run(ds.dataset_id)
    assert run.profile == "lite"  # the server's default profile; a tiny run is only ever explicit
    r = client.cancel_run(run.run_id)
    assert state_name(r.state) in ("CANCELLING", "CANCELLED")
    final = client.wait_run(run.run_id, timeout=60)
    assert state_name(final.state) == "CANCELLED" and final.error.code == "CANCELLED"
    assert state_name(client.cancel_run(run.run_id).state) == "CANCELLED"  # repeated cancel: no-op


def test_submit_is_idempotent_per_request_id(client, done_run):
    ds, run = done_run
    again = client.submit_run(ds.dataset_id, profile="tiny", ssl_method="mt", request_id="done-run")
    assert again.run_id == run.run_id


# ---------------------------------------------------------------------------------------------- security


def _all_methods():
    svc = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"]
    from google.protobuf import symbol_database

    db = symbol_database.Default()
    for m in svc.methods:
        yield m.name, m.client_streaming, m.server_streaming, db.GetSymbol(m.input_type.full_name)


@pytest.mark.parametrize("metadata", [None, (("authorization", "Bearer wrong-token"),),
                                      (("authorization", "Basic abc"),)], ids=["none", "wrong", "scheme"])
def test_every_rpc_needs_the_token(stack, metadata):
    names = []
    with grpc.insecure_channel(stack.addr("gateway")) as ch:
        for name, cs, ss, req_cls in _all_methods():
            path = f"/cfrseg.v1.Gateway/{name}"
            req = req_cls()
            ser, de = req_cls.SerializeToString, lambda b: b
            kinds = {(False, False): ch.unary_unary, (False, True): ch.unary_stream,
                     (True, False): ch.stream_unary, (True, True): ch.stream_stream}
            call = kinds[(cs, ss)](path, request_serializer=ser, response_deserializer=de)
            arg = iter([req]) if cs else req
            with pytest.raises(grpc.RpcError) as ei:
                r = call(arg, metadata=metadata, timeout=10)
                if ss:
                    list(r)
            assert ei.value.code() == C.UNAUTHENTICATED, (name, ei.value.code(), ei.value.details())
            names.append(name)
    assert len(names) == 17  # every Gateway RPC (13 + 4 PACS RPCs)


def test_stage_services_refuse_the_public_token(stack):
    from services.common.server import channel

    stub = finetune_pb2_grpc.FinetuneServiceStub(channel(stack.addr("finetune"), stack.token))
    with expect(C.UNAUTHENTICATED):
        stub.Get(common_pb2.GetRequest(run_id="x"), timeout=10)


def test_object_keys_cannot_be_steered(client, done_run, tmp_path, stack):
    _, run = done_run
    data = vol_bytes(tmp_path, volume(seed=5))
    up = raw_upload(client, data, filename="../../datasets/evil/manifest.json.nii.gz")
    assert up.ref.key == f"uploads/{up.upload_id}/volume.nii.gz"
    for name in ("../other/record.json", "/etc/passwd", "retrain/../../x", ""):
        with expect(C.INVALID_ARGUMENT, "invalid artifact name"):
            list(client.stub.DownloadArtifact(gateway_pb2.DownloadArtifactRequest(run_id=run.run_id, name=name),
                                              **client._kw()))
    with expect(C.NOT_FOUND):
        client.download_artifact(run.run_id, "record.json", tmp_path)
    with expect(C.INVALID_ARGUMENT, "invalid run id"):
        client.get_run("../runs")
    with expect(C.INVALID_ARGUMENT, "invalid dataset id"):
        client.get_dataset("a/b")
    with expect(C.INVALID_ARGUMENT, "invalid case id"):
        client.stub.CreateDataset(gateway_pb2.CreateDatasetRequest(name="x", num_classes=2, cases=[
            gateway_pb2.DatasetCase(case_id="../evil", image_upload_id=up.upload_id)]), **client._kw())


# ---------------------------------------------------------------------------------------------- bad input


def _dataset_req(cases, num_classes=2, name="bad", **kw):
    return gateway_pb2.CreateDatasetRequest(name=name, num_classes=num_classes, cases=cases, **kw)


def _case(cid, img, lab=None, role=0):
    return gateway_pb2.DatasetCase(case_id=cid, image_upload_id=img.upload_id,
                                   label_upload_id=lab.upload_id if lab else "", role=role)


def test_bad_input(client, done_run, tmp_path, stack):
    ds, run = done_run
    manifest_before = client.get_dataset(ds.dataset_id).manifest
    v = volume(seed=7)
    img_b = vol_bytes(tmp_path, v, "img.nii.gz")
    lab_b = vol_bytes(tmp_path, label_of(v), "lab.nii.gz", label=True)
    img = raw_upload(client, img_b)
    lab = raw_upload(client, lab_b, kind="label")
    ok_case = _case("ok", img, lab)
    cases = 0

    def check(code, *fragments):
        nonlocal cases
        cases += 1
        return expect(code, *fragments)

    # uploads
    with check(C.INVALID_ARGUMENT, "truncated upload", "received"):
        raw_upload(client, img_b, send=img_b[:-100])
    with check(C.INVALID_ARGUMENT, "sha256 mismatch"):
        raw_upload(client, img_b, sha=hashlib.sha256(b"other").hexdigest())
    with check(C.RESOURCE_EXHAUSTED, "exceeds the limit"):
        raw_upload(client, b"x" * 10, size=6 << 20, send=b"")
    with check(C.INVALID_ARGUMENT, "more bytes than"):
        raw_upload(client, img_b, size=len(img_b) - 10)
    with check(C.INVALID_ARGUMENT, "sha256 must be 64"):
        raw_upload(client, img_b, sha="abc")
    with check(C.INVALID_ARGUMENT, "unsupported format"):
        raw_upload(client, img_b, filename="notes.txt")
    flat = vol_bytes(tmp_path, volume(shape=(24, 24, 1)), "flat.nii.gz")
    with check(C.INVALID_ARGUMENT, "3D volume", "flat.nii.gz"):
        raw_upload(client, flat, filename="flat.nii.gz")
    with check(C.INVALID_ARGUMENT, "upload 'junk.nii.gz'"):
        raw_upload(client, b"\x1f\x8b not really gzip" * 50, filename="junk.nii.gz")
    with check(C.INVALID_ARGUMENT, "first message must be the header"):
        client.stub.UploadVolume(iter([gateway_pb2.UploadVolumeRequest(chunk=b"abc")]), **client._kw())
    with check(C.INVALID_ARGUMENT, "chunks must be <="):
        raw_upload(client, b"\0" * (2 << 20), filename="big.nii", chunk=2 << 20)

    # datasets
    moved = v.__class__(label_of(v).array, v.spacing, (5.0, 0.0, 0.0), v.direction)
    bad_geo = raw_upload(client, vol_bytes(tmp_path, moved, "moved.nii.gz", label=True), kind="label")
    with check(C.INVALID_ARGUMENT, "geometry does not match", "origin", f"upload {bad_geo.upload_id}"):
        client.stub.CreateDataset(_dataset_req([_case("a", img, bad_geo)]), **client._kw())
    three = raw_upload(client, vol_bytes(tmp_path, label_of(v, 3), "three.nii.gz", label=True), kind="label")
    with check(C.INVALID_ARGUMENT, "values [3] are outside [0, 2)"):
        client.stub.CreateDataset(_dataset_req([_case("a", img, three)]), **client._kw())
    # labels {0, 3} declared as 4 classes: classes 1 and 2 have no labeled voxel -> refused, named
    with check(C.INVALID_ARGUMENT, "class(es) 1 (class_1), 2 (class_2) have no voxel in any labeled case"):
        client.stub.CreateDataset(_dataset_req([_case("a", img, three)], num_classes=4), **client._kw())
    empty = raw_upload(client, vol_bytes(tmp_path, v.with_array(np.zeros(v.shape, np.uint8)), "e.nii.gz",
                                         label=True), kind="label")
    with check(C.INVALID_ARGUMENT, "no foreground"):
        client.stub.CreateDataset(_dataset_req([_case("a", img, empty)]), **client._kw())
    with check(C.INVALID_ARGUMENT, "empty label set"):
        client.stub.CreateDataset(_dataset_req([_case("u", img)]), **client._kw())
    with check(C.NOT_FOUND, "no upload 'up-doesnotexist'"):
        client.stub.CreateDataset(_dataset_req([gateway_pb2.DatasetCase(
            case_id="a", image_upload_id="up-doesnotexist", label_upload_id=lab.upload_id)]), **client._kw())
    with check(C.INVALID_ARGUMENT, "expected VOLUME_KIND_LABEL"):
        client.stub.CreateDataset(_dataset_req([_case("a", img, img)]), **client._kw())
    with check(C.INVALID_ARGUMENT, "duplicate case id 'ok'"):
        client.stub.CreateDataset(_dataset_req([ok_case, ok_case]), **client._kw())
    with check(C.INVALID_ARGUMENT, "num_classes"):
        client.stub.CreateDataset(_dataset_req([ok_case], num_classes=1), **client._kw())
    with check(C.INVALID_ARGUMENT, "class_names must be 2 distinct non-empty names"):
        client.stub.CreateDataset(_dataset_req([ok_case], class_names=["lesion"]), **client._kw())
    with check(C.INVALID_ARGUMENT, "class_names must be 2 distinct"):
        client.stub.CreateDataset(_dataset_req([ok_case], class_names=["bg", "bg"]), **client._kw())
    with check(C.INVALID_ARGUMENT, "class names must be 1-64 printable characters"):
        client.stub.CreateDataset(_dataset_req([ok_case], class_names=["bg", "x" * 65]), **client._kw())
    with check(C.INVALID_ARGUMENT, "modality must be one of"):
        client.stub.CreateDataset(_dataset_req([ok_case], modality="PET"), **client._kw())

    # runs
    with check(C.NOT_FOUND, "no dataset 'ds-missing'"):
        client.submit_run("ds-missing")
    with check(C.INVALID_ARGUMENT, "unknown profile 'huge'"):
        client.submit_run(ds.dataset_id, profile="huge")
    with check(C.INVALID_ARGUMENT, "unknown SSL method 'magic'"):
        client.submit_run(ds.dataset_id, ssl_method="magic")
    with check(C.INVALID_ARGUMENT, "config override retrain.nope is not allowed"):
        client.submit_run(ds.dataset_id, overrides={"retrain": {"nope": 1}})
    with check(C.INVALID_ARGUMENT, "no case(s) ['zz']"):
        client.submit_run(ds.dataset_id, labeled=["zz"])
    with check(C.ALREADY_EXISTS, "request_id 'done-run' was already used"):
        client.submit_run(ds.dataset_id, profile="tiny", ssl_method="st", request_id="done-run")
    for call in (client.get_run, client.cancel_run, lambda r: list(client.watch_run(r, timeout=10)),
                 client.list_artifacts):
        with check(C.NOT_FOUND, "no run 'run-unknown'"):
            call("run-unknown")
    with check(C.FAILED_PRECONDITION, "already finished (SUCCEEDED)"):
        client.cancel_run(run.run_id)
    with check(C.NOT_FOUND, "no model 'run-unknown'"):
        client.segment_file("run-unknown", tmp_path / "img.nii.gz")
    with check(C.INVALID_ARGUMENT, "invalid page_token"):
        client.stub.ListRuns(gateway_pb2.ListRunsRequest(page_token="x"), **client._kw())
    assert cases >= 15

    # nothing already stored was lost or changed
    after = client.get_dataset(ds.dataset_id)
    assert after.manifest.sha256 == manifest_before.sha256
    assert state_name(client.get_run(run.run_id).state) == "SUCCEEDED"
    ok = client.stub.CreateDataset(_dataset_req([ok_case], name="still-fine"), **client._kw())
    assert ok.num_labeled == 1
    keys = [o.object_name for o in stack_objects(stack, "uploads/")]
    assert not any("junk" in k or "flat" in k for k in keys)
    assert len({k.split("/")[1] for k in keys}) == len([k for k in keys if k.endswith("upload.json")])


def stack_objects(stack, prefix):
    from minio import Minio

    m = Minio(stack.addr("s3"), access_key=stack.s3_access_key, secret_key=stack.s3_secret_key, secure=False,
              region="us-east-1")
    return list(m.list_objects(stack.bucket, prefix=prefix, recursive=True))


def test_dataset_request_id_is_idempotent(client, tmp_path):
    v = volume(seed=9)
    img = raw_upload(client, vol_bytes(tmp_path, v))
    lab = raw_upload(client, vol_bytes(tmp_path, label_of(v), "l.nii.gz", label=True), kind="label")
    req = _dataset_req([_case("a", img, lab)], name="idem", request_id="ds-req-1")
    a = client.stub.CreateDataset(req, **client._kw())
    b = client.stub.CreateDataset(req, **client._kw())
    assert a.dataset_id == b.dataset_id
    with expect(C.ALREADY_EXISTS):
        client.stub.CreateDataset(_dataset_req([_case("a", img, lab)], name="other", request_id="ds-req-1"),
                                  **client._kw())
    assert a.manifest.key == f"datasets/{a.dataset_id}/manifest.json"
