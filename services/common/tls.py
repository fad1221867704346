"""TLS credentials and connection options shared by the servers, the internal clients and the SDK.

- :func:`server_credentials`: a server's certificate chain and key; with a client CA the server requires client
  certificates signed by it (mTLS).
- :func:`channel_credentials`: a client's trust (a CA bundle, or the system roots) and optionally its own
  certificate for mTLS.
- :func:`keepalive_options`: HTTP/2 keepalive for long, mostly silent streams (WatchRun, Watch): a dead peer is
  detected within ``keepalive_s + 20`` seconds, and pings continue while no data flows.
- :func:`explain`: a hint for the usual TLS mistakes behind an UNAVAILABLE error (wrong CA, name mismatch,
  missing client certificate, plaintext against TLS and back).
"""

from __future__ import annotations

from pathlib import Path

import grpc

from cfrseg.errors import ConfigError

KEEPALIVE_TIMEOUT_MS = 20_000
MIN_CLIENT_PING_MS = 10_000   # servers accept client pings this often (clients ping every keepalive_s >= 10 s)


def read_pem(path: str | Path, what: str) -> bytes:
    """The bytes of a PEM file, or a ConfigError naming the setting and the path."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{what} {str(path)!r}: cannot read it ({e.strerror})") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{what} {str(path)!r}: not a PEM file (no '-----BEGIN' line)")
    return data


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials:
    """Server TLS from a certificate chain and key (PEM paths); ``client_ca`` set: mTLS (client certs required)."""
    pair = (read_pem(key, "CFRSEG_TLS_KEY"), read_pem(cert, "CFRSEG_TLS_CERT"))
    if client_ca:
        return grpc.ssl_server_credentials([pair], root_certificates=read_pem(client_ca, "CFRSEG_TLS_CLIENT_CA"),
                                           require_client_auth=True)
    return grpc.ssl_server_credentials([pair])


def channel_credentials(ca: str = "", cert: str = "", key: str = "") -> grpc.ChannelCredentials:
    """Client TLS: trust ``ca`` (a PEM bundle; "" = the system roots) and present ``cert``/``key`` if given."""
    if bool(cert) != bool(key):
        raise ConfigError("a client certificate needs both the certificate and its key")
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(ca, "CA bundle") if ca else None,
        private_key=read_pem(key, "client key") if key else None,
        certificate_chain=read_pem(cert, "client certificate") if cert else None)


def keepalive_options(keepalive_s: float, *, server: bool) -> list[tuple[str, int]]:
    """gRPC channel/server arguments for keepalive pings every ``keepalive_s`` seconds (dead peers are dropped
    after a further 20 s without an answer), also while a stream carries no data."""
    opts = [("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ("grpc.http2.max_pings_without_data", 0)]
    if server:
        opts += [("grpc.http2.min_recv_ping_interval_without_data_ms", MIN_CLIENT_PING_MS),
                 ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_MS)]
    return opts


def explain(err: grpc.RpcError, *, tls: bool, client_cert: bool) -> str:
    """A one-line hint for an UNAVAILABLE error that looks like a TLS mismatch ("" when nothing fits)."""
    if err.code() != grpc.StatusCode.UNAVAILABLE:
        return ""
    d = (err.details() or "").upper()
    if "CERTIFICATE_VERIFY_FAILED" in d or "CERTIFICATE VERIFY FAILED" in d:
        return ("the server's certificate is not signed by the CA you trust (--tls-ca / CFRSEG_CLIENT_CA), or it "
                "is not valid for the name you dialed (--tls-server-name)")
    if "WRONG_VERSION_NUMBER" in d:
        return "the server answered in plaintext: it does not use TLS (drop --tls-ca), or check the address"
    if "CERTIFICATE_REQUIRED" in d or "CERTIFICATE REQUIRED" in d:
        return "the server requires a client certificate: pass --tls-cert and --tls-key (mTLS)"
    if not tls:
        return ("no answer over plaintext: if the gateway uses TLS, pass --tls-ca (or set CFRSEG_CLIENT_CA); "
                "else check the address")
    if not client_cert:
        return ("the TLS connection was closed: if the gateway requires client certificates (mTLS), pass "
                "--tls-cert and --tls-key")
    return ("the TLS connection was closed: check that your client certificate is signed by the CA the "
            "gateway trusts (its CFRSEG_TLS_CLIENT_CA)")
