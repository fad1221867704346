"""Health that means something, on real processes: the S3 server or Redis killed under a running stage service
and gateway turns them NOT_SERVING with the reason (StatusService / ``cfrseg client health``), and SERVING again
after a restart; a stage service that is down is reported by the gateway without making it NOT_SERVING; the
gateway serves gRPC reflection (authenticated)."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.sdk import Client
from tests.servers import VENV_BIN, free_port, service, wait_for
from tests.stack_helpers import FAKE_ENV, cfrseg, need_servers

pytestmark = pytest.mark.stack
TOKEN, INTERNAL = "public-" + uuid.uuid4().hex, "internal-" + uuid.uuid4().hex


class Restartable:
    """A server process that can be killed and started again on the same port and data folder."""

    def __init__(self, cmd: list[str], env: dict[str, str], port: int, log: Path) -> None:
        self.cmd, self.env, self.port, self.log = cmd, env, port, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        wait_for(lambda: _port_open(self.port), 20, self.cmd[0], self.proc, self.log)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _status(addr: str) -> int:
    with grpc.insecure_channel(addr) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=3).status


SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def _until(addr: str, status: int, what: str) -> None:
    wait_for(lambda: _status(addr) == status, 20, what)


@pytest.fixture
def deps(tmp_path):
    need_servers()
    s3_port, redis_port = free_port(), free_port()
    keys = {"NANIO_ACCESS_KEY": "health-test", "NANIO_SECRET_KEY": uuid.uuid4().hex}
    (tmp_path / "s3").mkdir()
    s3 = Restartable([str(VENV_BIN / "nanio"), "serve", "--host", "127.0.0.1", "--port", str(s3_port),
                      "--data-dir", str(tmp_path / "s3"), "--log-level", "warning", "--no-access-log"],
                     {**os.environ, **keys}, s3_port, tmp_path / "nanio.log")
    redis = Restartable([shutil.which("redis-server") or "redis-server", "--bind", "127.0.0.1", "--port",
                         str(redis_port), "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                        dict(os.environ), redis_port, tmp_path / "redis.log")
    s3.start()
    redis.start()
    env = {"CFRSEG_S3_ENDPOINT": f"127.0.0.1:{s3_port}", "CFRSEG_S3_ACCESS_KEY": keys["NANIO_ACCESS_KEY"],
           "CFRSEG_S3_SECRET_KEY": keys["NANIO_SECRET_KEY"], "CFRSEG_S3_BUCKET": "health",
           "CFRSEG_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "CFRSEG_INTERNAL_TOKEN": INTERNAL,
           "CFRSEG_HEALTH_INTERVAL_S": "0.5", "CFRSEG_WORKDIR": str(tmp_path / "work"), **FAKE_ENV}
    try:
        yield s3, redis, env
    finally:
        s3.kill()
        redis.kill()


def test_health_follows_s3_and_redis(deps, tmp_path):
    s3, redis, env = deps
    with service("services.retrain", env, log_dir=tmp_path) as rt, \
            service("services.gateway", {**env, "CFRSEG_TOKEN": TOKEN, "CFRSEG_RETRAIN_ADDR": rt.addr,
                                         "CFRSEG_WATCHDOG_S": "0"}, log_dir=tmp_path) as gw:
        c = Client(gw.addr, TOKEN)
        rep = c.health()
        assert rep.serving and [ch.name for ch in rep.checks] == ["s3", "redis", "retrain"]
        assert [x.service for x in rep.components] == ["retrain"] and rep.components[0].serving

        s3.kill()
        _until(gw.addr, NOT_SERVING, "gateway NOT_SERVING without S3")
        _until(rt.addr, NOT_SERVING, "retrain NOT_SERVING without S3")
        rep = c.health()
        s3_check = {ch.name: ch for ch in rep.checks}["s3"]
        assert not rep.serving and not s3_check.ok and s3_check.critical
        assert f"S3 endpoint 127.0.0.1:{s3.port} unreachable" in s3_check.reason, s3_check.reason
        comp = rep.components[0]
        assert not comp.serving and "unreachable" in {ch.name: ch for ch in comp.checks}["s3"].reason
        r = cfrseg("client", "--address", gw.addr, "--token", TOKEN, "health")
        assert r.returncode == 1 and "NOT SERVING" in r.stdout and "FAIL  s3" in r.stdout, r.stdout
        s3.start()
        _until(gw.addr, SERVING, "gateway SERVING after S3 restart")
        _until(rt.addr, SERVING, "retrain SERVING after S3 restart")
        assert c.health().serving

        redis.kill()
        _until(gw.addr, NOT_SERVING, "gateway NOT_SERVING without Redis")
        _until(rt.addr, NOT_SERVING, "retrain NOT_SERVING without Redis")
        red = {ch.name: ch for ch in c.health().checks}["redis"]
        assert not red.ok and f"Redis at redis://127.0.0.1:{redis.port}/0 unreachable" in red.reason, red.reason
        redis.start()
        _until(gw.addr, SERVING, "gateway SERVING after Redis restart")
        _until(rt.addr, SERVING, "retrain SERVING after Redis restart")
        assert "health check redis: NOT SERVING" in gw.output() and "health check redis: ok" in gw.output()

        # a stage service down: reported by the gateway, which keeps serving its own API
        rt.stop()
        # while it shuts down the service may first answer NOT_SERVING; wait for the state once it is gone
        wait_for(lambda: "unreachable" in {ch.name: ch for ch in c.health(include_components=False).checks}[
                 "retrain"].reason, 20, "gateway notices the retrain service is gone")
        rep = c.health()
        assert rep.serving and _status(gw.addr) == SERVING
        ret = {ch.name: ch for ch in rep.checks}["retrain"]
        assert not ret.critical and f"retrain service at {rt.addr} unreachable" in ret.reason
        assert rep.components[0].error.startswith("UNAVAILABLE")
        c.close()


def test_gateway_serves_reflection(deps, tmp_path):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    from services.common.server import channel

    _, _, env = deps
    with service("services.retrain", env, log_dir=tmp_path) as rt, \
            service("services.gateway", {**env, "CFRSEG_TOKEN": TOKEN, "CFRSEG_RETRAIN_ADDR": rt.addr,
                                         "CFRSEG_WATCHDOG_S": "0"}, log_dir=tmp_path) as gw:
        with channel(gw.addr, TOKEN) as ch:
            db = ProtoReflectionDescriptorDatabase(ch)
            names = set(db.get_services())
            assert {"cfrseg.v1.Gateway", "cfrseg.v1.StatusService", "grpc.health.v1.Health"} <= names, names
            pool = DescriptorPool(db)
            method = pool.FindServiceByName("cfrseg.v1.Gateway").FindMethodByName("SubmitRun")
            assert method.input_type.full_name == "cfrseg.v1.SubmitRunRequest"
            assert "config_overrides_json" in method.input_type.fields_by_name
        with grpc.insecure_channel(gw.addr) as ch:  # reflection needs the token like every other RPC
            with pytest.raises(grpc.RpcError) as e:
                ProtoReflectionDescriptorDatabase(ch).get_services()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED

