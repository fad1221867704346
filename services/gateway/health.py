"""The gateway's health: its own dependencies (object store, Redis) decide SERVING; the stage services are
checked too but only reported (not critical), and their own reports are fetched live for
``GetHealth(include_components=true)`` (``cfrseg client health``).

Why the stage services do not make the gateway NOT_SERVING: the gateway's API (uploads, datasets, run records,
artifacts, watching) works without them, and the worker waits (with backoff) for a stage service that is down;
marking the public endpoint unhealthy would make a container engine restart or unroute the gateway for a fault
that lies elsewhere. Their state is one call away instead.
"""

from __future__ import annotations

import grpc

from services.common.checks import TIMEOUT_S, grpc_health_check, register_common
from services.common.server import Server, internal_channel
from services.common.settings import Settings
from services.gen.cfrseg.v1 import status_pb2, status_pb2_grpc

STAGES = ("finetune", "pseudolabel", "retrain")


def register(server: Server, settings: Settings) -> None:
    """S3 and Redis (critical), each configured stage service (reported), and the components' reports."""
    register_common(server.monitor, settings)
    channels: dict[str, grpc.Channel] = {}

    def chan(stage: str) -> grpc.Channel:
        if stage not in channels:
            channels[stage] = internal_channel(settings.addrs[stage], settings)
        return channels[stage]

    stages = [s for s in STAGES if s in settings.addrs]
    for s in stages:
        server.monitor.add_check(s, grpc_health_check(s, settings.addrs[s], lambda s=s: chan(s)), critical=False)

    def components() -> list[status_pb2.HealthReport]:
        out = []
        for s in stages:
            addr = settings.addrs[s]
            try:
                rep = status_pb2_grpc.StatusServiceStub(chan(s)).GetHealth(status_pb2.GetHealthRequest(),
                                                                           timeout=TIMEOUT_S)
                rep.address = addr
            except grpc.RpcError as e:
                rep = status_pb2.HealthReport(service=s, address=addr, serving=False,
                                              error=f"{e.code().name}: {e.details()}")
            out.append(rep)
        return out

    server.status.components = components
