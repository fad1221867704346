"""The retrain servicer: the generic stage RPCs plus Segment (one volume in the object store -> a label map).

Segment computes on the service's device under the same device lock as the stage jobs (services/common/device.py):
it waits up to ``CFRSEG_GPU_WAIT_S`` for a busy device, then answers RESOURCE_EXHAUSTED naming the holder (the
orchestrator's evaluation step backs off and retries; a client retries later)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import grpc

from cfrseg.errors import InputError
from services.common import convert
from services.common.device import release_memory
from services.common.errors import ServiceError, unary
from services.common.s3store import sha256_file
from services.common.stage import RUN_ID, StageServicer, load_impl
from services.gen.cfrseg.v1 import retrain_pb2

log = logging.getLogger("cfrseg.services.retrain")
MODEL_FILE = "model.pt"
DEFAULT_SEGMENT = "services.retrain.stage:segment"


def volume_suffix(key: str) -> str:
    k = key.lower()
    for s in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if k.endswith(s):
            return s
    raise InputError(f"volume {key!r}: unsupported format (use .nii.gz, .nii, .nrrd or .mha)")


class RetrainServicer(StageServicer):
    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self._segment = load_impl(self.settings.segment_impl or DEFAULT_SEGMENT)

    def _model_dir(self, model_id: str) -> Path:
        """Local copy of runs/{model_id}/retrain/model.pt, refreshed when the stored one changes."""
        key = f"runs/{model_id}/retrain/{MODEL_FILE}"
        if not self.store.exists(key):
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"no trained model for {model_id!r}")
        ref = self.store.ref(key)
        d = self.workdir / "models" / model_id / ref.sha256[:16]
        if not (d / MODEL_FILE).is_file():
            self.store.get_file(key, d / MODEL_FILE)
        return d

    def _segment_on_device(self, model_id: str, model_dir: Path, image: Path, out: Path,
                           overrides: dict[str, Any]) -> dict[str, Any]:
        """Run the segmentation holding the device lock (one job per device, Segment included)."""
        if self._device_problem:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, f"retrain service: {self._device_problem}")
        lock = self.new_device_lock()
        holder = {"service": "retrain", "run_id": model_id, "what": "segment"}
        if not lock.acquire(holder, timeout=self.settings.gpu_wait_s):
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{lock.waiting_message().replace('waiting for', 'busy:', 1)} after waiting "
                               f"{self.settings.gpu_wait_s:.0f} s; retry later")
        try:
            return self._segment(model_dir, image, out, overrides, self.device)
        finally:
            try:
                release_memory()
            finally:
                lock.release()

    @unary
    def Segment(self, req: retrain_pb2.SegmentVolumeRequest, context: grpc.ServicerContext):
        if not RUN_ID.match(req.model_id or ""):
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"invalid model_id {req.model_id!r}")
        if not req.volume.key:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "volume.key is required")
        try:
            overrides = json.loads(req.infer_config_json) if req.infer_config_json else {}
        except json.JSONDecodeError as e:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"infer_config_json: {e}") from None
        if not isinstance(overrides, dict):
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "infer_config_json must be a JSON object")
        suffix = volume_suffix(req.volume.key)
        model_dir = self._model_dir(req.model_id)
        t0 = time.monotonic()
        scratch = self.workdir / "segment" / uuid.uuid4().hex
        try:
            image = scratch / f"volume{suffix}"
            self.store.get_file(req.volume.key, image)
            digest = sha256_file(image)
            if req.volume.sha256 and req.volume.sha256.lower() != digest:
                raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"volume {req.volume.key!r}: sha256 does not match the request")
            opts = hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]
            out_key = f"segmentations/{req.model_id}/{digest}/label.nii.gz"
            if overrides:
                out_key = f"segmentations/{req.model_id}/{digest}/label-{opts}.nii.gz"
            meta_key = out_key.replace(".nii.gz", ".json")
            if self.store.exists(out_key) and self.store.exists(meta_key):
                info = json.loads(self.store.get_bytes(meta_key))
            else:
                out = scratch / "label.nii.gz"
                info = self._segment_on_device(req.model_id, model_dir, image, out, overrides)
                self.store.put_file(out_key, out)
                self.store.put_bytes(meta_key, json.dumps(info or {}).encode())
            ref = self.store.ref(out_key)
            return retrain_pb2.SegmentVolumeResponse(
                label=convert.object_ref({"key": ref.key, "sha256": ref.sha256, "size": ref.size}),
                num_classes=int((info or {}).get("num_classes", 0)), seconds=time.monotonic() - t0,
                time=convert.ts(time.time()))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
