"""Health that means something: named dependency checks behind the standard gRPC health service.

Each service registers checks (S3 reachable, Redis reachable, weights present, GPU usable, ...). A check is a
function returning ``None`` when healthy or a short human-readable reason when not. :class:`HealthMonitor` runs
them at start and then every ``interval_s`` seconds in a background thread, and sets the status of the overall
service (``""``) and of every named gRPC service to SERVING only when all checks pass, NOT_SERVING otherwise.
Every change of a check's state is logged once (with its reason), so an operator reads *why* in the log and the
container engine sees it through ``python -m services.common.healthcheck``.

Example::

    monitor = HealthMonitor(server.health, ["cfrseg.v1.Finetune"], interval_s=10)
    monitor.add_check("s3", lambda: None if store_reachable() else "S3 endpoint minio:9000 unreachable")
    monitor.start()          # after server.start(); runs the checks once synchronously first
    monitor.reasons()        # {"s3": None} when healthy
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from grpc_health.v1 import health_pb2

log = logging.getLogger("cfrseg.services.health")

Check = Callable[[], "str | None"]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthMonitor:
    """Runs named checks periodically and mirrors their conjunction into a gRPC ``HealthServicer``.

    Args:
        servicer: the server's ``grpc_health.v1.health.HealthServicer``.
        service_names: the gRPC service names whose status follows the checks (the overall ``""`` always does).
        interval_s: seconds between two rounds of checks.
    """

    def __init__(self, servicer, service_names: Iterable[str], interval_s: float = 10.0) -> None:
        self.servicer = servicer
        self.names = ["", *service_names]
        self.interval_s = float(interval_s)
        self._checks: dict[str, Check] = {}
        self._critical: dict[str, bool] = {}
        self._reasons: dict[str, str | None] = {}
        self.checked_at = 0.0                     # time.time() of the last round
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add_check(self, name: str, fn: Check, critical: bool = True) -> None:
        """Register a check; ``fn()`` returns None when healthy, else the reason (exceptions count as failing).

        ``critical=False``: the result is reported (:meth:`results`, the StatusService) but does not change the
        serving status (e.g. the gateway's view of the stage services)."""
        with self._lock:
            self._checks[name] = fn
            self._critical[name] = bool(critical)

    def run_checks(self) -> dict[str, str | None]:
        """Run every check once, update the health status, and return ``{name: reason or None}``."""
        with self._lock:
            checks = dict(self._checks)
        reasons: dict[str, str | None] = {}
        for name, fn in checks.items():
            try:
                reasons[name] = fn()
            except Exception as e:  # noqa: BLE001  (a crashing check is a failing check, with its reason)
                reasons[name] = f"check failed: {type(e).__name__}: {e}"
        with self._lock:
            for name, reason in reasons.items():
                old = self._reasons.get(name, "__unset__")
                if reason != old:
                    if reason is None:
                        log.info("health check %s: ok", name)
                    elif self._critical.get(name, True):
                        log.warning("health check %s: NOT SERVING: %s", name, reason)
                    else:
                        log.warning("health check %s (not critical): %s", name, reason)
            self._reasons = reasons
            self.checked_at = time.time()
            critical = dict(self._critical)
        ok = all(r is None for n, r in reasons.items() if critical.get(n, True))
        status = SERVING if ok else NOT_SERVING
        if not self._stop.is_set():
            for n in self.names:
                self.servicer.set(n, status)
        return dict(reasons)

    def reasons(self) -> dict[str, str | None]:
        """The last round's results, ``{name: reason or None}``."""
        with self._lock:
            return dict(self._reasons)

    def results(self) -> list[tuple[str, str | None, bool]]:
        """The last round as ``[(name, reason or None, critical)]`` in registration order."""
        with self._lock:
            return [(n, self._reasons.get(n), self._critical.get(n, True)) for n in self._checks
                    if n in self._reasons]

    def healthy(self) -> bool:
        """Every critical check passed in the last round."""
        return all(r is None for _, r, critical in self.results() if critical)

    def start(self) -> None:
        """Run the checks once now, then every ``interval_s`` in a daemon thread."""
        self.run_checks()
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="health-monitor", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.run_checks()

    @property
    def stopping(self) -> bool:
        """Stopped (the server is shutting down: NOT_SERVING whatever the checks say)."""
        return self._stop.is_set()

    def stop(self) -> None:
        """Stop re-checking (the server's graceful shutdown then owns the status)."""
        self._stop.set()
