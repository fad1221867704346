"""PACS integration on loopback against a real Orthanc (the hospital PACS) and the local stack (Redis, S3, the
gRPC services, the Celery worker) plus the DICOM node (``python -m services.pacs``), with the segmentation fake
(threshold at the median; tests/fake_stages.py).

Covers docs/pacs.md: Orthanc pushes an oblique series, the SEG comes back into the same study and is checked
frame by frame against the source (and by dciodvfy); every bad input of the issue's list with its outcome;
an independent client (DCMTK storescu and movescu; pynetdicom for compressed syntaxes and the allow-list);
pull mode (C-GET, C-MOVE, WADO-RS); the retrain service down and the worker killed mid-job.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")

from services.sdk import PACS_FINAL, Client, pacs_state_name
from tests.dicom_fixtures import ENHANCED_MR, mr_series, presentation_state, text_sr, uid
from tests.pacs_helpers import (
    NodeProcess,
    check_against_source,
    install_model,
    pacs_config,
    push,
    seg_bytes,
    seg_series_in_study,
    store_scu,
    stores,
    wait_job,
)
from tests.servers import free_port, run_orthanc
from tests.stack_helpers import dump_logs, start_stack

pytestmark = pytest.mark.stack
MODEL = "run-pacsmodel"
PHI = ("Doe^Jane", "PID-0042")


@dataclass
class Ctx:
    st: object
    client: Client
    orthanc: object
    orthanc2: object
    node: NodeProcess
    tmp: Path
    config: Path

    def series(self, name: str, **kw):
        """A new series with its own pixels (the retrain service caches results per volume content)."""
        self.seq = getattr(self, "seq", 0) + 1
        return mr_series(self.tmp / f"{name}-{uid()[-8:]}", **{"seed": 100 + self.seq, **kw})


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pacs")
    node_port = free_port()
    with run_orthanc(tmp / "orthanc", {"cfrseg": ["CFRSEG", "127.0.0.1", node_port]}) as orthanc, \
            run_orthanc(tmp / "orthanc2", {}, unknown_sop_accepted=True, aet="PACS2",
                        extra={"DicomAlwaysAllowStore": True, "DicomAlwaysAllowFind": True,
                               "DicomAlwaysAllowMove": True}) as orthanc2:
        cfg = pacs_config(tmp / "pacs.json", node_port=node_port, orthanc=orthanc, orthanc2=orthanc2, model_id=MODEL)
        st = start_stack(tmp / "stack", env={"CFRSEG_PACS_CONFIG": str(cfg), "CFRSEG_VISIBILITY_TIMEOUT_S": "6"})
        node = None
        try:
            install_model(st, MODEL, class_names=["Left atrium"])
            node = NodeProcess(st, cfg, node_port, tmp).start()
            with Client(st.addr("gateway"), st.token) as c:
                yield Ctx(st, c, orthanc, orthanc2, node, tmp, cfg)
        except BaseException:
            print(dump_logs(st), node.output() if node else "")
            raise
        finally:
            if node is not None:
                node.stop()
            st.down()   # the stack folder (logs) stays in pytest's temporary folder


def final(ctx: Ctx, series_uid: str, state: str = "DONE", timeout: float = 45.0):
    try:
        j = wait_job(ctx.client, lambda j: j.series_uid == series_uid and j.state in PACS_FINAL, timeout)
    except (TimeoutError, grpc.RpcError):
        print(dump_logs(ctx.st), ctx.node.output()[-4000:])
        raise
    assert pacs_state_name(j.state) == state, (pacs_state_name(j.state), j.reason, j.detail)
    return j


# ---------------------------------------------------------------------------------------------- push


def test_push_binary_seg_back_into_the_study(pacs) -> None:
    s = pacs.series("lge", shape=(20, 16, 8))
    t0 = time.monotonic()
    push(pacs.orthanc, s.files)
    j = final(pacs, s.series_uid)
    took = time.monotonic() - t0
    assert j.route == "la-bin" and j.model_id == MODEL and j.seg_type == "BINARY" and j.num_instances == 8
    assert j.study_uid == s.study_uid and j.sends[0].ok and j.sends[0].detail == "C-STORE 0x0000"
    assert {"quiet_s", "load_s", "segment_s", "encode_s", "send_s", "total_s"} <= set(j.timings)
    # the SEG is in the same study in Orthanc, frame by frame on the oblique source
    segs = seg_series_in_study(pacs.orthanc, s.study_uid)
    assert [x["0020000E"]["Value"][0] for x in segs] == [j.seg_series_uid]
    data = seg_bytes(pacs.orthanc, j.seg_sop_uid)
    summary = check_against_source(data, s)
    assert summary["frames"] == j.seg_frames > 0
    import pydicom

    seg = pydicom.dcmread(__import__("io").BytesIO(data))
    assert seg.SegmentSequence[0].SegmentLabel == "Left atrium"
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "82471001"
    assert seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == MODEL
    if shutil.which("dciodvfy"):
        f = pacs.tmp / "seg-from-orthanc.dcm"
        f.write_bytes(data)
        r = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True, timeout=60, check=False)
        assert not [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("Error")], r.stderr
    # patient data deleted after DONE, the record kept; audit trail complete; no PHI in the app logs
    store, _ = stores(pacs.st)
    assert store.list(f"pacs/jobs/{j.job_id}/") == [f"pacs/jobs/{j.job_id}/record.json"]
    events = [e for k in store.list("pacs/audit/") for e in [__import__("json").loads(store.get_bytes(k))]]
    mine = [e for e in events if e.get("job_id") == j.job_id]
    assert {"instances_received", "seg_created", "instances_sent"} <= {e["event"] for e in mine}
    assert any(e.get("patient_id") == "PID-0042" for e in mine)
    logs = pacs.node.output() + pacs.st.tail("worker", 10**7) + pacs.st.tail("gateway", 10**7)
    assert not [p for p in PHI if p in logs]
    models = pacs.client.list_models()
    m = next(m for m in models if m.model_id == MODEL)
    assert [(c.value, c.name, c.code) for c in m.classes] == [(1, "Left atrium", "SCT:82471001:Left atrium")]
    print(f"push -> SEG stored: {took:.1f} s")

    # the same series again: the same job, no second SEG
    push(pacs.orthanc, s.files)
    time.sleep(3.0)
    again = [x for x in pacs.client.list_pacs_jobs(series_uid=s.series_uid)]
    assert [x.job_id for x in again] == [j.job_id]
    assert len(seg_series_in_study(pacs.orthanc, s.study_uid)) == 1
    # our own SEG routed back to us: ignored
    seg_series = pacs.orthanc.lookup(j.seg_series_uid)[0]["ID"]
    pacs.orthanc.rest("POST", "/modalities/cfrseg/store", {"Resources": [seg_series], "Synchronous": True})
    own = final(pacs, j.seg_series_uid, "IGNORED")
    assert own.reason == "own_output"


def test_labelmap_cstore_refused_stow_fallback_and_accepting_pacs(pacs) -> None:
    cases = {name: pacs.series(name, series_description=name) for name in
             ("LABELMAP-CSTORE", "LABELMAP-STOW", "LABELMAP-FALLBACK", "LABELMAP-PACS2")}
    push(pacs.orthanc, [f for s in cases.values() for f in s.files])
    refused = final(pacs, cases["LABELMAP-CSTORE"].series_uid, "FAILED")
    assert refused.reason == "destination_rejected" and "presentation context" in refused.detail
    stow = final(pacs, cases["LABELMAP-STOW"].series_uid)
    assert stow.seg_type == "LABELMAP" and stow.sends[0].detail == "STOW-RS"
    data = seg_bytes(pacs.orthanc, stow.seg_sop_uid)
    assert b"1.2.840.10008.5.1.4.1.1.66.7" in data[:2000]
    check_against_source(data, cases["LABELMAP-STOW"])
    fb = final(pacs, cases["LABELMAP-FALLBACK"].series_uid)
    assert fb.seg_type == "BINARY"
    check_against_source(seg_bytes(pacs.orthanc, fb.seg_sop_uid), cases["LABELMAP-FALLBACK"])
    ok2 = final(pacs, cases["LABELMAP-PACS2"].series_uid)
    assert ok2.seg_type == "LABELMAP" and len(pacs.orthanc2.lookup(ok2.seg_sop_uid)) == 1
    # nothing lost on failure: the SEG and sources are kept, and a retry sends again (and is refused again)
    store, _ = stores(pacs.st)
    assert store.exists(f"pacs/jobs/{refused.job_id}/seg.dcm")
    again = pacs.client.retry_pacs_job(refused.job_id)
    assert again.attempts == 1
    j = pacs.client.wait_pacs_job(refused.job_id, timeout=30)
    assert pacs_state_name(j.state) == "FAILED" and j.reason == "destination_rejected"


def test_allow_list(pacs) -> None:
    s = pacs.series("lge-allow")
    assoc = store_scu(pacs.node.port, s.files[:1], calling="INTRUDER")
    assert assoc.is_rejected                                     # A-ASSOCIATE-RJ, calling AE not recognised
    if shutil.which("storescu"):
        r = subprocess.run(["storescu", "-aet", "PACS", "-aec", "WRONG", "127.0.0.1", str(pacs.node.port),
                            str(s.files[0])], capture_output=True, text=True, timeout=30, check=False)
        assert r.returncode != 0 and "Rejected" in (r.stdout + r.stderr), r.stdout + r.stderr
    statuses = store_scu(pacs.node.port, s.files[:2], bind="127.0.0.2")   # a known AE from another host
    assert statuses == [0x0124, 0x0124]
    time.sleep(1.0)
    assert not pacs.client.list_pacs_jobs(series_uid=s.series_uid)
    store, _ = stores(pacs.st)
    import json

    alerts = [json.loads(store.get_bytes(k)) for k in store.list("pacs/audit/")]
    alerts = [a for a in alerts if a["event"] == "security_alert"]
    assert any(a.get("calling_ae") == "INTRUDER" for a in alerts)
    assert any(a.get("peer") == "127.0.0.2" for a in alerts)


def test_series_without_route_are_ignored(pacs) -> None:
    s = pacs.series("loc", series_description="Localizer", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    sr = text_sr(pacs.tmp / f"sr-{uid()[-6:]}", s.study_uid)
    pr = presentation_state(pacs.tmp / f"pr-{uid()[-6:]}.dcm", s.study_uid)
    push(pacs.orthanc, [*s.files, sr, pr])          # the push succeeds: never fail a transfer we ignore
    import pydicom

    for f, n in ((s.files[0], 8), (sr, 1), (pr, 1)):
        j = final(pacs, str(pydicom.dcmread(f).SeriesInstanceUID), "IGNORED")
        assert j.reason == "no_route" and j.num_instances == n


def test_bad_geometry_is_rejected_with_a_reason(pacs) -> None:
    cases = {"gap": ({"skip": (3,)}, "irregular_geometry", "gap of 5 mm after slice 3"),
             "dup": ({"duplicate": (2,)}, "irregular_geometry", "duplicate slice position"),
             "iop": ({"tilt_slice": 4}, "irregular_geometry", "mixed orientations"),
             "sbs": ({"spacing_between": 1.0}, "irregular_geometry", "SpacingBetweenSlices"),
             "few": ({"shape": (20, 16, 4)}, "too_few_slices", "4 slice(s)"),
             "enh": ({"sop_class": ENHANCED_MR}, "multiframe_unsupported", "Enhanced MR")}
    series = {k: pacs.series(f"lge-{k}", **kw) for k, (kw, _, _) in cases.items()}
    push(pacs.orthanc, [f for s in series.values() for f in s.files])
    for k, (_, code, words) in cases.items():
        j = final(pacs, series[k].series_uid, "REJECTED")
        assert j.reason == code and words in j.detail, (k, j.reason, j.detail)
        assert not seg_series_in_study(pacs.orthanc, series[k].study_uid)
        got = pacs.client.get_pacs_job(j.job_id)
        assert got.reason == code
    store, _ = stores(pacs.st)        # sources kept for inspection (deleted keep_failed_days later)
    assert store.exists(f"pacs/jobs/{j.job_id}/source.tar")


@pytest.mark.parametrize("ts", ["RLE", "JPEGLS"])
def test_compressed_sources_are_processed(pacs, ts) -> None:
    s = pacs.series(f"lge-{ts}", transfer_syntax=ts, series_description=f"LGE {ts}")
    assert store_scu(pacs.node.port, s.files) == [0] * 8
    j = final(pacs, s.series_uid)
    check_against_source(seg_bytes(pacs.orthanc, j.seg_sop_uid), s)


def test_oversized_series(pacs) -> None:
    s = pacs.series("lge-big", shape=(20, 16, 12))
    statuses = store_scu(pacs.node.port, s.files)
    assert statuses[:10] == [0] * 10 and statuses[10:] == [0xA700, 0xA700]
    j = final(pacs, s.series_uid, "REJECTED")
    assert j.reason == "oversized" and "more than 10 instances" in j.detail
    spool = Path(pacs.st.dir) / "work" / "dicomnode" / "pacs" / "spool"
    assert not [p for p in spool.rglob("*.dcm")]


def test_dcmtk_storescu_push_and_movescu_pull(pacs) -> None:
    if not (shutil.which("storescu") and shutil.which("movescu")):
        pytest.skip("DCMTK not installed")
    a = pacs.series("lge-dcmtk")
    r = subprocess.run(["storescu", "-aet", "PACS", "-aec", "CFRSEG", "127.0.0.1", str(pacs.node.port),
                        *map(str, a.files)], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    final(pacs, a.series_uid)
    b = pacs.series("lge-move")
    pacs.orthanc.upload(b.files)
    # movescu, calling as CFRSEG (the AE the PACS knows), asks the PACS to move the series to the node
    r = subprocess.run(["movescu", "-S", "-aet", "CFRSEG", "-aec", pacs.orthanc.aet, "-aem", "CFRSEG",
                        "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={b.study_uid}",
                        "-k", f"SeriesInstanceUID={b.series_uid}", "127.0.0.1", str(pacs.orthanc.dicom_port)],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    j = final(pacs, b.series_uid)
    check_against_source(seg_bytes(pacs.orthanc, j.seg_sop_uid), b)


# ---------------------------------------------------------------------------------------------- pull


@pytest.mark.parametrize("method", ["get", "move", "wado"])
def test_pull_segment_study(pacs, method) -> None:
    s = pacs.series(f"lge-pull-{method}")
    pacs.orthanc.upload(s.files)
    sr = text_sr(pacs.tmp / f"sr-{method}", s.study_uid)
    pacs.orthanc.upload([sr])
    r = pacs.client.segment_study("pacs", s.study_uid, method=method)
    assert len(r.jobs) == 1 and len(r.skipped_series) == 1 and r.skipped_series[0].endswith("no_route")
    j = pacs.client.wait_pacs_job(r.jobs[0].job_id, timeout=60)
    assert pacs_state_name(j.state) == "DONE", (j.reason, j.detail)
    assert j.origin == f"pull ({method}) from pacs"
    check_against_source(seg_bytes(pacs.orthanc, j.seg_sop_uid), s)
    again = pacs.client.segment_study("pacs", s.study_uid, method=method)      # idempotent
    assert [x.job_id for x in again.jobs] == [j.job_id]
    assert len(seg_series_in_study(pacs.orthanc, s.study_uid)) == 1


def test_pull_errors(pacs) -> None:
    s = pacs.series("lge-pull-bad")
    pacs.orthanc2.upload(s.files)
    r = pacs.client.segment_study("pacs2", s.study_uid, method="move")   # PACS2 does not know our AE
    j = pacs.client.wait_pacs_job(r.jobs[0].job_id, timeout=30)
    assert pacs_state_name(j.state) == "FAILED" and j.reason == "retrieve_failed" and "0xC000" in j.detail
    for kw, code in (({"source": "nowhere", "study_uid": s.study_uid}, grpc.StatusCode.INVALID_ARGUMENT),
                     ({"source": "pacs", "study_uid": "1.2.3.999"}, grpc.StatusCode.NOT_FOUND),
                     ({"source": "pacs", "study_uid": "not-a-uid"}, grpc.StatusCode.INVALID_ARGUMENT),
                     ({"source": "web", "study_uid": s.study_uid, "method": "get"}, grpc.StatusCode.INVALID_ARGUMENT),
                     ({"source": "pacs", "study_uid": s.study_uid, "route": "nope"}, grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.RpcError) as e:
            pacs.client.segment_study(**kw)
        assert e.value.code() == code, (kw, e.value.details())
    with pytest.raises(grpc.RpcError) as e:
        pacs.client.get_pacs_job("pacs-0000000000000000")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


# ---------------------------------------------------------------------------------------------- faults


def test_model_gone_then_retry(pacs) -> None:
    store, _ = stores(pacs.st)
    key = f"runs/{MODEL}/retrain/model.pt"
    saved = store.get_bytes(key)
    store.delete(key)
    try:
        s = pacs.series("lge-nomodel")
        push(pacs.orthanc, s.files)
        j = final(pacs, s.series_uid, "FAILED")
        assert j.reason == "inference_unavailable" and MODEL in j.detail
        assert store.exists(f"pacs/jobs/{j.job_id}/volume.nii")   # nothing lost
        with pytest.raises(grpc.RpcError) as e:
            pacs.client.retry_pacs_job("pacs-" + "0" * 16)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        store.put_bytes(key, saved)
    pacs.client.retry_pacs_job(j.job_id)
    done = pacs.client.wait_pacs_job(j.job_id, timeout=30)
    assert pacs_state_name(done.state) == "DONE" and done.attempts == 1
    with pytest.raises(grpc.RpcError) as e:
        pacs.client.retry_pacs_job(j.job_id)               # DONE: only with force
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_retrain_down_during_a_job(pacs) -> None:
    pacs.st.stop("retrain")
    try:
        s = pacs.series("lge-down")
        push(pacs.orthanc, s.files)
        wait_job(pacs.client, lambda j: j.series_uid == s.series_uid and j.detail.startswith("waiting"), 30)
    finally:
        pacs.st.start("retrain")
    j = final(pacs, s.series_uid, timeout=60)
    assert len(seg_series_in_study(pacs.orthanc, s.study_uid)) == 1
    assert j.sends[0].ok


def test_worker_killed_mid_job(pacs) -> None:
    st = pacs.st
    st.stop("retrain")
    st.env["CFRSEG_FAKE_SEGMENT_S"] = "3"
    st.start("retrain")
    try:
        s = pacs.series("lge-kill")
        push(pacs.orthanc, s.files)
        wait_job(pacs.client, lambda j: j.series_uid == s.series_uid and pacs_state_name(j.state) == "SEGMENTING", 30)
        time.sleep(0.8)                       # inside the Segment call
        st.kill("worker")
        st.start("worker")
        j = final(pacs, s.series_uid, timeout=90)
        assert len(seg_series_in_study(pacs.orthanc, s.study_uid)) == 1
        assert len(pacs.orthanc.rest("GET", f"/dicom-web/studies/{s.study_uid}/series/{j.seg_series_uid}/instances")) == 1
    finally:
        st.stop("retrain")
        st.env.pop("CFRSEG_FAKE_SEGMENT_S", None)
        st.start("retrain")


def test_node_refuses_a_route_that_does_not_fit_its_model(pacs) -> None:
    import json

    cfg = json.loads(pacs.config.read_text())
    cfg["routes"][0]["segments"] = [{"value": 1, "label": "LA", "type": "SCT:82471001:Left atrium"},
                                    {"value": 2, "label": "LV"}]
    bad = pacs.tmp / "bad.json"
    bad.write_text(json.dumps(cfg))
    r = pacs.node.run_check(bad)
    assert r.returncode == 2 and "route 'la-bin'" in r.stderr and "2 classes" in r.stderr, r.stderr
    cfg["routes"][0]["segments"] = "auto"
    cfg["routes"][0]["model_id"] = "run-missing"
    bad.write_text(json.dumps(cfg))
    r = pacs.node.run_check(bad)
    assert r.returncode == 2 and "no trained model 'run-missing'" in r.stderr, r.stderr
    r = pacs.node.run_check(pacs.config)                 # the good config: destinations answer C-ECHO
    assert r.returncode == 0 and "pacs: ok" in r.stdout, r.stdout + r.stderr


def test_cli_pacs_commands(pacs, capsys) -> None:
    from services import client as cli

    s = pacs.series("lge-cli")
    pacs.orthanc.upload(s.files)
    base = ["--address", pacs.st.addr("gateway"), "--token", pacs.st.token, "pacs"]
    rc = cli.main([*base, "segment-study", "pacs", s.study_uid, "--method", "wado", "--wait", "--timeout", "60"])
    out = capsys.readouterr().out
    assert rc == 0 and " DONE " in out and "route=la-bin" in out and s.series_uid in out, out
    job_id = out.split()[0]
    assert cli.main([*base, "jobs", "--series", s.series_uid]) == 0
    assert capsys.readouterr().out.startswith(job_id)
    assert cli.main([*base, "job", job_id]) == 0
    j = __import__("json").loads(capsys.readouterr().out)
    assert j["state"] == "PACS_JOB_STATE_DONE" and j["seg_type"] == "BINARY" and "segment_s" in j["timings"]
    assert cli.main([*base, "retry", job_id]) == 2
    assert "FAILED_PRECONDITION" in capsys.readouterr().err
    assert cli.main(["--address", pacs.st.addr("gateway"), "--token", pacs.st.token, "models"]) == 0
    assert "1: Left atrium  (SCT:82471001:Left atrium)" in capsys.readouterr().out


@pytest.mark.slow
def test_real_tiny_vnet_end_to_end(pacs) -> None:
    """No fake: a real (tiny, untrained) V-Net in model.pt, segmented by the retrain service's real code path;
    the SEG that reaches Orthanc equals cfrseg's own inference on the same series, voxel for voxel."""
    import io
    import json

    import torch

    from cfrseg.data.volume import Volume
    from cfrseg.dicom.seg import seg_to_label
    from cfrseg.dicom.series import check_series, read_metadata
    from cfrseg.models.registry import build_network
    from cfrseg.stages.infer import InferConfig, load_model, save_model, segment_volume

    torch.manual_seed(2)   # an untrained net whose label map is neither empty nor full on this phantom
    net = build_network("vnet", 1, 2, n_filters=4)
    buf = io.BytesIO()
    save_model(buf, network="vnet", num_classes=2, student=net, network_kwargs={"n_filters": 4},
               infer=InferConfig(patch=(16, 16, 16), stride=(8, 8, 8), device="cpu"),
               class_names=["background", "Left atrium"])
    install_model(pacs.st, "run-vnetmodel", artifact=buf.getvalue(), network="vnet")
    cfg = json.loads(pacs.config.read_text())
    cfg["routes"] = [{**cfg["routes"][0], "model_id": "run-vnetmodel"}]
    vcfg = pacs.tmp / "pacs-vnet.json"
    vcfg.write_text(json.dumps(cfg))
    st = pacs.st
    pacs.node.stop()
    st.stop("retrain")
    impl = st.env.pop("CFRSEG_SEGMENT_IMPL")
    node = NodeProcess(st, vcfg, pacs.node.port, pacs.tmp)
    try:
        st.start("retrain")
        node.start()
        s = pacs.series("lge-vnet", shape=(24, 20, 10))
        push(pacs.orthanc, s.files)
        j = final(pacs, s.series_uid, timeout=120)
        assert j.model_id == "run-vnetmodel"
        data = seg_bytes(pacs.orthanc, j.seg_sop_uid)
        metas = read_metadata(s.files)
        geom = check_series(metas, min_slices=6)
        model, meta = load_model(buf.getvalue(), "cpu")
        vol = Volume(s.array, s.spacing, s.origin, tuple(s.direction.reshape(-1)))
        want = segment_volume(model, vol, InferConfig.from_dict(meta["infer"]), meta["preprocess"]).array
        assert 0 < want.sum() < want.size
        assert np.array_equal(seg_to_label(data, geom), want.astype(np.uint16))
        import pydicom

        seg = pydicom.dcmread(io.BytesIO(data))
        assert seg.SegmentSequence[0].SegmentLabel == "Left atrium" and seg.ManufacturerModelName == "vnet"
    finally:
        node.stop()
        st.stop("retrain")
        st.env["CFRSEG_SEGMENT_IMPL"] = impl
        st.start("retrain")
        pacs.node.start()


