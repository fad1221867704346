"""Artifact stores: where stages keep inputs, checkpoints and outputs, under plain string keys.

The core ships :class:`LocalStore` (a folder). The services provide an S3 store with the same methods. Stages
only use this protocol, so a stage resumed in another process (or container) finds its checkpoint by key.
Keys are relative, '/'-separated, and never contain '..'.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from cfrseg.errors import InputError, NotFoundError


def check_key(key: str) -> str:
    """Validate an object key: relative, no '..', no empty parts, no backslashes."""
    if not key or key.startswith("/") or "\\" in key:
        raise InputError(f"invalid object key {key!r}")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise InputError(f"invalid object key {key!r}")
    return key


@runtime_checkable
class Store(Protocol):
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...            # NotFoundError when missing
    def put_file(self, key: str, path: str | Path) -> None: ...
    def get_file(self, key: str, path: str | Path) -> None: ...  # NotFoundError when missing
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str = "") -> list[str]: ...      # full keys under prefix, sorted
    def delete(self, key: str) -> None: ...
    def sub(self, prefix: str) -> "Store": ...              # a view with keys relative to prefix


def put_json(store: Store, key: str, obj: Any) -> None:
    store.put_bytes(key, json.dumps(obj, indent=2, sort_keys=True).encode())


def get_json(store: Store, key: str) -> Any:
    return json.loads(store.get_bytes(key))


class LocalStore:
    """A store in a local folder. Writes are atomic (temp file + rename), so a crash never leaves half a file."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).absolute()
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def path(self, key: str) -> Path:
        """The local file of ``key`` (it need not exist)."""
        return self.root / check_key(key)

    def _atomic_write(self, key: str, write) -> None:
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_bytes(self, key: str, data: bytes) -> None:
        self._atomic_write(key, lambda f: f.write(data))

    def get_bytes(self, key: str) -> bytes:
        p = self.path(key)
        if not p.is_file():
            raise NotFoundError(f"no object {key!r} in {self.root}")
        return p.read_bytes()

    def put_file(self, key: str, path: str | Path) -> None:
        src = Path(path)
        if src.resolve() == self.path(key).resolve():
            return
        with open(src, "rb") as s:
            self._atomic_write(key, lambda f: shutil.copyfileobj(s, f, 1 << 20))

    def get_file(self, key: str, path: str | Path) -> None:
        p = self.path(key)
        if not p.is_file():
            raise NotFoundError(f"no object {key!r} in {self.root}")
        dest = Path(path)
        if dest.resolve() != p.resolve():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dest)

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        out = []
        for p in self.root.rglob("*"):
            if p.is_file() and not p.name.startswith(".tmp-"):
                k = p.relative_to(self.root).as_posix()
                if k.startswith(prefix):
                    out.append(k)
        return sorted(out)

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def sub(self, prefix: str) -> "LocalStore":
        return LocalStore(self.path(prefix.strip("/")))
