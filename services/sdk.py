"""A small Python SDK of the cfrseg gateway, on the generated stubs.

    from services.sdk import Client
    c = Client("127.0.0.1:50051", token)                    # TLS: Client(addr, token, ca="ca.pem"[, cert, key])
    ds = c.create_dataset("data/my_set", name="la-3")       # images/ + labels/ folders, nnU-Net, LA h5 ...
    run = c.submit_run(ds.dataset_id, profile="tiny", ssl_method="mt")
    for ev in c.watch_run(run.run_id): print(ev.progress.stage, ev.progress.step, ev.progress.total)
    c.download_artifact(run.run_id, "retrain/model.pt", "model.pt")
    c.segment_file(run.model_id or run.run_id, "case.nii.gz", "case_label.nii.gz")

Errors are ``grpc.RpcError`` with the server's status code and message.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from cfrseg.sam.weights import sha256_file  # noqa: F401  (re-exported)
from services.gen.cfrseg.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, pacs_pb2

CHUNK = 1 << 20
UPLOADABLE = (".nii.gz", ".nii", ".nrrd", ".mha")  # the gateway's single-file formats
KINDS = {"image": gateway_pb2.VOLUME_KIND_IMAGE, "label": gateway_pb2.VOLUME_KIND_LABEL}
ROLES = {"labeled": gateway_pb2.CASE_ROLE_LABELED, "unlabeled": gateway_pb2.CASE_ROLE_UNLABELED,
         "test": gateway_pb2.CASE_ROLE_TEST}
FINAL = (common_pb2.RUN_STATE_SUCCEEDED, common_pb2.RUN_STATE_FAILED, common_pb2.RUN_STATE_CANCELLED)


def _uploadable(path: str, kind: str, spacing: Sequence[float] | None, tmp: Path, case_id: str) -> Path:
    """``path`` itself when the gateway takes it (a single .nii.gz/.nii/.nrrd/.mha file), else a .nii.gz
    conversion in ``tmp`` with the volume's geometry (LA h5: ``spacing``, default 0.625 mm)."""
    from cfrseg.data.io import read_la_h5, read_volume, write_volume

    p = Path(path)
    if p.is_file() and p.name.lower().endswith(UPLOADABLE):
        return p
    if p.name.lower().endswith((".h5", ".hdf5")):
        vol = read_la_h5(p, kind, tuple(spacing)) if spacing else read_la_h5(p, kind)  # type: ignore[arg-type]
    else:  # .mhd (+ its data file), DICOM series folder
        vol = read_volume(p)
    out = tmp / f"{case_id}_{kind}.nii.gz"
    write_volume(vol, out, label=kind == "label")
    return out


PACS_FINAL = (pacs_pb2.PACS_JOB_STATE_DONE, pacs_pb2.PACS_JOB_STATE_IGNORED, pacs_pb2.PACS_JOB_STATE_REJECTED,
              pacs_pb2.PACS_JOB_STATE_FAILED)


def state_name(state: int) -> str:
    return common_pb2.RunState.Name(state).removeprefix("RUN_STATE_")


def pacs_state_name(state: int) -> str:
    return pacs_pb2.PacsJobState.Name(state).removeprefix("PACS_JOB_STATE_")


