"""``S3Store``: the ``cfrseg.store.Store`` protocol on an S3 bucket (MinIO in compose, nanio in tests),
through the official ``minio`` client.

Keys are relative to the store's prefix (see :meth:`S3Store.sub`) and validated like the core's keys. A put is
atomic (S3 semantics: readers see the old object or the whole new one). Every put records the content's sha256
as user metadata, so :meth:`S3Store.ref` can answer without reading the object back.

Transient errors (S3 unreachable, 5xx) are retried with backoff for ``retry_s`` seconds per call
(:mod:`services.common.retry`), then raised as ``StoreUnavailable`` (gRPC UNAVAILABLE). RPC handlers use a short
budget (``CFRSEG_S3_RETRY_S``), running stage jobs a long one (``CFRSEG_S3_JOB_RETRY_S``, :meth:`with_retry`), so a
stage rides out an S3 restart instead of failing. The HTTP client itself retries twice and times out connects
after 5 s (minio's default is 5 minutes and 5 retries).
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import certifi
import urllib3
from minio import Minio
from minio.error import S3Error

from cfrseg.errors import NotFoundError
from cfrseg.sam.weights import sha256_file
from cfrseg.store import check_key
from services.common import retry
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


def http_client() -> urllib3.PoolManager:
    """minio's HTTP client with bounded waits: connect 5 s, read 120 s, 2 quick retries (ours come on top)."""
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=5.0, read=120.0), maxsize=16, cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(total=2, backoff_factor=0.1, status_forcelist=[500, 502, 503, 504]))


def make_client(settings: Settings) -> Minio:
    return Minio(settings.s3_endpoint, access_key=settings.s3_access_key, secret_key=settings.s3_secret_key,
                 secure=settings.s3_secure, region=settings.s3_region, http_client=http_client())


