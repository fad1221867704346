"""Gateway entry point: ``python -m services.gateway [--host H] [--port N]`` (settings: docs/stack.md).

Gateway-only settings: ``CFRSEG_MAX_UPLOAD_MB`` (default 2048), ``CFRSEG_MAX_VOXELS`` (default 512*512*1024,
checked in the file header before anything is decompressed), ``CFRSEG_WATCHDOG_S`` (10; 0 disables the run
watchdog), ``CFRSEG_STALE_S`` (45). It also needs ``CFRSEG_RETRAIN_ADDR`` (Segment) and the Redis URL
(run records and the Celery broker).
"""

from __future__ import annotations

import argparse
import os

from services.common.jobstore import JobStore
from services.common.limits import limit_stream
from services.common.log import setup_logging
from services.common.s3store import S3Store
from services.common.server import Server, internal_channel
from services.common.settings import Settings
from services.gateway import health
from services.gateway.datasets import Datasets
from services.gateway.runs import Runs
from services.gateway.servicer import GatewayServicer
from services.gateway.uploads import DEFAULT_MAX_VOXELS, Uploads
from services.gateway.watchdog import Watchdog
from services.gen.cfrseg.v1 import gateway_pb2_grpc, retrain_pb2_grpc

SERVICE = "cfrseg.v1.Gateway"


def build(settings: Settings) -> tuple[Server, GatewayServicer]:
    from services.orchestrator.app import enqueue

    store = S3Store.from_settings(settings)
    store.ensure_bucket()
    jobs = JobStore.connect(store, settings.redis_url)
    tmp = os.path.join(settings.workdir, "gateway")
    os.makedirs(tmp, exist_ok=True)
    uploads = Uploads(store, tmp, int(float(os.environ.get("CFRSEG_MAX_UPLOAD_MB", "2048")) * 2**20),
                      max_voxels=int(float(os.environ.get("CFRSEG_MAX_VOXELS", str(DEFAULT_MAX_VOXELS)))))
    datasets = Datasets(store, jobs, uploads)

    def kick(run_id: str, token: str, countdown: float) -> None:
        enqueue(run_id, token, countdown)

    runs = Runs(store, jobs, datasets, kick, default_profile=settings.default_profile)
    retrain_addr = settings.addrs.get("retrain", "")
    if not retrain_addr:
        raise SystemExit("set CFRSEG_RETRAIN_ADDR (the retrain service, for Segment)")
    retrain = retrain_pb2_grpc.RetrainServiceStub(internal_channel(retrain_addr, settings))
    from services.gateway.pacs import PacsApi
    from services.pacs.config import PacsConfig

    pacs = PacsApi(store, jobs, PacsConfig.from_env(), settings.workdir)  # CFRSEG_PACS_CONFIG (optional)
    servicer = GatewayServicer(store, uploads, datasets, runs, retrain, pacs)
    server = Server(settings, tokens=settings.tokens, service_names=[SERVICE], name="gateway")
    servicer.WatchRun = limit_stream(servicer.WatchRun, server.watches)  # type: ignore[method-assign]
    gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server.grpc)
    health.register(server, settings)
    server.enable_reflection()
    period = float(os.environ.get("CFRSEG_WATCHDOG_S", "10"))
    if period > 0:
        dog = Watchdog(runs, kick, period_s=period, stale_s=float(os.environ.get("CFRSEG_STALE_S", "45")))
        dog.start()
        server.on_stop(dog.stop)
    return server, servicer


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m services.gateway", description="cfrseg gateway (public API)")
    ap.add_argument("--host", help="bind address (default $CFRSEG_HOST or 127.0.0.1)")
    ap.add_argument("--port", type=int, help="port (default $CFRSEG_PORT or 50051)")
    a = ap.parse_args(argv)
    over = {k: v for k, v in (("host", a.host), ("port", a.port)) if v is not None}
    settings = Settings.from_env(**over)
    setup_logging("gateway", settings.log_level)
    server, _ = build(settings)
    server.serve_forever()
