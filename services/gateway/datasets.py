"""Datasets: validated sets of uploaded volumes with roles, stored as ``datasets/{dataset_id}/manifest.json`` (a
cfrseg manifest whose file fields are object keys) and ``datasets/{dataset_id}/dataset.json`` (the API message).

Validation downloads the files to a temp folder and runs the core's checks (:func:`cfrseg.data.datasets.load_case`:
readable 3D images with finite values, label geometry equal to the image's, integer label values in
``[0, num_classes)``, foreground in labeled cases; every declared class has voxels in the labeled cases). Messages name the case and the uploaded file, never the
temp path.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import json_format

from cfrseg.data.manifest import Case, Manifest
from cfrseg.errors import InputError, NotFoundError
from services.common import convert
from services.common.errors import ServiceError
from services.common.jobstore import JobStore
from services.common.s3store import S3Store
from services.gateway.uploads import Uploads
from services.gen.cfrseg.v1 import common_pb2, gateway_pb2
from services.orchestrator.records import check_id, new_id

CASE_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_CLASSES = 256
ROLE_NAMES = {gateway_pb2.CASE_ROLE_LABELED: "labeled", gateway_pb2.CASE_ROLE_UNLABELED: "unlabeled",
              gateway_pb2.CASE_ROLE_TEST: "test"}


def request_key(kind: str, request_id: str) -> str:
    """Idempotency record of a client request id (hashed: client text never becomes a key)."""
    return f"requests/{kind}/{hashlib.sha256(request_id.encode()).hexdigest()[:40]}.json"


def request_hash(msg) -> str:
    d = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    d.pop("request_id", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def _role(c: gateway_pb2.DatasetCase) -> str:
    if c.role == gateway_pb2.CASE_ROLE_UNSPECIFIED:
        return "labeled" if c.label_upload_id else "unlabeled"
    if c.role not in ROLE_NAMES:
        raise InputError(f"case {c.case_id!r}: unknown role {c.role}")
    return ROLE_NAMES[c.role]


class Datasets:
    def __init__(self, store: S3Store, jobs: JobStore, uploads: Uploads) -> None:
        self.store = store
        self.jobs = jobs
        self.uploads = uploads

    # ---- reading ----
    def get(self, dataset_id: str) -> gateway_pb2.Dataset:
        check_id(dataset_id, "dataset id")
        try:
            d = json.loads(self.store.get_bytes(f"datasets/{dataset_id}/dataset.json"))
        except NotFoundError:
            raise NotFoundError(f"no dataset {dataset_id!r}") from None
        return json_format.ParseDict(d, gateway_pb2.Dataset(), ignore_unknown_fields=True)

    def manifest(self, dataset_id: str) -> Manifest:
        check_id(dataset_id, "dataset id")
        return Manifest.from_dict(json.loads(self.store.get_bytes(f"datasets/{dataset_id}/manifest.json")))

    def list(self) -> list[gateway_pb2.Dataset]:
        ids = [k.split("/")[1] for k in self.store.list("datasets/") if k.endswith("/dataset.json")]
        out = [self.get(i) for i in ids]
        return sorted(out, key=lambda d: (d.created.ToNanoseconds(), d.dataset_id), reverse=True)

    # ---- creating ----
    def create(self, req: gateway_pb2.CreateDatasetRequest) -> gateway_pb2.Dataset:
        if req.request_id:
            key = request_key("datasets", req.request_id)
            with self.jobs.lock(key):
                seen = self.jobs.find(key)
                if seen is not None:
                    if seen["hash"] != request_hash(req):
                        raise ServiceError(grpc.StatusCode.ALREADY_EXISTS,
                                           f"request_id {req.request_id!r} was already used for a different "
                                           f"dataset ({seen['dataset_id']})")
                    return self.get(seen["dataset_id"])
                ds = self._create(req)
                self.jobs.put(key, {"dataset_id": ds.dataset_id, "hash": request_hash(req)})
                return ds
        return self._create(req)

    def _check_request(self, req: gateway_pb2.CreateDatasetRequest) -> list[tuple[gateway_pb2.DatasetCase, str]]:
        name = req.name.strip()
        if not name or len(name) > 128:
            raise InputError("dataset name must be 1-128 characters")
        if not 2 <= req.num_classes <= MAX_CLASSES:
            raise InputError(f"num_classes must be in [2, {MAX_CLASSES}] (background included), got "
                             f"{req.num_classes}")
        if not req.cases:
            raise InputError("a dataset needs at least one case")
        bad = [n for n in req.class_names if not 1 <= len(n.strip()) <= 64 or any(ord(ch) < 32 for ch in n)]
        if bad:
            raise InputError(f"class names must be 1-64 printable characters (they become DICOM SEG segment "
                             f"labels), got {bad[:3]}")
        if req.spacing and (len(req.spacing) != 3 or any(not s > 0 for s in req.spacing)):
            raise InputError(f"spacing must be three positive numbers (x, y, z mm), got {list(req.spacing)}")
        seen: set[str] = set()
        out = []
        for c in req.cases:
            if not CASE_ID_RE.match(c.case_id) or c.case_id in (".", ".."):
                raise InputError(f"invalid case id {c.case_id!r}: use 1-64 characters of [A-Za-z0-9_.-]")
            if c.case_id in seen:
                raise InputError(f"duplicate case id {c.case_id!r}")
            seen.add(c.case_id)
            role = _role(c)
            if role in ("labeled", "test") and not c.label_upload_id:
                raise InputError(f"case {c.case_id!r} is {role} but has no label_upload_id")
            out.append((c, role))
        if not any(r == "labeled" for _, r in out):
            raise InputError("empty label set: a dataset needs at least one labeled case (image + label)")
        return out

    def _create(self, req: gateway_pb2.CreateDatasetRequest) -> gateway_pb2.Dataset:
        from cfrseg.data.datasets import class_presence_error, load_case

        cases = self._check_request(req)
        ups = {}
        for c, _ in cases:
            for uid, kind, what in ((c.image_upload_id, gateway_pb2.VOLUME_KIND_IMAGE, "image"),
                                    (c.label_upload_id, gateway_pb2.VOLUME_KIND_LABEL, "label")):
                if not uid:
                    continue
                try:
                    up = self.uploads.get(uid)
                except NotFoundError:
                    raise NotFoundError(f"case {c.case_id!r}: no upload {uid!r} ({what})") from None
                if up.kind != kind:
                    raise InputError(f"case {c.case_id!r}: upload {uid!r} ({up.filename}) was uploaded as "
                                     f"{gateway_pb2.VolumeKind.Name(up.kind)}, expected "
                                     f"{gateway_pb2.VolumeKind.Name(kind)} for the {what}")
                ups[uid] = up
        spacing = tuple(float(s) for s in req.spacing) if req.spacing else None
        keyed = Manifest(req.name.strip(), int(req.num_classes), tuple(
            Case(c.case_id, ups[c.image_upload_id].ref.key,
                 ups[c.label_upload_id].ref.key if c.label_upload_id else None, role)  # type: ignore[arg-type]
            for c, role in cases), spacing, modality=req.modality.upper() or "MR",
            class_names=tuple(req.class_names) or None)
        with self.uploads.temp_dir() as d:
            names: dict[str, str] = {}
            local_cases = []
            for case, (c, _) in zip(keyed.cases, cases):
                img = self._fetch(ups[c.image_upload_id], Path(d), names)
                lab = self._fetch(ups[c.label_upload_id], Path(d), names) if c.label_upload_id else None
                local_cases.append(Case(case.case_id, img, lab, case.role))
            local = replace(keyed, cases=tuple(local_cases))
            counts = np.zeros(keyed.num_classes, dtype=np.int64)
            for case in local.cases:
                try:
                    _, label = load_case(case, local)
                except InputError as e:
                    msg = str(e)
                    for path, name in names.items():
                        msg = msg.replace(path, name)
                    raise InputError(msg) from None
                if case.role == "labeled" and label is not None:
                    counts += np.bincount(label.array.reshape(-1).astype(np.int64),
                                          minlength=keyed.num_classes)[: keyed.num_classes]
            err = class_presence_error(counts, keyed.names, f"dataset {keyed.name!r}")
            if err is not None:   # e.g. labels {0, 7} declared as 8 classes: refuse instead of training 8
                raise err
        return self._store(req, keyed, cases)

    def _fetch(self, up: gateway_pb2.Upload, d: Path, names: dict[str, str]) -> str:
        p = d / up.upload_id / Path(up.ref.key).name
        self.store.get_file(up.ref.key, p)
        names[str(p)] = f"upload {up.upload_id} ({up.filename})"
        return str(p)

    def _store(self, req: gateway_pb2.CreateDatasetRequest, keyed: Manifest,
               cases: list[tuple[gateway_pb2.DatasetCase, str]]) -> gateway_pb2.Dataset:
        dataset_id = new_id("ds")
        mkey = f"datasets/{dataset_id}/manifest.json"
        data = keyed.to_json().encode()
        self.store.put_bytes(mkey, data)
        roles = [r for _, r in cases]
        inv = {v: k for k, v in ROLE_NAMES.items()}
        ds = gateway_pb2.Dataset(
            dataset_id=dataset_id, name=keyed.name, num_classes=keyed.num_classes, class_names=list(keyed.names),
            modality=keyed.modality,
            num_labeled=roles.count("labeled"), num_unlabeled=roles.count("unlabeled"),
            num_test=roles.count("test"),
            manifest=common_pb2.ObjectRef(key=mkey, sha256=hashlib.sha256(data).hexdigest(), size=len(data)),
            cases=[gateway_pb2.DatasetCase(case_id=c.case_id, image_upload_id=c.image_upload_id,
                                           label_upload_id=c.label_upload_id, role=inv[r]) for c, r in cases],
            created=convert.ts(time.time()))
        self.store.put_bytes(f"datasets/{dataset_id}/dataset.json", json.dumps(
            json_format.MessageToDict(ds, preserving_proto_field_name=True), sort_keys=True).encode())
        return ds