class Client:
    """A connection to the gateway.

    Args:
        address: ``host:port`` of the gateway.
        token: the bearer token.
        ca: CA bundle (PEM path) to verify the gateway's certificate: TLS. ``tls=True`` without ``ca`` uses the
            system's trusted roots.
        client_cert, client_key: this client's certificate chain and key (PEM paths) for a gateway that requires
            client certificates (mTLS); implies TLS.
        server_name: check the gateway's certificate against this name instead of the host of ``address``
            (e.g. when connecting through a tunnel or to an IP address).
        keepalive_s: HTTP/2 keepalive ping period (long watch streams survive idle NATs and firewalls).
    """

    def __init__(self, address: str, token: str, ca: str | None = None, client_cert: str | None = None,
                 client_key: str | None = None, *, tls: bool | None = None, server_name: str | None = None,
                 max_message_mb: int = 16, keepalive_s: float = 60.0, tls_ca: str | None = None) -> None:
        from services.common.tls import channel_credentials, keepalive_options

        ca = ca or tls_ca  # tls_ca: the former name of `ca`
        opts: list[tuple[str, Any]] = [("grpc.max_receive_message_length", max_message_mb << 20),
                                       ("grpc.max_send_message_length", max_message_mb << 20),
                                       *keepalive_options(keepalive_s, server=False)]
        if server_name:
            opts.append(("grpc.ssl_target_name_override", server_name))
        self._tls = bool(ca or client_cert or tls)
        self._client_cert = bool(client_cert)
        if self._tls:
            creds = grpc.composite_channel_credentials(
                channel_credentials(ca or "", client_cert or "", client_key or ""),
                grpc.access_token_call_credentials(token))
            self.channel = grpc.secure_channel(address, creds, options=opts)
        else:
            self.channel = grpc.insecure_channel(address, options=opts)
            self._md = (("authorization", f"Bearer {token}"),)
        self.address = address
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)

    def explain(self, err: grpc.RpcError) -> str:
        """A hint for an error that looks like a TLS/mTLS mismatch ("" when there is none)."""
        from services.common.tls import explain

        return explain(err, tls=self._tls, client_cert=self._client_cert)

    def _kw(self, timeout: float | None = 60.0) -> dict[str, Any]:
        kw: dict[str, Any] = {"timeout": timeout}
        if not self._tls:
            kw["metadata"] = self._md
        return kw

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- uploads and datasets ----
    def upload_volume(self, path: str | Path, kind: str = "image", *, sha256: str | None = None,
                      timeout: float | None = 3600.0) -> gateway_pb2.Upload:
        p = Path(path)
        size = p.stat().st_size
        digest = sha256 or sha256_file(p)

        def messages() -> Iterator[gateway_pb2.UploadVolumeRequest]:
            yield gateway_pb2.UploadVolumeRequest(header=gateway_pb2.UploadHeader(
                filename=p.name, size=size, sha256=digest, kind=KINDS[kind]))
            with open(p, "rb") as f:
                for b in iter(lambda: f.read(CHUNK), b""):
                    yield gateway_pb2.UploadVolumeRequest(chunk=b)

        return self.stub.UploadVolume(messages(), **self._kw(timeout))

    def create_dataset(self, folder: str | Path, *, name: str | None = None, num_classes: int | None = None,
                       labeled: int | Sequence[str] | None = None, holdout: int = 0, test: Sequence[str] = (),
                       request_id: str = "", subject: str | None = None,
                       class_names: Sequence[str] | None = None, modality: str | None = None,
                       progress: Callable[[str, int, int], None] | None = None) -> gateway_pb2.Dataset:
        """Upload every volume of a dataset folder and create the dataset.

        Any layout :func:`cfrseg.data.datasets.build_manifest` reads: the LA h5 layout (``train.list`` +
        ``<id>/mri_norm2.h5``), nnU-Net/MSD, ``images/`` + ``labels/`` folders. Volumes the gateway does not take
        as they are (LA ``.h5``, two-file ``.mhd``, DICOM series folders) are converted here to ``.nii.gz`` with
        their geometry (LA: the manifest's spacing, 0.625 mm), one case at a time in a temp folder.
        ``test``: case ids to hold out for evaluation (need labels). ``progress(case_id, done, total)`` is called
        after each case. ``subject``: a regular expression that groups cases by patient (``labeled`` as a number
        and ``holdout`` then count patients; :func:`cfrseg.data.datasets.subject_of`). ``class_names``
        (background first, or foreground only) and ``modality`` ("MR" | "CT") default as in ``cfrseg run``: the
        folder's dataset.json, else ``background, class_1, ...`` and MR; they are stored with the dataset."""
        from cfrseg.data.datasets import build_manifest

        m = build_manifest(folder, labeled=labeled, holdout=holdout, num_classes=num_classes, subject=subject,
                           class_names=class_names, modality=modality)
        cases = []
        with tempfile.TemporaryDirectory(prefix="cfrseg-upload-") as tmp:
            for k, c in enumerate(m.cases):
                role = "test" if c.case_id in test else c.role
                img = self.upload_volume(_uploadable(c.image, "image", m.spacing, Path(tmp), c.case_id), "image")
                lab = None
                if c.label and (role != "unlabeled" or c.case_id in test):
                    # an unlabeled case's label is not used for training: it is not uploaded as such
                    lab = self.upload_volume(_uploadable(c.label, "label", m.spacing, Path(tmp), c.case_id),
                                             "label")
                for f in Path(tmp).iterdir():
                    f.unlink()
                cases.append(gateway_pb2.DatasetCase(case_id=c.case_id, image_upload_id=img.upload_id,
                                                     label_upload_id=lab.upload_id if lab else "",
                                                     role=ROLES[role]))
                if progress is not None:
                    progress(c.case_id, k + 1, len(m.cases))
        return self.stub.CreateDataset(gateway_pb2.CreateDatasetRequest(
            name=name or m.name, num_classes=m.num_classes, cases=cases, spacing=list(m.spacing or ()),
            class_names=list(m.class_names or ()), modality=m.modality, request_id=request_id),
            **self._kw(600.0))

    def get_dataset(self, dataset_id: str) -> gateway_pb2.Dataset:
        return self.stub.GetDataset(gateway_pb2.GetDatasetRequest(dataset_id=dataset_id), **self._kw())

    # ---- runs ----
    def submit_run(self, dataset_id: str, *, profile: str = "", ssl_method: str = "mt",
                   labeled: Sequence[str] = (), unlabeled: Sequence[str] = (),
                   overrides: dict[str, dict[str, Any]] | None = None, name: str = "",
                   request_id: str | None = None) -> gateway_pb2.Run:
        return self.stub.SubmitRun(gateway_pb2.SubmitRunRequest(
            dataset_id=dataset_id, profile=profile, ssl_method=ssl_method, labeled_case_ids=list(labeled),
            unlabeled_case_ids=list(unlabeled), config_overrides_json=json.dumps(overrides) if overrides else "",
            name=name, request_id=request_id if request_id is not None else uuid.uuid4().hex), **self._kw())

    def watch_run(self, run_id: str, timeout: float | None = None) -> Iterator[gateway_pb2.RunEvent]:
        """Events of the run until it ends (the current state first)."""
        yield from self.stub.WatchRun(gateway_pb2.WatchRunRequest(run_id=run_id), **self._kw(timeout))

    def wait_run(self, run_id: str, timeout: float | None = None) -> gateway_pb2.Run:
        for _ in self.watch_run(run_id, timeout):
            pass
        return self.get_run(run_id)

    def get_run(self, run_id: str) -> gateway_pb2.Run:
        return self.stub.GetRun(gateway_pb2.GetRunRequest(run_id=run_id), **self._kw())

    def list_runs(self, *, state: str = "", dataset_id: str = "") -> list[gateway_pb2.Run]:
        st = common_pb2.RunState.Value(f"RUN_STATE_{state.upper()}") if state else 0
        out, token = [], ""
        while True:
            r = self.stub.ListRuns(gateway_pb2.ListRunsRequest(page_token=token, state=st, dataset_id=dataset_id),
                                   **self._kw())
            out.extend(r.runs)
            token = r.next_page_token
            if not token:
                return out

    def cancel_run(self, run_id: str) -> gateway_pb2.Run:
        return self.stub.CancelRun(gateway_pb2.CancelRunRequest(run_id=run_id), **self._kw())

    # ---- models, segmentation, artifacts ----
    def list_models(self) -> list[gateway_pb2.Model]:
        return list(self.stub.ListModels(gateway_pb2.ListModelsRequest(), **self._kw()).models)

    def segment_file(self, model_id: str, path: str | Path, out: str | Path | None = None,
                     timeout: float | None = 900.0) -> gateway_pb2.SegmentResult:
        """Segment a volume file; with ``out`` the label map is written there (NIfTI, source geometry)."""
        p = Path(path)

        def messages() -> Iterator[gateway_pb2.SegmentRequest]:
            yield gateway_pb2.SegmentRequest(header=gateway_pb2.SegmentHeader(
                model_id=model_id, filename=p.name, size=p.stat().st_size, sha256=sha256_file(p),
                return_file=out is not None))
            with open(p, "rb") as f:
                for b in iter(lambda: f.read(CHUNK), b""):
                    yield gateway_pb2.SegmentRequest(chunk=b)

        result = None
        fh = None
        try:
            for msg in self.stub.Segment(messages(), **self._kw(timeout)):
                if msg.WhichOneof("msg") == "result":
                    result = msg.result
                    if out is not None:
                        Path(out).parent.mkdir(parents=True, exist_ok=True)
                        fh = open(str(out) + ".part", "wb")
                elif fh is not None:
                    fh.write(msg.chunk)
        finally:
            if fh is not None:
                fh.close()
        if out is not None:
            os.replace(str(out) + ".part", out)
        assert result is not None
        return result

    def health(self, include_components: bool = True, timeout: float | None = 15.0):
        """The gateway's health report with each check's reason, and (``include_components``) each stage
        service's (``cfrseg.v1.HealthReport``)."""
        from services.gen.cfrseg.v1 import status_pb2, status_pb2_grpc

        return status_pb2_grpc.StatusServiceStub(self.channel).GetHealth(
            status_pb2.GetHealthRequest(include_components=include_components), **self._kw(timeout))

    def list_artifacts(self, run_id: str) -> list[common_pb2.ObjectRef]:
        return list(self.stub.ListArtifacts(gateway_pb2.ListArtifactsRequest(run_id=run_id), **self._kw()).artifacts)

    def download_artifact(self, run_id: str, name: str, dest: str | Path,
                          timeout: float | None = 3600.0) -> Path:
        """Download ``runs/{run_id}/{name}`` to ``dest`` (a file path, or an existing folder); checks sha256."""
        dest = Path(dest)
        info = None
        h = hashlib.sha256()
        tmp = None
        fh = None
        try:
            for msg in self.stub.DownloadArtifact(gateway_pb2.DownloadArtifactRequest(run_id=run_id, name=name),
                                                  **self._kw(timeout)):
                if msg.WhichOneof("msg") == "info":
                    info = msg.info
                    if dest.is_dir():
                        dest = dest / info.filename
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    tmp = Path(str(dest) + ".part")
                    fh = open(tmp, "wb")
                else:
                    h.update(msg.chunk)
                    fh.write(msg.chunk)  # type: ignore[union-attr]
        finally:
            if fh is not None:
                fh.close()
        assert info is not None and tmp is not None
        if info.ref.sha256 and h.hexdigest() != info.ref.sha256:
            tmp.unlink(missing_ok=True)
            raise OSError(f"download of {name}: sha256 mismatch (got {h.hexdigest()}, expected {info.ref.sha256})")
        os.replace(tmp, dest)
        return dest

    # ---- PACS (docs/pacs.md) ----
    def list_pacs_jobs(self, *, state: str = "", study_uid: str = "", series_uid: str = "",
                       route: str = "") -> list[pacs_pb2.PacsJob]:
        st = pacs_pb2.PacsJobState.Value(f"PACS_JOB_STATE_{state.upper()}") if state else 0
        out, token = [], ""
        while True:
            r = self.stub.ListPacsJobs(pacs_pb2.ListPacsJobsRequest(
                page_token=token, state=st, study_uid=study_uid, series_uid=series_uid, route=route), **self._kw())
            out.extend(r.jobs)
            token = r.next_page_token
            if not token:
                return out

    def get_pacs_job(self, job_id: str) -> pacs_pb2.PacsJob:
        return self.stub.GetPacsJob(pacs_pb2.GetPacsJobRequest(job_id=job_id), **self._kw())

    def retry_pacs_job(self, job_id: str, force: bool = False) -> pacs_pb2.PacsJob:
        return self.stub.RetryPacsJob(pacs_pb2.RetryPacsJobRequest(job_id=job_id, force=force), **self._kw())

    def segment_study(self, source: str, study_uid: str, *, series_uid: str = "", route: str = "",
                      method: str = "", timeout: float | None = 120.0) -> pacs_pb2.SegmentStudyResponse:
        return self.stub.SegmentStudy(pacs_pb2.SegmentStudyRequest(
            source=source, study_uid=study_uid, series_uid=series_uid, route=route, method=method),
            **self._kw(timeout))

    def wait_pacs_job(self, job_id: str, timeout: float = 600.0, poll_s: float = 0.5) -> pacs_pb2.PacsJob:
        """Poll a PACS job until it ends (DONE, IGNORED, REJECTED, FAILED); TimeoutError otherwise."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            j = self.get_pacs_job(job_id)
            if j.state in PACS_FINAL or time.monotonic() > deadline:
                if j.state not in PACS_FINAL:
                    raise TimeoutError(f"PACS job {job_id} still {pacs_state_name(j.state)} after {timeout:.0f} s")
                return j
            time.sleep(poll_s)
