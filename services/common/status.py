"""``cfrseg.v1.StatusService`` (protos/cfrseg/v1/status.proto): the health checks' reasons, on every server.

:func:`report` turns a :class:`~services.common.health.HealthMonitor` into a ``HealthReport``; the gateway adds
its stage services' reports as components (``include_components``), fetched live with the internal token.
"""

from __future__ import annotations

from collections.abc import Callable

from services.common import convert
from services.common.errors import unary
from services.common.health import HealthMonitor
from services.gen.cfrseg.v1 import status_pb2, status_pb2_grpc


def report(service: str, monitor: HealthMonitor) -> status_pb2.HealthReport:
    checks = [status_pb2.HealthCheckResult(name=n, ok=r is None, reason=r or "", critical=c)
              for n, r, c in monitor.results()]
    return status_pb2.HealthReport(service=service, serving=monitor.healthy() and not monitor.stopping,
                                   checks=checks, checked=convert.ts(monitor.checked_at))


class StatusServicer(status_pb2_grpc.StatusServiceServicer):
    def __init__(self, service: str, monitor: HealthMonitor,
                 components: Callable[[], list[status_pb2.HealthReport]] | None = None) -> None:
        self.service = service
        self.monitor = monitor
        self.components = components

    @unary
    def GetHealth(self, request, context):
        rep = report(self.service, self.monitor)
        if request.include_components and self.components is not None:
            rep.components.extend(self.components())
        return rep
