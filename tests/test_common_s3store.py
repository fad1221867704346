"""S3Store (services.common.s3store) against a real S3 server (nanio, checks signatures)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from minio.error import S3Error

from cfrseg.errors import InputError, NotFoundError
from cfrseg.store import Store, get_json, put_json
from services.common.s3store import S3Store
from services.common.settings import Settings
from tests.servers import bucket, s3_server  # noqa: F401

pytestmark = pytest.mark.stack


@pytest.fixture
def store(s3_server, bucket) -> S3Store:
    s = S3Store.from_settings(Settings.from_env(s3_server.env(bucket)))
    s.ensure_bucket()
    s.ensure_bucket()  # idempotent
    return s


def test_protocol_roundtrip(store: S3Store, tmp_path: Path) -> None:
    assert isinstance(store, Store)
    store.put_bytes("a/b.txt", b"hello")
    assert store.get_bytes("a/b.txt") == b"hello" and store.exists("a/b.txt")
    assert not store.exists("a/none")
    with pytest.raises(NotFoundError, match="a/none"):
        store.get_bytes("a/none")
    with pytest.raises(NotFoundError):
        store.get_file("a/none", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    put_json(store, "c.json", {"x": 1})
    assert get_json(store, "c.json") == {"x": 1}
    assert store.list() == ["a/b.txt", "c.json"] and store.list("a/") == ["a/b.txt"]
    store.delete("a/b.txt")
    store.delete("a/b.txt")  # deleting a missing key is fine, as in LocalStore
    assert store.list() == ["c.json"]


def test_sub_views_and_key_checks(store: S3Store) -> None:
    run = store.sub("runs/r1/finetune")
    run.put_bytes("checkpoint.pt", b"ck")
    assert store.get_bytes("runs/r1/finetune/checkpoint.pt") == b"ck"
    assert run.list() == ["checkpoint.pt"] and run.sub("x").list() == []
    assert run.full_key("checkpoint.pt") == "runs/r1/finetune/checkpoint.pt"
    for bad in ("../escape", "/abs", "a//b", "a\\b", ""):
        with pytest.raises(InputError):
            run.put_bytes(bad, b"x")


def test_files_streams_and_refs(store: S3Store, tmp_path: Path) -> None:
    data = bytes(range(256)) * 12000  # ~3 MB: several chunks
    src = tmp_path / "vol.nii.gz"
    src.write_bytes(data)
    store.put_file("uploads/u1/volume.nii.gz", src)
    ref = store.ref("uploads/u1/volume.nii.gz")
    assert ref.sha256 == hashlib.sha256(data).hexdigest() and ref.size == len(data)
    store.get_file("uploads/u1/volume.nii.gz", tmp_path / "out" / "v.nii.gz")
    assert (tmp_path / "out" / "v.nii.gz").read_bytes() == data
    assert not list((tmp_path / "out").glob(".tmp-*"))
    assert b"".join(store.iter_chunks("uploads/u1/volume.nii.gz", 1 << 20)) == data
    with open(src, "rb") as f:
        store.put_stream("uploads/u2/volume.nii.gz", f)  # unknown length: multipart
    assert store.get_bytes("uploads/u2/volume.nii.gz") == data
    assert store.ref("uploads/u2/volume.nii.gz").sha256 == ref.sha256  # computed when not recorded


def test_wrong_secret_is_rejected(s3_server, bucket) -> None:
    env = {**s3_server.env(bucket), "CFRSEG_S3_SECRET_KEY": "wrong-secret"}
    with pytest.raises(S3Error) as e:
        S3Store.from_settings(Settings.from_env(env)).ensure_bucket()
    assert e.value.code in ("SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied")