def test_resent_series_with_a_late_instance_and_forced_redo(pacs) -> None:
    s = pacs.series("lge-late", shape=(20, 16, 9))
    import pydicom

    by_n = sorted(s.files, key=lambda f: int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber))
    assert store_scu(pacs.node.port, by_n[:8]) == [0] * 8
    first = final(pacs, s.series_uid)
    assert first.num_instances == 8
    assert store_scu(pacs.node.port, by_n) == [0] * 9         # the PACS resends the series with a late slice
    j2 = wait_job(pacs.client, lambda j: j.series_uid == s.series_uid and j.job_id != first.job_id
                  and j.state in PACS_FINAL, 45)
    assert pacs_state_name(j2.state) == "DONE" and j2.num_instances == 9 and j2.previous_job_id == first.job_id
    assert len(seg_series_in_study(pacs.orthanc, s.study_uid)) == 2
    # a forced redo of a DONE job whose sources are gone: the next delivery runs it again
    r = pacs.client.retry_pacs_job(first.job_id, force=True)
    assert "next delivery" in r.detail
    assert store_scu(pacs.node.port, by_n[:8]) == [0] * 8
    redo = wait_job(pacs.client, lambda j: j.job_id == first.job_id and j.attempts == 1 and j.state in PACS_FINAL, 45)
    assert pacs_state_name(redo.state) == "DONE" and redo.seg_sop_uid != first.seg_sop_uid


def test_spool_survives_a_node_restart(pacs) -> None:
    s = pacs.series("lge-restart")
    node = pacs.node
    assert store_scu(node.port, s.files) == [0] * 8
    node.proc.kill()                      # before the series is stable (release grace 0.5 s)
    node.proc.wait()
    assert not pacs.client.list_pacs_jobs(series_uid=s.series_uid)
    node.start()
    j = final(pacs, s.series_uid)
    assert j.num_instances == 8
    check_against_source(seg_bytes(pacs.orthanc, j.seg_sop_uid), s)
