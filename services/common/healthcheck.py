"""Container healthcheck: ``python -m services.common.healthcheck [--port N] [--service NAME]``.

Asks the standard gRPC health service on localhost (TLS when CFRSEG_TLS_CERT is set; the certificate must be
valid for "localhost"). Exit 0 when SERVING, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=int(os.environ.get("CFRSEG_PORT", "50051")))
    ap.add_argument("--host", default="localhost")
    ap.add_argument("--service", default="")
    ap.add_argument("--timeout", type=float, default=3.0)
    a = ap.parse_args(argv)
    target = f"{a.host}:{a.port}"
    ca = os.environ.get("CFRSEG_TLS_CA") or os.environ.get("CFRSEG_TLS_CERT")
    ch = (grpc.secure_channel(target, grpc.ssl_channel_credentials(Path(ca).read_bytes())) if ca
          else grpc.insecure_channel(target))
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
