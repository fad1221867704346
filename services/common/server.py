"""Server factory: a ``grpc.server`` with bearer-token auth, the standard health service and the StatusService
(health with reasons), TLS (optionally mTLS) when a certificate is configured, raised message limits, a bound on
concurrent RPCs, keepalive for long streams, and a graceful stop on SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterable
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from services.common.auth import BearerAuthInterceptor, client_auth
from services.common.health import NOT_SERVING, HealthMonitor
from services.common.limits import StreamLimiter
from services.common.settings import Settings
from services.common.status import StatusServicer
from services.common.tls import channel_credentials, keepalive_options, server_credentials
from services.gen.cfrseg.v1 import status_pb2, status_pb2_grpc

log = logging.getLogger("cfrseg.services.server")


def message_options(settings: Settings) -> list[tuple[str, int]]:
    n = settings.max_message_mb * 1024 * 1024
    return [("grpc.max_receive_message_length", n), ("grpc.max_send_message_length", n)]


class Server:
    """A started-or-not gRPC server with its health servicer, dependency monitor and watch-stream limiter.

    Args:
        settings: the service's settings (bind address, TLS, limits).
        tokens: accepted bearer tokens.
        service_names: the gRPC services it will serve (their health follows the checks).
        name: short name in health reports ("gateway", "finetune"; default: from the first service name).
    """

    def __init__(self, settings: Settings, tokens: Iterable[str], service_names: Iterable[str],
                 name: str = "") -> None:
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
        # maximum_concurrent_rpcs counts RPCs running or queued for a thread: beyond it, RESOURCE_EXHAUSTED at
        # once instead of an unbounded queue; watch streams have their own, smaller caps (self.watches)
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=settings.workers),
                                interceptors=interceptors,
                                options=message_options(settings) + keepalive_options(settings.keepalive_s,
                                                                                      server=True),
                                maximum_concurrent_rpcs=settings.rpc_limit)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        self.service_names = list(service_names)
        self.name = name or (self.service_names[0].rsplit(".", 1)[-1].removesuffix("Service").lower()
                             if self.service_names else "server")
        # dependency checks (services.common.health): register with server.monitor.add_check before start()
        self.monitor = HealthMonitor(self.health, self.service_names, interval_s=settings.health_interval_s)
        self.status = StatusServicer(self.name, self.monitor)
        status_pb2_grpc.add_StatusServiceServicer_to_server(self.status, self.grpc)
        self.watches = StreamLimiter("watch", per_client=settings.max_watches_per_client,
                                     total=settings.watch_limit)
        self._on_stop: list[Callable[[], None]] = []
        self._stopped = threading.Event()
        if settings.tls:
            creds = server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
            self.port = self.grpc.add_secure_port(settings.address, creds)
        else:
            self.port = self.grpc.add_insecure_port(settings.address)
        if not self.port:
            raise SystemExit(f"cannot bind {settings.address}")

    def enable_reflection(self) -> None:
        """gRPC server reflection (grpcurl & co. without the .proto files); its calls need a token like any."""
        from grpc_reflection.v1alpha import reflection

        names = [*self.service_names, status_pb2.DESCRIPTOR.services_by_name["StatusService"].full_name,
                 "grpc.health.v1.Health", reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, self.grpc)

    def on_stop(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` when stopping, after the health status turned NOT_SERVING (e.g. checkpoint a running job)."""
        self._on_stop.append(fn)

    def start(self) -> None:
        for name in self.monitor.names:  # not SERVING before the first round of checks has passed
            self.health.set(name, NOT_SERVING)
        self.grpc.start()
        self.monitor.start()  # SERVING when every registered check passes (no checks: SERVING)
        mode = "plaintext"
        if self.settings.tls:
            mode = "TLS, client certificates required" if self.settings.tls_client_ca else "TLS"
        log.info("serving %s on %s:%d (%s; %d threads, %d concurrent RPCs, %d watch streams (%d per client))",
                 ", ".join(self.service_names), self.settings.host, self.port, mode, self.settings.workers,
                 self.settings.rpc_limit, self.watches.total, self.watches.per_client)

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


def channel(target: str, token: str, *, ca_cert: str = "", client_cert: str = "", client_key: str = "",
            server_name: str = "", settings: Settings | None = None) -> grpc.Channel:
    """A client channel that sends ``token`` on every call; TLS when ``ca_cert`` (a PEM path) is given, with a
    client certificate when ``client_cert``/``client_key`` are (mTLS). ``server_name`` overrides the name the
    server's certificate is checked against (default: the host of ``target``)."""
    s = settings or Settings()
    opts: list[tuple[str, object]] = [*message_options(s), *keepalive_options(s.keepalive_s, server=False)]
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    if ca_cert or client_cert:
        ch = grpc.secure_channel(target, channel_credentials(ca_cert, client_cert, client_key), options=opts)
    else:
        ch = grpc.insecure_channel(target, options=opts)
    return grpc.intercept_channel(ch, client_auth(token)) if token else ch


def internal_channel(target: str, settings: Settings) -> grpc.Channel:
    """The gateway's/worker's channel to a stage service: internal token, CFRSEG_INTERNAL_CA (TLS when set) and
    CFRSEG_INTERNAL_CERT/KEY (mTLS when set)."""
    return channel(target, settings.internal_token, ca_cert=settings.internal_ca,
                   client_cert=settings.internal_cert, client_key=settings.internal_key, settings=settings)
