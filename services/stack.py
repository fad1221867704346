"""The local stack without Docker: redis-server, an S3 server (nanio), the four gRPC services and a Celery worker
as local processes on loopback ports, with logs under the stack folder.

    cfrseg stack up [--dir .stack] [--ports gateway=50051,redis=16379,...] [--env K=V ...] [--tls | --mtls]
    cfrseg stack status [--dir .stack]
    cfrseg stack down [--dir .stack]

``up`` writes ``DIR/stack.json`` (addresses, pids), ``DIR/token`` (the client token, mode 600) and logs in
``DIR/logs/``; the processes keep running after the command returns. ``--tls`` makes a private CA and
certificates in ``DIR/tls/`` and runs every gRPC hop over TLS; ``--mtls`` also makes the gateway require client
certificates (``DIR/tls/client.pem``). ``cfrseg client --stack-dir DIR`` picks up both. Tests use :class:`LocalStack` directly
(same entry points: ``python -m services.<name>``, ``python -m services.orchestrator``).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
SERVICES = ("finetune", "pseudolabel", "retrain", "gateway")
NAMES = ("redis", "s3", *SERVICES, "worker")
DEFAULT_PORTS = {"gateway": 50051, "finetune": 50052, "pseudolabel": 50053, "retrain": 50054,
                 "redis": 16379, "s3": 19000}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((HOST, port)) == 0


def _exe(name: str) -> str:
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found: install it (scripts/setup.sh --services)")
    return found


def health_ok(addr: str, ca: str = "", cert: str = "", key: str = "") -> bool:
    """The standard health check says SERVING (TLS with ``ca``; mTLS with ``cert``/``key``)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.common.tls import channel_credentials

    ch = grpc.secure_channel(addr, channel_credentials(ca, cert, key)) if ca else grpc.insecure_channel(addr)
    with ch:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
        return r.status == health_pb2.HealthCheckResponse.SERVING


