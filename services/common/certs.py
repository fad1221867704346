"""Make a small private CA and certificates signed by it (for ``cfrseg stack up --tls`` and the tests).

Production deployments use the hospital's PKI or the openssl commands of docs/tls.md; these helpers make the same
kind of files: EC P-256 keys, PEM, a CA valid 10 years, leaf certificates valid 1 year with
``subjectAltName`` (DNS names and IP addresses), ``extendedKeyUsage`` serverAuth + clientAuth for servers (a
server's own certificate also serves its healthcheck as a client certificate under mTLS) and clientAuth for
clients. Needs the ``cryptography`` package (the services extra); imported lazily.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CertFiles:
    cert: Path   # PEM certificate
    key: Path    # PEM private key (mode 600)


def _write_key(key, path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_cert(cert, path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _name(cn: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cfrseg"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(folder: str | Path, name: str = "ca", cn: str = "cfrseg local CA") -> CertFiles:
    """A self-signed CA: ``folder/{name}.pem`` and ``folder/{name}.key``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    out = CertFiles(Path(folder) / f"{name}.pem", Path(folder) / f"{name}.key")
    _write_key(key, out.key)
    _write_cert(cert, out.cert)
    return out


def make_cert(ca: CertFiles, folder: str | Path, name: str, *, names: Sequence[str] = ("localhost", "127.0.0.1"),
              server: bool = True, days: int = 365) -> CertFiles:
    """A leaf certificate signed by ``ca``: ``folder/{name}.pem`` (leaf + CA chain) and ``folder/{name}.key``.

    Args:
        names: subjectAltName entries; IP addresses become IP entries, the rest DNS names. The first is the CN.
        server: serverAuth + clientAuth (True) or clientAuth only (a client certificate).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    sans = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] if server else \
        [ExtendedKeyUsageOID.CLIENT_AUTH]
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder().subject_name(_name(names[0] if names else name)).issuer_name(ca_cert.subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                      crl_sign=False, content_commitment=False, data_encipherment=False,
                                      key_agreement=True, encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = b.sign(ca_key, hashes.SHA256())
    out = CertFiles(Path(folder) / f"{name}.pem", Path(folder) / f"{name}.key")
    _write_key(key, out.key)
    out.cert.parent.mkdir(parents=True, exist_ok=True)
    out.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + ca.cert.read_bytes())
    return out


def make_local_pki(folder: str | Path, server_names: Sequence[str] = ("localhost", "127.0.0.1")) -> dict[str, Path]:
    """CA + server certificate + client certificate in ``folder`` (what ``cfrseg stack up --tls`` uses).

    Returns ``{"ca", "server_cert", "server_key", "client_cert", "client_key"}`` paths."""
    d = Path(folder)
    ca = make_ca(d)
    srv = make_cert(ca, d, "server", names=server_names, server=True)
    cli = make_cert(ca, d, "client", names=("cfrseg-client",), server=False)
    return {"ca": ca.cert, "server_cert": srv.cert, "server_key": srv.key, "client_cert": cli.cert,
            "client_key": cli.key}
