"""The Gateway servicer: the public API (protos/cfrseg/v1/gateway.proto). Thin: each RPC validates, delegates to
:mod:`uploads`, :mod:`datasets`, :mod:`runs`, and converts. Errors become status codes through
:mod:`services.common.errors`."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from cfrseg.errors import InputError, NotFoundError
from cfrseg.store import check_key
from services.common.errors import ServiceError, stream, unary
from services.common.s3store import S3Store
from services.gateway.datasets import Datasets
from services.gateway.pacs import to_job
from services.gateway.runs import Runs, page, to_event, to_model, to_run
from services.gateway.uploads import Uploads, check_header, receive_chunks
from services.gen.cfrseg.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, pacs_pb2, retrain_pb2
from services.orchestrator.records import FINAL_STATES, check_id

log = logging.getLogger("cfrseg.gateway")
WATCH_POLL_S = 0.25
SEGMENT_TIMEOUT_S = 600.0
HIDDEN = ("record.json", "jobs/")  # internal bookkeeping under runs/{id}/, not artifacts
CONTENT_TYPES = {".json": "application/json", ".md": "text/markdown", ".png": "image/png",
                 ".gz": "application/gzip", ".pt": "application/octet-stream"}


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, store: S3Store, uploads: Uploads, datasets: Datasets, runs: Runs, retrain: Any,
                 pacs: Any = None) -> None:
        self.store = store
        self.uploads = uploads
        self.datasets = datasets
        self.runs = runs
        self.retrain = retrain  # RetrainService stub (Segment)
        self.pacs = pacs        # services.gateway.pacs.PacsApi (PACS jobs, pull mode, model classes)

    # ---- uploads and datasets ----
    @unary
    def UploadVolume(self, request_iterator, context):
        return self.uploads.receive(request_iterator)

    @unary
    def CreateDataset(self, request, context):
        return self.datasets.create(request)

    @unary
    def GetDataset(self, request, context):
        return self.datasets.get(request.dataset_id)

    @unary
    def ListDatasets(self, request, context):
        items, nxt = page(self.datasets.list(), request.page_size, request.page_token)
        return gateway_pb2.ListDatasetsResponse(datasets=items, next_page_token=nxt)

    # ---- runs ----
    @unary
    def SubmitRun(self, request, context):
        return to_run(self.runs.submit(request))

    @stream
    def WatchRun(self, request, context) -> Iterator[gateway_pb2.RunEvent]:
        check_id(request.run_id, "run id")
        rec = self.runs.get(request.run_id)
        yield to_event(rec)
        last = (rec.get("seq"), rec["state"])
        stage = rec.get("stage", "")
        while rec["state"] not in FINAL_STATES and context.is_active():
            time.sleep(WATCH_POLL_S)
            rec = self.runs.get(request.run_id)
            if (rec.get("seq"), rec["state"]) != last:
                last = (rec.get("seq"), rec["state"])
                if rec.get("stage") != stage and stage in rec["stages"]:
                    yield to_event(rec, stage)  # how the previous stage ended
                stage = rec.get("stage", "")
                yield to_event(rec)

    @unary
    def GetRun(self, request, context):
        check_id(request.run_id, "run id")
        return to_run(self.runs.get(request.run_id))

    @unary
    def ListRuns(self, request, context):
        recs = self.runs.all()
        if request.state:
            name = common_pb2.RunState.Name(request.state).removeprefix("RUN_STATE_")
            recs = [r for r in recs if r["state"] == name]
        if request.dataset_id:
            recs = [r for r in recs if r["dataset_id"] == request.dataset_id]
        items, nxt = page(recs, request.page_size, request.page_token)
        return gateway_pb2.ListRunsResponse(runs=[to_run(r) for r in items], next_page_token=nxt)

    @unary
    def CancelRun(self, request, context):
        return to_run(self.runs.cancel(request.run_id))

    # ---- models and segmentation ----
    @unary
    def ListModels(self, request, context):
        recs = [r for r in self.runs.all() if r["state"] == "SUCCEEDED" and r.get("model_id")]
        items, nxt = page(recs, request.page_size, request.page_token)
        models = [to_model(r) for r in items]
        if self.pacs is not None:
            for m in models:
                m.classes.extend(self.pacs.model_classes(m.model_id))
        return gateway_pb2.ListModelsResponse(models=models, next_page_token=nxt)

    def _model_run(self, model_id: str) -> dict:
        check_id(model_id, "model id")
        try:
            rec = self.runs.get(model_id)
        except NotFoundError:
            raise NotFoundError(f"no model {model_id!r}") from None
        if not rec.get("model_id"):
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"run {model_id!r} has no trained model yet (state {rec['state']})")
        return rec

    @stream
    def Segment(self, request_iterator, context) -> Iterator[gateway_pb2.SegmentResponse]:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("msg") != "header":
            raise InputError("segment: the first message must be the header (model_id, volume)")
        hd = first.header
        self._model_run(hd.model_id)
        if hd.volume_upload_id:
            up = self.uploads.get(hd.volume_upload_id)
            if up.kind != gateway_pb2.VOLUME_KIND_IMAGE:
                raise InputError(f"upload {up.upload_id!r} is not an image")
            if next(request_iterator, None) is not None:
                raise InputError("segment: no chunks may follow a header with volume_upload_id")
        else:
            suffix = check_header(hd.filename, hd.size, hd.sha256, self.uploads.max_bytes)
            with self.uploads.temp_dir() as d:
                chunks = (m.chunk for m in _only_chunks(request_iterator, hd.filename))
                got = receive_chunks(chunks, Path(d) / f"volume{suffix}", hd.filename, hd.size, hd.sha256)
                up = self.uploads.store_file(got, hd.filename, gateway_pb2.VOLUME_KIND_IMAGE)
        t0 = time.monotonic()
        try:
            resp = self.retrain.Segment(retrain_pb2.SegmentVolumeRequest(model_id=hd.model_id, volume=up.ref),
                                        timeout=SEGMENT_TIMEOUT_S)
        except grpc.RpcError as e:
            raise ServiceError(e.code(), f"segment: {e.details()}") from None
        yield gateway_pb2.SegmentResponse(result=gateway_pb2.SegmentResult(
            label=resp.label, model_id=hd.model_id, num_classes=resp.num_classes, seconds=time.monotonic() - t0))
        if hd.return_file:
            for chunk in self.store.iter_chunks(resp.label.key):
                yield gateway_pb2.SegmentResponse(chunk=chunk)

    # ---- artifacts ----
    def _artifact_keys(self, run_id: str) -> list[str]:
        check_id(run_id, "run id")
        self.runs.get(run_id)  # NOT_FOUND for unknown runs
        prefix = f"runs/{run_id}/"
        return [k for k in self.store.list(prefix) if not k[len(prefix):].startswith(HIDDEN)]

    @unary
    def ListArtifacts(self, request, context):
        refs = []
        for k in self._artifact_keys(request.run_id):
            r = self.store.ref(k)
            refs.append(common_pb2.ObjectRef(key=k, sha256=r.sha256, size=r.size))
        return gateway_pb2.ListArtifactsResponse(artifacts=refs)

    @stream
    def DownloadArtifact(self, request, context) -> Iterator[gateway_pb2.DownloadChunk]:
        check_id(request.run_id, "run id")
        try:
            name = check_key(request.name)
        except InputError:
            raise InputError(f"invalid artifact name {request.name!r}: a relative path under the run, "
                             f"e.g. 'retrain/model.pt'") from None
        if name.startswith(HIDDEN):
            raise NotFoundError(f"run {request.run_id!r} has no artifact {name!r}")
        self.runs.get(request.run_id)
        key = f"runs/{request.run_id}/{name}"
        try:
            ref = self.store.ref(key)
        except NotFoundError:
            raise NotFoundError(f"run {request.run_id!r} has no artifact {name!r}") from None
        ext = Path(name).suffix.lower()
        yield gateway_pb2.DownloadChunk(info=gateway_pb2.ArtifactInfo(
            ref=common_pb2.ObjectRef(key=key, sha256=ref.sha256, size=ref.size), filename=Path(name).name,
            content_type=CONTENT_TYPES.get(ext, "application/octet-stream")))
        for chunk in self.store.iter_chunks(key):
            yield gateway_pb2.DownloadChunk(chunk=chunk)

    # ---- PACS (services/gateway/pacs.py) ----
    @unary
    def ListPacsJobs(self, request, context):
        items, nxt = page(self.pacs.list(request), request.page_size, request.page_token)
        return pacs_pb2.ListPacsJobsResponse(jobs=[to_job(r) for r in items], next_page_token=nxt)

    @unary
    def GetPacsJob(self, request, context):
        return to_job(self.pacs.get(request.job_id))

    @unary
    def RetryPacsJob(self, request, context):
        return to_job(self.pacs.retry(request.job_id, request.force))

    @unary
    def SegmentStudy(self, request, context):
        return self.pacs.segment_study(request)


def _only_chunks(messages: Iterator, filename: str) -> Iterator:
    for m in messages:
        if m.WhichOneof("msg") != "chunk":
            raise InputError(f"segment {filename!r}: only the first message may be a header")
        yield m