@dataclass
class LocalStack:
    """A set of local processes. ``ports`` missing entries get free ports; secrets are generated."""

    dir: Path
    ports: dict[str, int] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)          # extra environment for every service and worker
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    internal_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    s3_access_key: str = "cfrseg"
    s3_secret_key: str = field(default_factory=lambda: secrets.token_hex(16))
    bucket: str = "cfrseg"
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    detach: bool = False                                       # survive the parent (cfrseg stack up)
    tls: bool = False                                          # every gRPC hop over TLS (a private CA in DIR/tls)
    mtls: bool = False                                         # and the gateway requires client certificates
    redis_aof: bool = False                                    # Redis with an append-only file (like compose)

    def __post_init__(self) -> None:
        self.dir = Path(self.dir).absolute()
        self.tls = self.tls or self.mtls
        for n in ("redis", "s3", *SERVICES):
            self.ports.setdefault(n, free_port())

    # ---- TLS ----
    @property
    def tls_files(self) -> dict[str, Path]:
        """``ca``, ``server_cert``/``server_key`` (every service), ``client_cert``/``client_key`` (clients)."""
        d = self.dir / "tls"
        return {"ca": d / "ca.pem", "server_cert": d / "server.pem", "server_key": d / "server.key",
                "client_cert": d / "client.pem", "client_key": d / "client.key"}

    def make_certs(self) -> None:
        """The private CA and the certificates, once (kept across restarts of the stack)."""
        if not all(p.is_file() for p in self.tls_files.values()):
            from services.common.certs import make_local_pki

            make_local_pki(self.dir / "tls", server_names=("localhost", HOST))

    def probe(self, name: str) -> bool:
        """Health SERVING of a gRPC service of this stack (over TLS/mTLS when the stack uses it)."""
        if not self.tls:
            return health_ok(self.addr(name))
        f = self.tls_files
        return health_ok(self.addr(name), str(f["ca"]), str(f["client_cert"]), str(f["client_key"]))

    # ---- addresses and environment ----
    def addr(self, name: str) -> str:
        return f"{HOST}:{self.ports[name]}"

    @property
    def redis_url(self) -> str:
        return f"redis://{HOST}:{self.ports['redis']}/0"

    def service_env(self, name: str) -> dict[str, str]:
        work = self.dir / "work" / name
        work.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "CFRSEG_REDIS_URL": self.redis_url, "CFRSEG_S3_ENDPOINT": self.addr("s3"),
            "CFRSEG_S3_ACCESS_KEY": self.s3_access_key, "CFRSEG_S3_SECRET_KEY": self.s3_secret_key,
            "CFRSEG_S3_BUCKET": self.bucket, "CFRSEG_INTERNAL_TOKEN": self.internal_token,
            "CFRSEG_WORKDIR": str(work), "CFRSEG_GRACE_S": "5", "PYTHONUNBUFFERED": "1",
            "CFRSEG_LOCK_DIR": str(self.dir / "locks"),  # one job per device across the local services
            **{f"CFRSEG_{s.upper()}_ADDR": self.addr(s) for s in ("finetune", "pseudolabel", "retrain")},
        }
        if name == "gateway":
            env["CFRSEG_TOKEN"] = self.token
        if self.tls:
            f = self.tls_files
            env.update(CFRSEG_TLS_CERT=str(f["server_cert"]), CFRSEG_TLS_KEY=str(f["server_key"]),
                       CFRSEG_INTERNAL_CA=str(f["ca"]))
            if self.mtls and name == "gateway":
                env["CFRSEG_TLS_CLIENT_CA"] = str(f["ca"])
        env.update(self.env)
        return env

    def log(self, name: str) -> Path:
        return self.dir / "logs" / f"{name}.log"

    # ---- processes ----
    def _popen(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        self.log(name).parent.mkdir(parents=True, exist_ok=True)
        out = self.log(name).open("ab")
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=self.detach)
        out.close()
        self.procs[name] = p
        return p

    def start(self, name: str, timeout: float = 60.0) -> subprocess.Popen:
        if name == "redis":
            d = self.dir / "redis"
            d.mkdir(parents=True, exist_ok=True)
            persist = ["--appendonly", "yes", "--appendfsync", "always"] if self.redis_aof else ["--appendonly", "no"]
            p = self._popen(name, [_exe("redis-server"), "--bind", HOST, "--port", str(self.ports["redis"]),
                                   "--save", "", *persist, "--dir", str(d)], dict(os.environ))
            self._wait(name, lambda: self._redis_ping(), timeout)
        elif name == "s3":
            d = self.dir / "s3"
            d.mkdir(parents=True, exist_ok=True)
            env = {**os.environ, "NANIO_ACCESS_KEY": self.s3_access_key, "NANIO_SECRET_KEY": self.s3_secret_key}
            p = self._popen(name, [_exe("nanio"), "serve", "--host", HOST, "--port", str(self.ports["s3"]),
                                   "--data-dir", str(d), "--log-level", "warning", "--no-access-log"], env)
            self._wait(name, lambda: port_open(self.ports["s3"]), timeout)
        elif name == "worker":
            start = self.log(name).stat().st_size if self.log(name).exists() else 0
            p = self._popen(name, [sys.executable, "-m", "services.orchestrator"], self.service_env(name))
            self._wait(name, lambda: b" ready." in self.log(name).read_bytes()[start:], timeout)
        elif name in SERVICES:
            p = self._popen(name, [sys.executable, "-m", f"services.{name}", "--host", HOST,
                                   "--port", str(self.ports[name])], self.service_env(name))
            self._wait(name, lambda: self.probe(name), timeout)
        else:
            raise ValueError(f"unknown process {name!r}; one of {NAMES}")
        return p

    def _redis_ping(self) -> bool:
        import redis

        return bool(redis.Redis(host=HOST, port=self.ports["redis"], socket_timeout=1).ping())

    def _wait(self, name: str, check: Callable[[], bool], timeout: float) -> None:
        p = self.procs[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode} while starting; log {self.log(name)}:\n"
                                   f"{self.tail(name)}")
            try:
                if check():
                    return
            except Exception:  # noqa: BLE001  (not up yet)
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{name} not ready after {timeout:.0f} s; log {self.log(name)}:\n{self.tail(name)}")

    def tail(self, name: str, n: int = 3000) -> str:
        p = self.log(name)
        return p.read_text(errors="replace")[-n:] if p.exists() else ""

    def up(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.tls:
            self.make_certs()
        try:
            for name in NAMES:
                self.start(name)
        except BaseException:
            self.down()
            raise

    def kill(self, name: str) -> None:
        """kill -9: no cleanup at all, like a crash (the worker: its whole process group, pool child included)."""
        p = self.procs.get(name)
        if p is None or p.poll() is not None:
            return
        family = _descendants(p.pid) if name == "worker" else []  # supervisor, worker, pool child
        p.send_signal(signal.SIGKILL)
        for pid in family:
            _signal(pid, signal.SIGKILL)
        p.wait()

    def stop(self, name: str, timeout: float = 15.0) -> None:
        p = self.procs.get(name)
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(name)

    def down(self) -> None:
        for name in reversed(NAMES):
            self.stop(name)

    # ---- the state file of `cfrseg stack up` ----
    def state(self) -> dict:
        st = {"dir": str(self.dir), "ports": self.ports, "gateway": self.addr("gateway"),
              "pids": {n: p.pid for n, p in self.procs.items()}, "bucket": self.bucket,
              "s3_endpoint": self.addr("s3"), "redis_url": self.redis_url}
        if self.tls:
            f = self.tls_files
            st["tls"] = {"ca": str(f["ca"]), "client_cert": str(f["client_cert"]),
                         "client_key": str(f["client_key"]), "client_required": self.mtls}
        return st

    def save(self) -> None:
        (self.dir / "stack.json").write_text(json.dumps(self.state(), indent=2))
        for fname, value in (("token", self.token), ("internal_token", self.internal_token),
                             ("s3_secret_key", self.s3_secret_key)):
            f = self.dir / fname
            f.write_text(value + "\n")
            f.chmod(0o600)


def _children(pid: int) -> list[int]:
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout
    except FileNotFoundError:
        return []
    return [int(x) for x in out.split()]


def _descendants(pid: int) -> list[int]:
    out = []
    for c in _children(pid):
        out += [c, *_descendants(c)]
    return out


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (an exited child nobody reaped yet counts as gone)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _parse_ports(text: str) -> dict[str, int]:
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, _, val = item.partition("=")
        if name not in DEFAULT_PORTS or not val.isdigit():
            raise SystemExit(f"--ports: expected NAME=PORT with NAME in {sorted(DEFAULT_PORTS)}, got {item!r}")
        out[name] = int(val)
    return out


def _load_state(d: Path) -> dict:
    f = d / "stack.json"
    if not f.is_file():
        raise SystemExit(f"no stack in {d} (start one with: cfrseg stack up --dir {d})")
    return json.loads(f.read_text())


def cmd_up(a: argparse.Namespace) -> int:
    d = Path(a.dir)
    if (d / "stack.json").is_file():
        st = json.loads((d / "stack.json").read_text())
        if any(_alive(pid) for pid in st.get("pids", {}).values()):
            print(f"a stack is already running from {d} (cfrseg stack status / down --dir {d})", file=sys.stderr)
            return 1
    ports = {**DEFAULT_PORTS, **_parse_ports(a.ports)} if not a.free_ports else _parse_ports(a.ports)
    busy = [f"{n}={p}" for n, p in ports.items() if port_open(p)]
    if busy:
        print(f"port(s) in use: {', '.join(busy)}; choose others with --ports or --free-ports", file=sys.stderr)
        return 1
    env = dict(e.split("=", 1) for e in a.env)
    stack = LocalStack(d, ports=ports, env=env, detach=True, tls=a.tls, mtls=a.mtls)
    t0 = time.monotonic()
    stack.up()
    stack.save()
    mode = " (mTLS)" if stack.mtls else (" (TLS)" if stack.tls else "")
    print(f"stack up in {time.monotonic() - t0:.1f} s: gateway {stack.addr('gateway')}{mode}, logs in {d / 'logs'}")
    print(f"token in {d / 'token'}; try: cfrseg client --stack-dir {d} list")
    return 0


def cmd_down(a: argparse.Namespace) -> int:
    d = Path(a.dir)
    st = _load_state(d)
    pids = st.get("pids", {})
    for name in reversed(NAMES):
        pid = pids.get(name)
        if pid and _alive(pid):
            _signal(pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                family = _descendants(pid)
                _signal(pid, signal.SIGKILL)
                for c in family:
                    _signal(c, signal.SIGKILL)
            print(f"stopped {name} (pid {pid})")
    st["pids"] = {}
    (d / "stack.json").write_text(json.dumps(st, indent=2))
    return 0


def cmd_status(a: argparse.Namespace) -> int:
    st = _load_state(Path(a.dir))
    tls = st.get("tls") or {}
    ok = True
    for name in NAMES:
        pid = st.get("pids", {}).get(name)
        alive = bool(pid) and _alive(pid)
        port = st["ports"].get(name)
        extra = ""
        if alive and name in SERVICES:
            try:
                extra = "SERVING" if health_ok(f"{HOST}:{port}", tls.get("ca", ""), tls.get("client_cert", ""),
                                               tls.get("client_key", "")) else "NOT_SERVING"
            except Exception:  # noqa: BLE001
                extra = "no answer"
        ok &= alive
        print(f"{name:12s} {'up' if alive else 'down':5s} pid {pid or '-':<8} "
              f"{f'{HOST}:{port}' if port else '':22s} {extra}")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", default=argparse.SUPPRESS,
                        help="state, logs and data folder (default .stack; before or after the command)")
    ap = argparse.ArgumentParser(prog="cfrseg stack", description=__doc__.split("\n\n")[0], parents=[common])
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for name, fn, helptext in (("up", cmd_up, "start the stack"), ("down", cmd_down, "stop it"),
                               ("status", cmd_status, "show its processes")):
        p = sub.add_parser(name, help=helptext, parents=[common])
        if name == "up":
            p.add_argument("--ports", default="", help="NAME=PORT,... for gateway, finetune, pseudolabel, "
                                                       f"retrain, redis, s3 (defaults {DEFAULT_PORTS})")
            p.add_argument("--free-ports", action="store_true", help="pick free ports for those not given")
            p.add_argument("--env", action="append", default=[], metavar="K=V",
                           help="extra environment for the services and worker (e.g. CFRSEG_DEVICE=cpu)")
            p.add_argument("--tls", action="store_true",
                           help="TLS on every gRPC hop, with a private CA made in DIR/tls (docs/tls.md)")
            p.add_argument("--mtls", action="store_true",
                           help="--tls, and the gateway requires client certificates (DIR/tls/client.pem)")
        p.set_defaults(func=fn)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if not hasattr(a, "dir"):
        a.dir = ".stack"
    return int(a.func(a))


if __name__ == "__main__":
    sys.exit(main())
