"""Helpers of the PACS tests: a trained-model record without training, the PACS config of the tests, the DICOM
node as a process, and waiting for PACS jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from tests.servers import ROOT, free_port, wait_for

MR = "1.2.840.10008.5.1.4.1.1.4"


def stores(st) -> tuple[Any, Any]:
    """(S3Store, JobStore) of a LocalStack."""
    from services.common.jobstore import JobStore
    from services.common.s3store import S3Store
    from services.common.settings import Settings

    s = Settings.from_env({"CFRSEG_S3_ENDPOINT": st.addr("s3"), "CFRSEG_S3_ACCESS_KEY": st.s3_access_key,
                           "CFRSEG_S3_SECRET_KEY": st.s3_secret_key, "CFRSEG_S3_BUCKET": st.bucket})
    store = S3Store.from_settings(s)
    store.ensure_bucket()
    return store, JobStore.connect(store, st.redis_url)


def install_model(st, model_id: str, num_classes: int = 2, class_names: list[str] | None = None,
                  artifact: bytes | None = None, network: str = "fake") -> None:
    """A SUCCEEDED run record with a model (as the orchestrator writes it) and its model.pt."""
    from services.orchestrator.records import new_run_record

    store, jobs = stores(st)
    rec = new_run_record(run_id=model_id, name="pacs-test", dataset_id="ds-test", profile="tiny", ssl_method="none",
                         labeled=["a"], unlabeled=[], test=[], configs={}, manifest_key="x")
    rec.update(state="SUCCEEDED", model_id=model_id,
               model={"network": network, "num_classes": num_classes, "key": f"runs/{model_id}/retrain/model.pt"})
    if class_names:
        rec["model"]["class_names"] = class_names
    for s in rec["stages"].values():
        s["state"] = "SUCCEEDED"
    store.put_bytes(f"runs/{model_id}/retrain/model.pt", artifact if artifact is not None else b"fake model")
    jobs.put(f"runs/{model_id}/record.json", rec)


def pacs_config(path: Path, *, node_port: int, orthanc, orthanc2, model_id: str, stable_after_s: float = 2.0,
                **extra: Any) -> Path:
    """The tests' routes: BINARY to Orthanc by C-STORE (LGE series), LABELMAP by C-STORE to an Orthanc that
    refuses it, LABELMAP with a BINARY fallback, LABELMAP by STOW-RS, LABELMAP to an Orthanc that accepts it."""
    lm = {"seg_type": "LABELMAP"}
    routes = [
        {"name": "la-bin", "model_id": model_id, "match": {"Modality": "MR", "SeriesDescription": "(?i).*lge.*",
                                                           "ImageType": ["ORIGINAL", "PRIMARY"]},
         "send_to": ["pacs"], "series_description": "cfrseg LA (AI, research use only)"},
        {"name": "la-labelmap", "model_id": model_id, "match": {"SeriesDescription": "LABELMAP-CSTORE"},
         "send_to": ["pacs"], **lm},
        {"name": "la-fallback", "model_id": model_id, "match": {"SeriesDescription": "LABELMAP-FALLBACK"},
         "send_to": ["pacs"], "fallback_seg_type": "BINARY", **lm},
        {"name": "la-stow", "model_id": model_id, "match": {"SeriesDescription": "LABELMAP-STOW"},
         "send_to": ["web"], **lm},
        {"name": "la-pacs2", "model_id": model_id, "match": {"SeriesDescription": "LABELMAP-PACS2"},
         "send_to": ["pacs2"], **lm},
    ]
    cfg = {"ae_title": "CFRSEG", "bind": "127.0.0.1", "port": node_port, "stable_after_s": stable_after_s,
           "release_grace_s": 0.5,
           "callers": [{"ae_title": "PACS", "host": "127.0.0.1"}, {"ae_title": "PACS2", "host": "127.0.0.1"}],
           "destinations": {
               "pacs": {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port,
                        "dicomweb_url": orthanc.dicomweb, "timeout_s": 10},
               "web": {"dicomweb_url": orthanc.dicomweb, "timeout_s": 10},
               "pacs2": {"ae_title": orthanc2.aet, "host": "127.0.0.1", "port": orthanc2.dicom_port, "timeout_s": 10}},
           "limits": {"max_instances": 10, "min_slices": 6},
           "routes": routes, **extra}
    path.write_text(json.dumps(cfg, indent=1))
    return path


class NodeProcess:
    """``python -m services.pacs`` with the stack's environment; ready when its DICOM port accepts."""

    def __init__(self, st, config: Path, port: int, log_dir: Path) -> None:
        self.st, self.config, self.port = st, config, port
        self.log = log_dir / f"dicomnode-{uuid.uuid4().hex[:6]}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> NodeProcess:
        env = {**self.st.service_env("dicomnode"), "CFRSEG_PACS_CONFIG": str(self.config)}
        self.proc = subprocess.Popen([sys.executable, "-m", "services.pacs"], cwd=ROOT, env=env,
                                     stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        from services.stack import port_open

        wait_for(lambda: port_open(self.port), timeout, "DICOM node", self.proc, self.log)
        return self

    def run_check(self, config: Path) -> subprocess.CompletedProcess:
        env = {**self.st.service_env("dicomnode"), "CFRSEG_PACS_CONFIG": str(config)}
        return subprocess.run([sys.executable, "-m", "services.pacs", "--check"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60, check=False)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def wait_job(client, pred, timeout: float = 30.0, what: str = "PACS job"):
    """Poll ListPacsJobs until ``pred(job)`` holds for one job; returns it."""
    deadline = time.monotonic() + timeout
    last = []
    while time.monotonic() < deadline:
        last = client.list_pacs_jobs()
        for j in last:
            if pred(j):
                return j
        time.sleep(0.2)
    raise TimeoutError(f"{what} not seen in {timeout} s; jobs: {[(j.job_id, j.state, j.reason, j.detail) for j in last]}")


def push(orthanc, files, modality: str = "cfrseg", ok: bool = True) -> None:
    """Load files into Orthanc and have Orthanc push the series to ``modality`` (C-STORE SCU)."""
    import urllib.error

    for series in orthanc.upload(files):
        try:
            orthanc.rest("POST", f"/modalities/{modality}/store", {"Resources": [series], "Synchronous": True})
        except urllib.error.HTTPError:
            if ok:
                raise


def free_ports(n: int) -> list[int]:
    return [free_port() for _ in range(n)]


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


# ---------------------------------------------------------------------------------------------- checks


def expected(s) -> np.ndarray:
    return (s.array > np.median(s.array)).astype(np.uint8)   # what the segmentation fake does


def seg_bytes(orthanc, sop_uid: str) -> bytes:
    found = orthanc.lookup(sop_uid)
    assert len(found) == 1 and found[0]["Type"] == "Instance", found
    return orthanc.rest("GET", f"/instances/{found[0]['ID']}/file")


def seg_series_in_study(orthanc, study_uid: str) -> list[dict]:
    series = orthanc.rest("GET", f"/dicom-web/studies/{study_uid}/series")
    return [s for s in series if s["00080060"]["Value"][0] == "SEG"]


def check_against_source(data: bytes, s) -> dict:
    """The post-checks of cfrseg.dicom.seg.check_seg on SEG bytes (e.g. fetched from Orthanc) against the
    fixture series ``s`` and the segmentation fake's label."""
    from cfrseg.dicom.codes import SegmentSpec
    from cfrseg.dicom.seg import check_seg
    from cfrseg.dicom.series import check_series, read_metadata

    metas = read_metadata(s.files)
    geom = check_series(metas, min_slices=6)
    return check_seg(data, metas, geom, expected(s), [SegmentSpec.from_dict({"value": 1, "label": "Left atrium"})])


def store_scu(port: int, files, *, calling: str = "PACS", called: str = "CFRSEG", bind: str = "127.0.0.1"):
    """pynetdicom C-STORE of files, proposing each file's own transfer syntax; returns the statuses."""
    import pydicom
    from pynetdicom import AE

    dss = [pydicom.dcmread(f) for f in files]
    ae = AE(ae_title=calling)
    for ts in {str(d.file_meta.TransferSyntaxUID) for d in dss}:
        for c in {str(d.SOPClassUID) for d in dss}:
            ae.add_requested_context(c, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title=called, bind_address=(bind, 0))
    if not assoc.is_established:
        return assoc
    try:
        return [int(assoc.send_c_store(d).Status) for d in dss]
    finally:
        assoc.release()
