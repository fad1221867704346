"""Real servers for tests, on free loopback ports, cleaned up afterwards.

Import the fixtures into a test module (``from tests.servers import redis_server, s3_server  # noqa: F401``)
or use the context managers directly. Everything binds 127.0.0.1 only.

- ``redis_server``: ``redis-server --save "" --appendonly no`` (session scope) -> ``RedisServer`` (``.url``);
  ``run_redis(dir, aof=True, port=...)`` for a persistent one that can be restarted.
- ``s3_server``: nanio (a real S3 server that checks SigV4 signatures, data on disk) (session scope) ->
  ``S3Server`` (``.endpoint``, ``.access_key``, ``.secret_key``, ``.env(bucket)``).
- ``start_service(module, env, ...)``: ``python -m services.<x> --port N`` as a subprocess, waits until its
  gRPC health check is SERVING -> ``ServiceProcess`` (``.addr``, ``.kill()``, ``.stop()``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with {proc.returncode} while starting:\n{tail}")
        try:
            r = check()
            if r:
                return r
        except Exception as e:  # noqa: BLE001
            last = e
        time.sleep(0.05)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"{what} not ready after {timeout} s ({last!r})\n{tail}")


def _stop(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


# ---------------------------------------------------------------- redis

@dataclass
class RedisServer:
    port: int
    proc: subprocess.Popen
    dir: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port)


@contextlib.contextmanager
def run_redis(tmp: Path, *, aof: bool = False, port: int | None = None) -> Iterator[RedisServer]:
    """redis-server in ``tmp``; ``aof=True``: with an append-only file (``--appendfsync always``) like compose's
    Redis, so a restart on the same ``port`` and folder comes back with the data."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server not installed (scripts/setup.sh --services installs it)")
    port = port or free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    log = tmp / "redis.log"
    persist = ["--appendonly", "yes", "--appendfsync", "always"] if aof else ["--appendonly", "no"]
    proc = subprocess.Popen([exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "", *persist,
                             "--dir", str(tmp), "--protected-mode", "yes"],
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)
    try:
        srv = RedisServer(port, proc, tmp)
        wait_for(lambda: srv.client().ping(), 10, "redis-server", proc, log)
        yield srv
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    with run_redis(tmp_path_factory.mktemp("redis")) as r:
        yield r


# ---------------------------------------------------------------- S3 (nanio)

@dataclass
class S3Server:
    port: int
    proc: subprocess.Popen
    data_dir: Path
    access_key: str = "cfrseg-test"
    secret_key: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self, bucket: str) -> dict[str, str]:
        return {"CFRSEG_S3_ENDPOINT": self.endpoint, "CFRSEG_S3_ACCESS_KEY": self.access_key,
                "CFRSEG_S3_SECRET_KEY": self.secret_key, "CFRSEG_S3_BUCKET": bucket}

    def client(self):
        from minio import Minio

        return Minio(self.endpoint, access_key=self.access_key, secret_key=self.secret_key, secure=False,
                     region="us-east-1")


