"""PACS routes config, rule matching, route checks against models, job ids and the audit trail (no servers:
an in-memory store stands in for S3)."""

from __future__ import annotations

import json

import pytest

from cfrseg.errors import ConfigError, NotFoundError
from cfrseg.store import LocalStore
from services.common.jobstore import JobStore
from services.pacs.audit import Audit, read_day
from services.pacs.config import PacsConfig, rule_matches
from services.pacs.jobs import job_id_for
from services.pacs.models import check_routes, model_info

BASE = {"ae_title": "CFRSEG", "port": 11112, "callers": [{"ae_title": "PACS", "host": "10.1.2.3"},
                                                           {"ae_title": "MOD", "host": "10.9.0.0/16"}],
        "destinations": {"pacs": {"ae_title": "PACS", "host": "10.1.2.3", "port": 104},
                         "web": {"dicomweb_url": "https://pacs/dicom-web", "token_file": "/run/secrets/stow"}},
        "routes": [{"name": "la-mr", "model_id": "run-1",
                    "match": {"Modality": "MR", "ImageType": ["ORIGINAL", "PRIMARY"],
                              "SeriesDescription": "(?i).*(lge|atri).*", "SliceThickness": [0.5, 3]},
                    "segments": [{"value": 1, "label": "Left atrium", "category": "SCT:91723000:Anatomical Structure",
                                  "type": "SCT:82471001:Left atrium", "rgb": [220, 60, 60]}],
                    "send_to": ["pacs"]}]}


def cfg(**over):
    d = json.loads(json.dumps(BASE))
    d.update(over)
    return PacsConfig.from_dict(d)


def test_rules() -> None:
    assert rule_matches("MR", "MR") and not rule_matches("MR", "MRI")
    assert rule_matches(["ORIGINAL", "PRIMARY"], ["ORIGINAL", "PRIMARY", "OTHER"])
    assert not rule_matches(["ORIGINAL", "PRIMARY"], ["DERIVED", "PRIMARY"])
    assert rule_matches([0.5, 3], "2.5") and not rule_matches([0.5, 3], "5") and not rule_matches([0.5, 3], None)
    assert rule_matches("(?i).*lge.*", "3D LGE atrium") and not rule_matches("(?i).*lge.*", None)


def test_route_matching_and_allow_list() -> None:
    c = cfg()
    attrs = {"Modality": "MR", "ImageType": ["ORIGINAL", "PRIMARY", "M"], "SeriesDescription": "LGE 3D",
             "SliceThickness": "1.25"}
    assert c.match("CFRSEG", attrs).name == "la-mr"
    assert c.match("OTHER", attrs) is None                        # called AE routing
    assert c.match("CFRSEG", {**attrs, "Modality": "CT"}) is None
    assert c.match("CFRSEG", {**attrs, "SeriesDescription": "Localizer"}) is None
    assert c.allowed("PACS", "10.1.2.3") and not c.allowed("PACS", "10.1.2.4")
    assert c.allowed("MOD", "10.9.200.1") and not c.allowed("INTRUDER", "10.1.2.3")


@pytest.mark.parametrize("over, words", [
    ({"ae_title": "A" * 17}, "AE title"),
    ({"callers": [{"ae_title": "PACS", "host": "pacs.example"}]}, "IP address or a CIDR"),
    ({"bind": "localhost"}, "not an IP address"),
    ({"routes": [{"name": "r", "model_id": "run-1", "send_to": ["nowhere"]}]}, "unknown destination"),
    ({"routes": [{"name": "r", "model_id": "run-1", "send_to": ["pacs"], "match": {"Modality": "("}}]},
     "bad regular expression"),
    ({"routes": [{"name": "r", "model_id": "run-1", "send_to": ["pacs"], "seg_type": "FRACTIONAL"}]}, "seg_type"),
    ({"routes": [{"name": "r", "model_id": "run-1", "send_to": ["pacs"], "called_ae": "OTHER"}]}, "listener"),
    ({"routes": [{"name": "r", "model_id": "run-1", "send_to": ["pacs"], "segments": [{"value": 1,
                                                                                         "label": "x"}]}]},
     "give its 'type' code"),
    ({"routes": [{"name": "r", "model_id": "run-1", "send_to": ["pacs"], "colour": 1}]}, "unknown key"),
    ({"destinations": {"x": {"ae_title": "X"}}}, "needs ae_title, host and port"),
    ({"limits": {"min_slices": 0}}, "limits.min_slices"),
    ({"extra": 1}, "unknown key"),
])
def test_config_errors_name_the_key(over, words) -> None:
    with pytest.raises(ConfigError, match=words):
        cfg(**over)


def _model(store, jobs, model_id, k, names=None):
    rec = {"run_id": model_id, "model_id": model_id, "state": "SUCCEEDED",
           "model": {"network": "vnet", "num_classes": k, **({"class_names": names} if names else {})}}
    jobs.put(f"runs/{model_id}/record.json", rec)
    store.put_bytes(f"runs/{model_id}/retrain/model.pt", b"not a torch file")


