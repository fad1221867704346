"""Test certificates made with the openssl command line: a CA, and server certificates it signs (PEM files)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]


def _openssl(*args: str, cwd: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    r = subprocess.run(["openssl", *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def make_ca(folder: Path, name: str = "ca") -> tuple[Path, Path]:
    """A self-signed CA in ``folder``: returns (certificate, key), valid 2 days."""
    folder.mkdir(parents=True, exist_ok=True)
    crt, key = folder / f"{name}.crt", folder / f"{name}.key"
    _openssl("req", "-x509", *_EC, "-keyout", key.name, "-out", crt.name, "-days", "2",
             "-subj", f"/CN=cfrseg test {name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)
    return crt, key


def make_cert(folder: Path, ca: tuple[Path, Path], name: str, dns: list[str], ips: list[str] = ()) -> tuple[Path, Path]:
    """A server certificate for ``dns``/``ips`` (subjectAltName) signed by ``ca``: returns (certificate, key)."""
    folder.mkdir(parents=True, exist_ok=True)
    crt, key, csr, ext = (folder / f"{name}.{s}" for s in ("crt", "key", "csr", "ext"))
    san = ",".join([f"DNS:{d}" for d in dns] + [f"IP:{i}" for i in ips])
    ext.write_text(f"subjectAltName={san}\nextendedKeyUsage=serverAuth,clientAuth\n")
    _openssl("req", "-new", *_EC, "-keyout", key.name, "-out", csr.name, "-subj", f"/CN={dns[0] if dns else name}",
             cwd=folder)
    _openssl("x509", "-req", "-in", csr.name, "-CA", str(ca[0].resolve()), "-CAkey", str(ca[1].resolve()),
             "-CAcreateserial", "-days", "2", "-extfile", ext.name, "-out", crt.name, cwd=folder)
    csr.unlink()
    ext.unlink()
    return crt, key
