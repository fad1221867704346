"""Container healthcheck: ``python -m services.common.healthcheck [--port N] [--service NAME]``.

Asks the standard gRPC health service of the server in this container; exit 0 when SERVING, 1 otherwise.

With TLS on (``CFRSEG_TLS_CERT`` set) it connects over TLS:

- ``CFRSEG_HEALTHCHECK_CA``: the CA bundle to verify the server's certificate (default ``CFRSEG_TLS_CERT``:
  the server's own chain, which ends with its CA when the chain file includes it, or the self-signed cert);
- ``CFRSEG_HEALTHCHECK_NAME``: the name to check the certificate against (default ``localhost``), passed as
  ``grpc.ssl_target_name_override``, so a hospital certificate issued for ``cfrseg.example.org`` only passes
  with ``CFRSEG_HEALTHCHECK_NAME=cfrseg.example.org``;
- under mTLS (``CFRSEG_TLS_CLIENT_CA`` set) it presents ``CFRSEG_HEALTHCHECK_CERT``/``CFRSEG_HEALTHCHECK_KEY``
  (default: the server's own ``CFRSEG_TLS_CERT``/``CFRSEG_TLS_KEY``, which must then carry the clientAuth
  extended key usage and be signed by the client CA, as the certificates of docs/tls.md are).
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def channel_for(target: str, env: dict[str, str] | None = None) -> grpc.Channel:
    e = os.environ if env is None else env
    cert = e.get("CFRSEG_TLS_CERT", "")
    if not cert:
        return grpc.insecure_channel(target)
    from services.common.tls import channel_credentials

    ca = e.get("CFRSEG_HEALTHCHECK_CA", "") or cert
    client_cert = client_key = ""
    if e.get("CFRSEG_TLS_CLIENT_CA"):
        client_cert = e.get("CFRSEG_HEALTHCHECK_CERT", "") or cert
        client_key = e.get("CFRSEG_HEALTHCHECK_KEY", "") or e.get("CFRSEG_TLS_KEY", "")
    name = e.get("CFRSEG_HEALTHCHECK_NAME", "") or "localhost"
    return grpc.secure_channel(target, channel_credentials(ca, client_cert, client_key),
                               options=[("grpc.ssl_target_name_override", name)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m services.common.healthcheck",
                                 description="exit 0 when the local cfrseg server is SERVING")
    ap.add_argument("--port", type=int, default=int(os.environ.get("CFRSEG_PORT", "50051")))
    ap.add_argument("--host", default="localhost", help="where to connect (default localhost)")
    ap.add_argument("--service", default="")
    ap.add_argument("--timeout", type=float, default=3.0)
    a = ap.parse_args(argv)
    try:
        ch = channel_for(f"{a.host}:{a.port}")
    except Exception as e:  # noqa: BLE001  (unreadable certificate files: say so, exit 1)
        print(f"unhealthy: {e}", file=sys.stderr)
        return 1
    try:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=a.service), timeout=a.timeout)
    except grpc.RpcError as e:
        print(f"unhealthy: {e.code().name} {e.details()}", file=sys.stderr)
        return 1
    finally:
        ch.close()
    ok = r.status == health_pb2.HealthCheckResponse.SERVING
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(r.status))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
