"""Local copies of a stage's inputs: the dataset manifest in the object store names its files by object key;
the stage services download them into a work folder and hand the core a manifest of local paths."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

from cfrseg.data.manifest import Manifest
from cfrseg.errors import InputError
from services.common.s3store import S3Store


def load_manifest(store: S3Store, key: str, sha256: str = "") -> Manifest:
    """Read and parse a manifest (keys as file fields); InputError when malformed or its sha256 differs."""
    data = store.get_bytes(key)
    if sha256 and hashlib.sha256(data).hexdigest() != sha256.lower():
        raise InputError(f"manifest {key!r}: sha256 does not match the request")
    try:
        return Manifest.from_dict(json.loads(data))
    except json.JSONDecodeError as e:
        raise InputError(f"manifest {key!r} is not valid JSON: {e}") from None


def fetch(store: S3Store, key: str, root: Path) -> str:
    """Download ``key`` (a file, or a folder = every object under ``key/``, e.g. a DICOM series) under ``root``;
    returns the local path. Files already there with the same size are kept (a resumed job re-uses them)."""
    dest = root / key
    if store.exists(key):
        size = store.ref(key).size
        if not (dest.is_file() and dest.stat().st_size == size):
            store.get_file(key, dest)
        return str(dest)
    keys = store.list(key.rstrip("/") + "/")
    if not keys:
        raise InputError(f"input {key!r} not found in the object store")
    for k in keys:
        if not (root / k).is_file():
            store.get_file(k, root / k)
    return str(dest)


def localize(manifest: Manifest, store: S3Store, root: Path) -> Manifest:
    """The manifest with every file field downloaded under ``root`` and replaced by its local path."""
    cases = []
    for c in manifest.cases:
        cases.append(replace(
            c,
            image=fetch(store, c.image, root),
            label=fetch(store, c.label, root) if c.label else None,
            pseudo_label=fetch(store, c.pseudo_label, root) if c.pseudo_label else None,
        ))
    return replace(manifest, cases=tuple(cases))


def fetch_prefix(store: S3Store, prefix: str, root: Path) -> dict[str, str]:
    """Download every object under ``prefix``; returns {key relative to prefix: local path}."""
    prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
    out = {}
    for k in store.list(prefix):
        local = root / k
        if not local.is_file():
            store.get_file(k, local)
        out[k[len(prefix):]] = str(local)
    return out
