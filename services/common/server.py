"""Server factory: a ``grpc.server`` with bearer-token auth, the standard health service, TLS when a certificate
is configured, raised message limits, and a graceful stop on SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from pathlib import Path
from typing import Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from services.common.auth import BearerAuthInterceptor, client_auth
from services.common.health import HealthMonitor
from services.common.settings import Settings

log = logging.getLogger("cfrseg.services.server")


def message_options(settings: Settings) -> list[tuple[str, int]]:
    n = settings.max_message_mb * 1024 * 1024
    return [("grpc.max_receive_message_length", n), ("grpc.max_send_message_length", n)]


class Server:
    """A started-or-not gRPC server with its health servicer."""

    def __init__(self, settings: Settings, tokens: Iterable[str], service_names: Iterable[str]) -> None:
        self.settings = settings
        tokens = tuple(t for t in tokens if t)
        interceptors = []
        if tokens:
            interceptors.append(BearerAuthInterceptor(tokens))
        elif settings.auth_disabled:
            log.warning("AUTHENTICATION DISABLED (CFRSEG_AUTH_DISABLED=1): every caller is accepted")
        else:
            raise SystemExit("no token configured: set the service's token (see docs/services.md) "
                             "or CFRSEG_AUTH_DISABLED=1 for local development")
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=settings.workers),
                                interceptors=interceptors, options=message_options(settings))
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        self.service_names = list(service_names)
        # dependency checks (services.common.health): register with server.monitor.add_check before start()
        self.monitor = HealthMonitor(self.health, self.service_names)
        self._on_stop: list[Callable[[], None]] = []
        self._stopped = threading.Event()
        if settings.tls:
            creds = grpc.ssl_server_credentials(
                [(Path(settings.tls_key).read_bytes(), Path(settings.tls_cert).read_bytes())])
            self.port = self.grpc.add_secure_port(settings.address, creds)
        else:
            self.port = self.grpc.add_insecure_port(settings.address)
        if not self.port:
            raise SystemExit(f"cannot bind {settings.address}")

    def on_stop(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` when stopping, after the health status turned NOT_SERVING (e.g. checkpoint a running job)."""
        self._on_stop.append(fn)

    def start(self) -> None:
        self.grpc.start()
        self.monitor.start()  # SERVING when every registered check passes (no checks: SERVING)
        log.info("serving %s on %s:%d (%s)", ", ".join(self.service_names), self.settings.host, self.port,
                 "TLS" if self.settings.tls else "plaintext")

    def stop(self, grace: float | None = None) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.monitor.stop()
        self.health.enter_graceful_shutdown()
        for fn in self._on_stop:
            try:
                fn()
            except Exception:  # noqa: BLE001
                log.exception("error while stopping")
        self.grpc.stop(self.settings.grace_s if grace is None else grace).wait()
        log.info("stopped")

    def serve_forever(self) -> None:
        """Start, then block until SIGTERM/SIGINT, then stop gracefully."""
        done = threading.Event()

        def handle(signum, _frame):
            log.info("signal %d: stopping (grace %.0f s)", signum, self.settings.grace_s)
            done.set()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)
        self.start()
        done.wait()
        self.stop()


def channel(target: str, token: str, *, ca_cert: str = "", settings: Settings | None = None) -> grpc.Channel:
    """A client channel that sends ``token`` on every call; TLS when ``ca_cert`` (a PEM path) is given."""
    opts = message_options(settings or Settings())
    if ca_cert:
        ch = grpc.secure_channel(target, grpc.ssl_channel_credentials(Path(ca_cert).read_bytes()), options=opts)
    else:
        ch = grpc.insecure_channel(target, options=opts)
    return grpc.intercept_channel(ch, client_auth(token)) if token else ch