@contextlib.contextmanager
def run_s3(tmp: Path) -> Iterator[S3Server]:
    exe = VENV_BIN / "nanio"
    if not exe.exists():
        pytest.skip("nanio not installed (pip install nanio)")
    port = free_port()
    data = tmp / "data"
    data.mkdir(parents=True, exist_ok=True)
    srv_keys = S3Server(port, None, data)  # type: ignore[arg-type]
    env = {**os.environ, "NANIO_ACCESS_KEY": srv_keys.access_key, "NANIO_SECRET_KEY": srv_keys.secret_key}
    log = tmp / "nanio.log"
    proc = subprocess.Popen([str(exe), "serve", "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data),
                             "--log-level", "warning", "--no-access-log"],
                            env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    srv_keys.proc = proc
    try:
        wait_for(lambda: _port_open(port), 15, "nanio", proc, log)
        yield srv_keys
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    with run_s3(tmp_path_factory.mktemp("s3")) as s:
        yield s


@pytest.fixture
def bucket(s3_server: S3Server) -> str:
    """A fresh bucket name per test (created by whoever uses it, e.g. S3Store.ensure_bucket)."""
    return f"t-{uuid.uuid4().hex[:12]}"


# ---------------------------------------------------------------- gRPC service processes

@dataclass
class ServiceProcess:
    module: str
    port: int
    proc: subprocess.Popen
    log: Path

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        """kill -9 (no cleanup at all, like a crash)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait; returns the exit code."""
        _stop(self.proc, timeout)
        return self.proc.returncode

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


def health_ok(addr: str, service: str = "") -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(addr) as ch:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
        return r.status == health_pb2.HealthCheckResponse.SERVING


def start_service(module: str, env: dict[str, str], *, port: int | None = None, log_dir: Path | None = None,
                  timeout: float = 30.0) -> ServiceProcess:
    """Start ``python -m <module> --host 127.0.0.1 --port N`` with ``env`` added, wait for health SERVING."""
    port = port or free_port()
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="cfrseg-svc-"))
    log = log_dir / f"{module.rsplit('.', 1)[-1]}-{port}-{uuid.uuid4().hex[:6]}.log"
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "CFRSEG_GRACE_S": "5", **env}
    proc = subprocess.Popen([sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(port)],
                            cwd=ROOT, env=full_env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    svc = ServiceProcess(module, port, proc, log)
    try:
        wait_for(lambda: health_ok(svc.addr), timeout, module, proc, log)
    except BaseException:
        svc.kill()
        raise
    return svc


@contextlib.contextmanager
def service(module: str, env: dict[str, str], **kw) -> Iterator[ServiceProcess]:
    svc = start_service(module, env, **kw)
    try:
        yield svc
    finally:
        svc.stop()


# ---------------------------------------------------------------- Orthanc (the hospital PACS in tests)

ORTHANC_DICOMWEB = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


@dataclass
class OrthancServer:
    """A real Orthanc (Debian package) with its DICOMweb plugin, loopback only. ``aet`` is its AE title."""

    http_port: int
    dicom_port: int
    proc: subprocess.Popen
    dir: Path
    aet: str = "PACS"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def rest(self, method: str, path: str, body: bytes | dict | list | None = None, timeout: float = 60.0):
        """One REST call; JSON answers are decoded, others returned as bytes."""
        import json as _json
        import urllib.request

        data = _json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        req = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            if "json" in r.headers.get("Content-Type", ""):
                return _json.loads(raw)
            return raw

    def upload(self, files) -> list[str]:
        """POST /instances for each file; returns the Orthanc series ids."""
        series = []
        for f in files:
            r = self.rest("POST", "/instances", Path(f).read_bytes())
            if r["ParentSeries"] not in series:
                series.append(r["ParentSeries"])
        return series

    def lookup(self, uid: str) -> list[dict]:
        return self.rest("POST", "/tools/lookup", uid.encode())


@contextlib.contextmanager
def run_orthanc(tmp: Path, modalities: dict[str, list] | None = None, *, unknown_sop_accepted: bool = False,
                aet: str = "PACS", extra: dict | None = None) -> Iterator[OrthancServer]:
    """Start Orthanc on free loopback ports; ``modalities``: DicomModalities (name -> [AET, host, port]);
    ``extra``: more configuration options."""
    import json as _json

    exe = shutil.which("Orthanc")
    if exe is None or not Path(ORTHANC_DICOMWEB).exists():
        pytest.skip("Orthanc with its DICOMweb plugin not installed (scripts/setup.sh --services)")
    tmp.mkdir(parents=True, exist_ok=True)
    http, dicom = free_port(), free_port()
    cfg = {"Name": "cfrseg-test-pacs", "StorageDirectory": str(tmp / "db"), "IndexDirectory": str(tmp / "db"),
           "HttpServerEnabled": True, "HttpPort": http, "RemoteAccessAllowed": False,
           "AuthenticationEnabled": False, "DicomServerEnabled": True, "DicomAet": aet, "DicomPort": dicom,
           "DicomCheckCalledAet": False, "DicomAlwaysAllowEcho": True, "DicomAlwaysAllowStore": False,
           "DicomCheckModalityHost": True, "DicomModalities": modalities or {}, "StableAge": 1,
           "UnknownSopClassAccepted": unknown_sop_accepted, "SynchronousCMove": True, "ConcurrentJobs": 2,
           "Plugins": [ORTHANC_DICOMWEB],
           "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False,
                        "Host": f"127.0.0.1:{http}"}, **(extra or {})}
    (tmp / "orthanc.json").write_text(_json.dumps(cfg))
    log = tmp / "orthanc.log"
    proc = subprocess.Popen([exe, str(tmp / "orthanc.json"), f"--logdir={tmp}"], stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)
    srv = OrthancServer(http, dicom, proc, tmp, aet)
    try:
        wait_for(lambda: srv.rest("GET", "/system", timeout=1), 20, "Orthanc", proc, log)
        yield srv
    finally:
        _stop(proc)