def test_routes_checked_against_models(tmp_path) -> None:
    store = LocalStore(tmp_path)
    jobs = JobStore(store)
    with pytest.raises(ConfigError, match="route 'la-mr': no trained model 'run-1'"):
        check_routes(cfg(), store, jobs)
    _model(store, jobs, "run-1", 3)
    with pytest.raises(ConfigError, match=r"segments have values \[1\] but model 'run-1' has 3 classes"):
        check_routes(cfg(), store, jobs)
    _model(store, jobs, "run-1", 2, ["Left atrium"])
    r = check_routes(cfg(), store, jobs)["la-mr"]
    assert r["segments"][0]["type"] == "SCT:82471001:Left atrium"
    auto = json.loads(json.dumps(BASE))
    auto["routes"][0]["segments"] = "auto"
    _model(store, jobs, "run-1", 3, ["Left atrium", "scar"])
    r = check_routes(PacsConfig.from_dict(auto), store, jobs)["la-mr"]
    assert [s["label"] for s in r["segments"]] == ["Left atrium", "scar"]
    assert r["segments"][0]["type"] == "SCT:82471001:Left atrium"
    info = model_info(store, jobs, "run-1")
    assert info.class_codes == ("SCT:82471001:Left atrium", "")
    with pytest.raises(NotFoundError):
        model_info(store, jobs, "run-2")


def test_model_class_names_from_model_pt(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    import io

    store = LocalStore(tmp_path / "s")
    jobs = JobStore(store)
    _model(store, jobs, "run-3", 3)
    buf = io.BytesIO()
    torch.save({"class_names": ["background", "LV", "RV"]}, buf)
    store.put_bytes("runs/run-3/retrain/model.pt", buf.getvalue())
    info = model_info(store, jobs, "run-3")
    assert info.class_names == ("LV", "RV")
    assert info.class_codes == ("SCT:87878005:Left ventricle", "SCT:53085002:Right ventricle")


def test_job_ids_are_stable_and_order_free() -> None:
    a = job_id_for("la", "run-1", "1.2.3", ["1.2.3.2", "1.2.3.1"])
    assert a == job_id_for("la", "run-1", "1.2.3", ["1.2.3.1", "1.2.3.2"])
    assert a != job_id_for("la", "run-1", "1.2.3", ["1.2.3.1", "1.2.3.2", "1.2.3.3"])  # late instance: new job
    assert a != job_id_for("la", "run-2", "1.2.3", ["1.2.3.1", "1.2.3.2"])
    assert a.startswith("pacs-") and len(a) == 21


def test_audit_is_append_only_and_survives_a_store_outage(tmp_path) -> None:
    store = LocalStore(tmp_path / "s")
    a = Audit(store, "node", tmp_path)
    e1 = a.event("association", "rejected", calling_ae="INTRUDER", peer="10.0.0.9")
    a.event("instances_received", patient_id="PID-1", study_uid="1.2", instances=3)
    day = e1["time"][:10]
    events = read_day(store, day)
    assert [e["event"] for e in events] == ["association", "instances_received"]
    assert events[1]["patient_id"] == "PID-1" and events[0]["outcome"] == "rejected"
    assert len(store.list("pacs/audit/")) == 2      # one object per event, never rewritten

    class Down:
        def put_bytes(self, *a):
            raise ConnectionError("down")

    Audit(Down(), "node", tmp_path).event("security_alert", "refused", calling_ae="PACS", peer="127.0.0.2")
    lines = (tmp_path / "audit-fallback.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["event"] == "security_alert"
    with pytest.raises(ValueError):
        a.event("nonsense")


def test_sweep_deletes_old_patient_data_and_keeps_records(tmp_path) -> None:
    import logging
    import time

    from services.pacs.__main__ import sweep
    from services.pacs.jobs import PacsJobs, new_record

    store = LocalStore(tmp_path / "s")
    pj = PacsJobs(store, JobStore(store), enqueue=lambda *a: None)
    for jid, state, age_d in (("pacs-old", "FAILED", 8), ("pacs-new", "FAILED", 1), ("pacs-ok", "DONE", 9)):
        rec = new_record(jid, state=state, origin={}, series={})
        rec["finished"] = rec["created"] = time.time() - age_d * 86400
        pj.put(rec)
        store.put_bytes(f"pacs/jobs/{jid}/source.tar", b"phi")
    assert sweep(pj, 7.0, logging.getLogger("t")) == 1
    assert not store.exists("pacs/jobs/pacs-old/source.tar") and pj.get("pacs-old")["sources_deleted"]
    assert store.exists("pacs/jobs/pacs-new/source.tar") and store.exists("pacs/jobs/pacs-ok/source.tar")


def test_segment_study_without_a_pacs_config(tmp_path) -> None:
    import grpc

    from services.common.errors import ServiceError
    from services.gateway.pacs import PacsApi
    from services.gen.cfrseg.v1 import pacs_pb2

    api = PacsApi(LocalStore(tmp_path), JobStore(LocalStore(tmp_path)), None, str(tmp_path))
    with pytest.raises(ServiceError) as e:
        api.segment_study(pacs_pb2.SegmentStudyRequest(source="pacs", study_uid="1.2.3"))
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "CFRSEG_PACS_CONFIG" in e.value.message
