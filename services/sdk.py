"""A small Python SDK of the cfrseg gateway, on the generated stubs.

    from services.sdk import Client
    c = Client("127.0.0.1:50051", token)
    ds = c.create_dataset("data/my_set", name="la-3")       # images/ + labels/ folders, nnU-Net, LA ...
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
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from cfrseg.sam.weights import sha256_file  # noqa: F401  (re-exported)
from services.gen.cfrseg.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

CHUNK = 1 << 20
KINDS = {"image": gateway_pb2.VOLUME_KIND_IMAGE, "label": gateway_pb2.VOLUME_KIND_LABEL}
ROLES = {"labeled": gateway_pb2.CASE_ROLE_LABELED, "unlabeled": gateway_pb2.CASE_ROLE_UNLABELED,
         "test": gateway_pb2.CASE_ROLE_TEST}
FINAL = (common_pb2.RUN_STATE_SUCCEEDED, common_pb2.RUN_STATE_FAILED, common_pb2.RUN_STATE_CANCELLED)


def state_name(state: int) -> str:
    return common_pb2.RunState.Name(state).removeprefix("RUN_STATE_")


class Client:
    def __init__(self, address: str, token: str, tls_ca: str | None = None, *, max_message_mb: int = 16) -> None:
        opts = [("grpc.max_receive_message_length", max_message_mb << 20),
                ("grpc.max_send_message_length", max_message_mb << 20)]
        if tls_ca:
            creds = grpc.composite_channel_credentials(
                grpc.ssl_channel_credentials(Path(tls_ca).read_bytes()), grpc.access_token_call_credentials(token))
            self.channel = grpc.secure_channel(address, creds, options=opts)
        else:
            self.channel = grpc.insecure_channel(address, options=opts)
            self._md = (("authorization", f"Bearer {token}"),)
        self._tls = bool(tls_ca)
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)

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
                       request_id: str = "") -> gateway_pb2.Dataset:
        """Upload every volume of a dataset folder (any layout :func:`cfrseg.data.datasets.build_manifest` reads, volume
        files only) and create the dataset. ``test``: case ids to hold out for evaluation (need labels)."""
        from cfrseg.data.datasets import build_manifest

        m = build_manifest(folder, labeled=labeled, holdout=holdout, num_classes=num_classes)
        cases = []
        for c in m.cases:
            if Path(c.image).is_dir() or (c.label and Path(c.label).is_dir()):
                raise ValueError(f"case {c.case_id}: DICOM folders cannot be uploaded; convert to NIfTI first")
            img = self.upload_volume(c.image, "image")
            lab = self.upload_volume(c.label, "label") if c.label else None
            role = "test" if c.case_id in test else c.role
            if role == "unlabeled" and lab is not None and c.case_id not in test:
                lab = None  # an unlabeled case's label is not used for training; do not upload it as such
            cases.append(gateway_pb2.DatasetCase(case_id=c.case_id, image_upload_id=img.upload_id,
                                                 label_upload_id=lab.upload_id if lab else "", role=ROLES[role]))
        return self.stub.CreateDataset(gateway_pb2.CreateDatasetRequest(
            name=name or m.name, num_classes=m.num_classes, cases=cases, spacing=list(m.spacing or ()),
            request_id=request_id), **self._kw(600.0))

    def get_dataset(self, dataset_id: str) -> gateway_pb2.Dataset:
        return self.stub.GetDataset(gateway_pb2.GetDatasetRequest(dataset_id=dataset_id), **self._kw())

    # ---- runs ----
    def submit_run(self, dataset_id: str, *, profile: str = "tiny", ssl_method: str = "mt",
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