class S3Store:
    def __init__(self, client: Minio, bucket: str, prefix: str = "", retry_s: float = 5.0) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = (check_key(prefix.strip("/")) + "/") if prefix.strip("/") else ""
        self.retry_s = float(retry_s)

    @classmethod
    def from_settings(cls, settings: Settings, prefix: str = "") -> S3Store:
        return cls(make_client(settings), settings.s3_bucket, prefix, retry_s=settings.s3_retry_s)

    def __repr__(self) -> str:
        return f"S3Store(s3://{self.bucket}/{self.prefix})"

    def with_retry(self, retry_s: float) -> S3Store:
        """The same store (same client and prefix) with another retry budget per call, in seconds."""
        return S3Store(self.client, self.bucket, self.prefix.rstrip("/"), retry_s)

    def _call(self, what: str, fn, *args, **kw):
        return retry.call(lambda: fn(*args, **kw), self.retry_s, f"object store: {what}")

    def ensure_bucket(self) -> None:
        def make() -> None:
            if not self.client.bucket_exists(self.bucket):
                try:
                    self.client.make_bucket(self.bucket)
                except S3Error as e:
                    if e.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise

        self._call(f"create bucket {self.bucket}", make)

    def full_key(self, key: str) -> str:
        """The bucket-level key of ``key``."""
        return self.prefix + check_key(key)

    def _missing(self, e: S3Error, key: str) -> NotFoundError | S3Error:
        if e.code in _MISSING:
            return NotFoundError(f"no object {key!r} in s3://{self.bucket}/{self.prefix}")
        return e

    # ---- Store protocol ----
    def put_bytes(self, key: str, data: bytes) -> None:
        full = self.full_key(key)
        meta = {"sha256": hashlib.sha256(data).hexdigest()}
        self._call(f"put {full}", lambda: self.client.put_object(self.bucket, full, io.BytesIO(data), len(data),
                                                                 metadata=meta))

    def get_bytes(self, key: str) -> bytes:
        full = self.full_key(key)

        def get() -> bytes:
            try:
                resp = self.client.get_object(self.bucket, full)
            except S3Error as e:
                raise self._missing(e, key) from None
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

        return self._call(f"get {full}", get)

    def put_file(self, key: str, path: str | Path) -> None:
        full = self.full_key(key)
        meta = {"sha256": sha256_file(path)}
        self._call(f"put {full}", lambda: self.client.fput_object(self.bucket, full, str(path), metadata=meta))

    def get_file(self, key: str, path: str | Path) -> None:
        """Download to ``path`` atomically (temp file in the same folder, then rename); a download cut by a
        transient error starts again from the beginning."""
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)

        def download() -> None:
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    for chunk in self._chunks(key, CHUNK):
                        f.write(chunk)
                os.replace(tmp, dest)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

        self._call(f"get {self.full_key(key)}", download)

    def exists(self, key: str) -> bool:
        full = self.full_key(key)

        def stat() -> bool:
            try:
                self.client.stat_object(self.bucket, full)
                return True
            except S3Error as e:
                if e.code in _MISSING:
                    return False
                raise

        return self._call(f"stat {full}", stat)

    def list(self, prefix: str = "") -> list[str]:
        n = len(self.prefix)

        def ls() -> list[str]:
            objs = self.client.list_objects(self.bucket, prefix=self.prefix + prefix, recursive=True)
            return sorted(o.object_name[n:] for o in objs if not o.is_dir)

        return self._call(f"list {self.prefix + prefix}", ls)

    def delete(self, key: str) -> None:
        full = self.full_key(key)
        self._call(f"delete {full}", lambda: self.client.remove_object(self.bucket, full))

    def sub(self, prefix: str) -> S3Store:
        return S3Store(self.client, self.bucket, self.prefix + check_key(prefix.strip("/")), self.retry_s)

    # ---- streaming and refs (services only) ----
    def _chunks(self, key: str, chunk: int) -> Iterator[bytes]:
        try:
            resp = self.client.get_object(self.bucket, self.full_key(key))
        except S3Error as e:
            raise self._missing(e, key) from None
        try:
            yield from resp.stream(chunk)
        finally:
            resp.close()
            resp.release_conn()

    def iter_chunks(self, key: str, chunk: int = CHUNK) -> Iterator[bytes]:
        """The object's bytes in chunks (NotFoundError when missing). Opening the object is retried; an error
        after the first chunk is raised as StoreUnavailable (the consumer already has part of it)."""
        full = self.full_key(key)
        opened: list[Iterator[bytes]] = []

        def open_first() -> bytes | None:
            it = self._chunks(key, chunk)  # a fresh request per attempt
            first = next(it, None)
            opened.append(it)
            return first

        first = self._call(f"get {full}", open_first)
        if first is None:
            return
        yield first
        try:
            yield from opened[-1]
        except Exception as e:
            if retry.is_transient(e):
                raise retry.StoreUnavailable(f"object store: get {full} interrupted ({e})") from e
            raise

    def put_stream(self, key: str, stream: BinaryIO, length: int = -1, sha256: str = "") -> None:
        """Upload from a file-like object (``length=-1``: unknown, multipart). ``sha256`` is recorded as given.
        Retried only when the stream can seek back to where it started."""
        meta = {"sha256": sha256} if sha256 else None
        full = self.full_key(key)
        seekable = getattr(stream, "seekable", None)
        start = stream.tell() if seekable is not None and seekable() else None

        def put() -> None:
            if start is not None:
                stream.seek(start)
            self.client.put_object(self.bucket, full, stream, length, part_size=PART if length < 0 else 0,
                                   metadata=meta)

        retry.call(put, self.retry_s if start is not None else 0.0, f"object store: put {full}")

    def ref(self, key: str) -> Ref:
        """Key, sha256 and size of a stored object (sha256 from its metadata, else computed by reading it)."""
        full = self.full_key(key)

        def stat():
            try:
                return self.client.stat_object(self.bucket, full)
            except S3Error as e:
                raise self._missing(e, key) from None

        st = self._call(f"stat {full}", stat)
        meta = {k.lower(): v for k, v in (st.metadata or {}).items()}
        digest = meta.get("x-amz-meta-sha256", "")
        if not digest:
            h = hashlib.sha256()
            for c in self.iter_chunks(key):
                h.update(c)
            digest = h.hexdigest()
        return Ref(key=key, sha256=digest, size=int(st.size or 0))
