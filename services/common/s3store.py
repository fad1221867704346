"""``S3Store``: the ``cfrseg.store.Store`` protocol on an S3 bucket (MinIO in compose, nanio in tests),
through the official ``minio`` client.

Keys are relative to the store's prefix (see :meth:`S3Store.sub`) and validated like the core's keys. A put is
atomic (S3 semantics: readers see the old object or the whole new one). Every put records the content's sha256
as user metadata, so :meth:`S3Store.ref` can answer without reading the object back.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from minio import Minio
from minio.error import S3Error

from cfrseg.errors import NotFoundError
from cfrseg.sam.weights import sha256_file  # noqa: F401  (re-exported)
from cfrseg.store import check_key
from services.common.settings import Settings

CHUNK = 1 << 20          # streaming chunk size (1 MiB: also the gRPC chunk size)
PART = 16 << 20          # multipart part size for streams of unknown length
_MISSING = ("NoSuchKey", "NoSuchObject", "NotFound", "ResourceNotFound")


@dataclass(frozen=True)
class Ref:
    """A stored object: key (relative to the store it came from), sha256 hex, size in bytes."""

    key: str
    sha256: str
    size: int


def make_client(settings: Settings) -> Minio:
    return Minio(settings.s3_endpoint, access_key=settings.s3_access_key, secret_key=settings.s3_secret_key,
                 secure=settings.s3_secure, region=settings.s3_region)


class S3Store:
    def __init__(self, client: Minio, bucket: str, prefix: str = "") -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = (check_key(prefix.strip("/")) + "/") if prefix.strip("/") else ""

    @classmethod
    def from_settings(cls, settings: Settings, prefix: str = "") -> "S3Store":
        return cls(make_client(settings), settings.s3_bucket, prefix)

    def __repr__(self) -> str:
        return f"S3Store(s3://{self.bucket}/{self.prefix})"

    def ensure_bucket(self) -> None:
        if not self.client.bucket_exists(self.bucket):
            try:
                self.client.make_bucket(self.bucket)
            except S3Error as e:
                if e.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def full_key(self, key: str) -> str:
        """The bucket-level key of ``key``."""
        return self.prefix + check_key(key)

    def _missing(self, e: S3Error, key: str) -> NotFoundError | S3Error:
        if e.code in _MISSING:
            return NotFoundError(f"no object {key!r} in s3://{self.bucket}/{self.prefix}")
        return e

    # ---- Store protocol ----
    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(self.bucket, self.full_key(key), io.BytesIO(data), len(data),
                               metadata={"sha256": hashlib.sha256(data).hexdigest()})

    def get_bytes(self, key: str) -> bytes:
        try:
            resp = self.client.get_object(self.bucket, self.full_key(key))
        except S3Error as e:
            raise self._missing(e, key) from None
        try:
            return resp.read()
        finally:
            resp.close()
            resp.release_conn()

    def put_file(self, key: str, path: str | Path) -> None:
        self.client.fput_object(self.bucket, self.full_key(key), str(path),
                                metadata={"sha256": sha256_file(path)})

    def get_file(self, key: str, path: str | Path) -> None:
        """Download to ``path`` atomically (temp file in the same folder, then rename)."""
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in self.iter_chunks(key):
                    f.write(chunk)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, key: str) -> bool:
        try:
            self.client.stat_object(self.bucket, self.full_key(key))
            return True
        except S3Error as e:
            if e.code in _MISSING:
                return False
            raise

    def list(self, prefix: str = "") -> list[str]:
        n = len(self.prefix)
        objs = self.client.list_objects(self.bucket, prefix=self.prefix + prefix, recursive=True)
        return sorted(o.object_name[n:] for o in objs if not o.is_dir)

    def delete(self, key: str) -> None:
        self.client.remove_object(self.bucket, self.full_key(key))

    def sub(self, prefix: str) -> "S3Store":
        return S3Store(self.client, self.bucket, self.prefix + check_key(prefix.strip("/")))

    # ---- streaming and refs (services only) ----
    def iter_chunks(self, key: str, chunk: int = CHUNK) -> Iterator[bytes]:
        """The object's bytes in chunks (NotFoundError when missing)."""
        try:
            resp = self.client.get_object(self.bucket, self.full_key(key))
        except S3Error as e:
            raise self._missing(e, key) from None
        try:
            yield from resp.stream(chunk)
        finally:
            resp.close()
            resp.release_conn()

    def put_stream(self, key: str, stream: BinaryIO, length: int = -1, sha256: str = "") -> None:
        """Upload from a file-like object (``length=-1``: unknown, multipart). ``sha256`` is recorded as given."""
        meta = {"sha256": sha256} if sha256 else None
        self.client.put_object(self.bucket, self.full_key(key), stream, length,
                               part_size=PART if length < 0 else 0, metadata=meta)

    def ref(self, key: str) -> Ref:
        """Key, sha256 and size of a stored object (sha256 from its metadata, else computed by reading it)."""
        try:
            st = self.client.stat_object(self.bucket, self.full_key(key))
        except S3Error as e:
            raise self._missing(e, key) from None
        meta = {k.lower(): v for k, v in (st.metadata or {}).items()}
        digest = meta.get("x-amz-meta-sha256", "")
        if not digest:
            h = hashlib.sha256()
            for c in self.iter_chunks(key):
                h.update(c)
            digest = h.hexdigest()
        return Ref(key=key, sha256=digest, size=int(st.size or 0))
