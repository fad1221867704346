"""HealthMonitor: named dependency checks drive the standard gRPC health status of a real server."""

from __future__ import annotations

from dataclasses import replace

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.server import Server
from services.common.settings import Settings
from tests.servers import free_port


def _status(port: int, service: str = "") -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_checks_drive_serving_status_and_reasons():
    state = {"s3": "S3 endpoint unreachable"}
    s = replace(Settings.from_env({}), port=free_port())
    srv = Server(s, tokens=["t"], service_names=["test.Svc"])
    srv.monitor.add_check("s3", lambda: state["s3"])
    srv.monitor.add_check("boom", lambda: None)
    srv.start()
    try:
        assert _status(srv.port) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert _status(srv.port, "test.Svc") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert srv.monitor.reasons() == {"s3": "S3 endpoint unreachable", "boom": None}
        state["s3"] = None
        assert srv.monitor.run_checks() == {"s3": None, "boom": None}
        assert _status(srv.port) == health_pb2.HealthCheckResponse.SERVING
        assert _status(srv.port, "test.Svc") == health_pb2.HealthCheckResponse.SERVING

        def crash():
            raise OSError("disk gone")

        srv.monitor.add_check("boom", crash)
        reasons = srv.monitor.run_checks()
        assert reasons["boom"] == "check failed: OSError: disk gone"
        assert _status(srv.port) == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        srv.stop(0)


def test_no_checks_means_serving():
    s = replace(Settings.from_env({}), port=free_port())
    srv = Server(s, tokens=["t"], service_names=["test.Svc"])
    srv.start()
    try:
        assert _status(srv.port, "test.Svc") == health_pb2.HealthCheckResponse.SERVING
    finally:
        srv.stop(0)
