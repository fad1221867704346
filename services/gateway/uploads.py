"""Receiving volume uploads: a client stream of one header and <= 1 MiB chunks, written to a temp file while
hashing, checked (declared size and sha256, size limit, a readable 3D volume), then stored at a server-generated
key ``uploads/{upload_id}/volume{ext}`` with its metadata in ``uploads/{upload_id}/upload.json``.

Nothing is stored unless every check passes, so a bad upload never replaces or damages anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import json_format

from cfrseg.errors import InputError, NotFoundError
from services.common import convert
from services.common.errors import ServiceError
from services.common.s3store import S3Store
from services.gen.cfrseg.v1 import common_pb2, gateway_pb2
from services.orchestrator.records import check_id, new_id

CHUNK_MAX = 1 << 20
DEFAULT_MAX_VOXELS = 512 * 512 * 1024  # CFRSEG_MAX_VOXELS: 268 M voxels (1 GiB as float32)
#: Single-file formats accepted for upload (multi-file formats like .mhd/.nhdr cannot travel as one stream).
UPLOAD_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Received:
    path: Path
    suffix: str
    size: int
    sha256: str


def upload_suffix(filename: str) -> str:
    name = filename.lower()
    for s in UPLOAD_SUFFIXES:
        if name.endswith(s) and len(name) > len(s):
            return s
    raise InputError(f"file {filename!r}: unsupported format; upload one of {list(UPLOAD_SUFFIXES)} "
                     f"(the file name is used only to tell the format)")


def check_header(filename: str, size: int, sha256: str, max_bytes: int) -> str:
    """Validate an upload header; returns the format suffix."""
    suffix = upload_suffix(filename)
    if size <= 0:
        raise InputError(f"upload {filename!r}: header size must be the file's byte count (> 0), got {size}")
    if size > max_bytes:
        raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"upload {filename!r}: {size} bytes exceeds the limit of {max_bytes} bytes "
                           f"({max_bytes / 2**20:.0f} MiB; CFRSEG_MAX_UPLOAD_MB)")
    if not SHA256_RE.match(sha256 or ""):
        raise InputError(f"upload {filename!r}: header sha256 must be 64 lowercase hex digits, got {sha256!r}")
    return suffix


def receive_chunks(chunks: Iterator[bytes], dest: Path, filename: str, size: int, sha256: str) -> Received:
    """Write the chunks to ``dest`` while hashing; checks chunk size, total size and digest."""
    h = hashlib.sha256()
    n = 0
    with open(dest, "wb", buffering=0) as f:
        for chunk in chunks:
            if len(chunk) > CHUNK_MAX:
                raise InputError(f"upload {filename!r}: chunk of {len(chunk)} bytes; chunks must be <= {CHUNK_MAX}")
            n += len(chunk)
            if n > size:
                raise InputError(f"upload {filename!r}: more bytes than the {size} declared in the header")
            h.update(chunk)
            f.write(chunk)
    if n < size:
        raise InputError(f"upload {filename!r}: truncated upload: received {n} of {size} bytes")
    digest = h.hexdigest()
    if digest != sha256:
        raise InputError(f"upload {filename!r}: sha256 mismatch: the header says {sha256}, the bytes hash to "
                         f"{digest}")
    return Received(dest, upload_suffix(filename), n, digest)


def check_size(path: Path, filename: str, max_voxels: int) -> None:
    """Refuse a file whose header claims more than ``max_voxels`` voxels, before anything is decompressed."""
    from cfrseg.data.header import read_header

    h = read_header(path, f"upload {filename!r}")
    if h.voxels > max_voxels:
        raise InputError(f"upload {filename!r}: the header claims {' x '.join(map(str, h.shape))} = {h.voxels:,} "
                         f"voxels, more than the limit of {max_voxels:,} (CFRSEG_MAX_VOXELS); crop or resample "
                         f"the volume")


def check_volume(path: Path, filename: str, max_voxels: int = DEFAULT_MAX_VOXELS) -> dict:
    """The header within the voxel limit, then the core's reader: a readable, complete, 3D scalar volume.
    Returns its geometry for the metadata."""
    from cfrseg.data.io import read_volume

    check_size(path, filename, max_voxels)
    try:
        v = read_volume(path)
    except InputError as e:
        raise InputError(str(e).replace(str(path), f"upload {filename!r}")) from None
    return {"shape": [int(s) for s in v.shape], "spacing": [float(s) for s in v.spacing],
            "dtype": str(v.array.dtype)}


class Uploads:
    """Upload storage in the object store (bucket root)."""

    def __init__(self, store: S3Store, tmp_dir: str | None, max_bytes: int,
                 max_voxels: int = DEFAULT_MAX_VOXELS) -> None:
        self.store = store
        self.tmp_dir = tmp_dir
        self.max_bytes = max_bytes
        self.max_voxels = max_voxels

    def temp_dir(self) -> tempfile.TemporaryDirectory:
        return tempfile.TemporaryDirectory(dir=self.tmp_dir, prefix="cfrseg-gw-")

    def receive(self, messages: Iterator[gateway_pb2.UploadVolumeRequest]) -> gateway_pb2.Upload:
        first = next(messages, None)
        if first is None or first.WhichOneof("msg") != "header":
            raise InputError("upload: the first message must be the header (filename, size, sha256, kind)")
        hd = first.header
        if hd.kind not in (gateway_pb2.VOLUME_KIND_IMAGE, gateway_pb2.VOLUME_KIND_LABEL):
            raise InputError(f"upload {hd.filename!r}: kind must be VOLUME_KIND_IMAGE or VOLUME_KIND_LABEL")
        suffix = check_header(hd.filename, hd.size, hd.sha256, self.max_bytes)
        with self.temp_dir() as d:
            got = receive_chunks(_chunks(messages, hd.filename), Path(d) / f"volume{suffix}", hd.filename,
                                 hd.size, hd.sha256)
            return self.store_file(got, hd.filename, hd.kind)

    def store_file(self, got: Received, filename: str, kind: int) -> gateway_pb2.Upload:
        info = check_volume(got.path, filename, self.max_voxels)
        upload_id = new_id("up")
        key = f"uploads/{upload_id}/volume{got.suffix}"
        with open(got.path, "rb") as f:
            self.store.put_stream(key, f, got.size, got.sha256)
        up = gateway_pb2.Upload(upload_id=upload_id, ref=common_pb2.ObjectRef(key=key, sha256=got.sha256,
                                                                              size=got.size),
                                filename=os.path.basename(filename)[:255], kind=kind, created=convert.ts(time.time()))
        meta = json_format.MessageToDict(up, preserving_proto_field_name=True)
        meta["volume"] = info
        self.store.put_bytes(f"uploads/{upload_id}/upload.json", json.dumps(meta, sort_keys=True).encode())
        return up

    def get(self, upload_id: str) -> gateway_pb2.Upload:
        check_id(upload_id, "upload id")
        try:
            meta = json.loads(self.store.get_bytes(f"uploads/{upload_id}/upload.json"))
        except NotFoundError:
            raise NotFoundError(f"no upload {upload_id!r}") from None
        meta.pop("volume", None)
        return json_format.ParseDict(meta, gateway_pb2.Upload(), ignore_unknown_fields=True)


def _chunks(messages: Iterator, filename: str) -> Iterator[bytes]:
    for m in messages:
        if m.WhichOneof("msg") != "chunk":
            raise InputError(f"upload {filename!r}: only the first message may be a header")
        yield m.chunk
