"""Entry point shared by the stage services: ``python -m services.<stage> [--port N] [--host H] [--impl M:F]``."""

from __future__ import annotations

import argparse
from typing import Any, Callable

from services.common.checks import register_common
from services.common.jobstore import JobStore
from services.common.limits import limit_stream
from services.common.log import setup_logging
from services.common.s3store import S3Store
from services.common.server import Server
from services.common.settings import Settings
from services.common.stage import StageServicer, load_impl


def build(stage: str, service_name: str, add_to_server: Callable[[Any, Any], None], default_impl: str,
          settings: Settings, servicer_cls: type[StageServicer] = StageServicer,
          impl: str = "") -> tuple[Server, StageServicer]:
    store = S3Store.from_settings(settings)
    store.ensure_bucket()
    jobs = JobStore.connect(store, settings.redis_url, namespace=f"cfrseg:{settings.s3_bucket}")
    fn = load_impl(impl or settings.stage_impl or default_impl)
    servicer = servicer_cls(stage, fn, store, jobs, settings)
    server = Server(settings, tokens=[settings.internal_token], service_names=[service_name], name=stage)
    servicer.Watch = limit_stream(servicer.Watch, server.watches)  # type: ignore[method-assign]
    register_common(server.monitor, settings)  # S3 and Redis reachable (weights/GPU: the stage's own checks)
    add_to_server(servicer, server.grpc)
    # NOT_SERVING, with the reason in the log and the health status, when the device asked for is unusable or a
    # required weight is missing or wrong (docs/services.md, "Weights and devices")
    server.monitor.add_check("device", servicer.device_check)
    server.monitor.add_check("weights", servicer.weights_check)
    server.on_stop(servicer.shutdown)
    return server, servicer


def main(stage: str, service_name: str, add_to_server: Callable[[Any, Any], None], default_impl: str,
         servicer_cls: type[StageServicer] = StageServicer, argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog=f"python -m services.{stage}",
                                 description=f"cfrseg {stage} stage service (settings: docs/services.md)")
    ap.add_argument("--host", help="bind address (default $CFRSEG_HOST or 127.0.0.1)")
    ap.add_argument("--port", type=int, help="port (default $CFRSEG_PORT or 50051)")
    ap.add_argument("--impl", default="", help="stage function module:function (default $CFRSEG_STAGE_IMPL "
                                               f"or {default_impl})")
    a = ap.parse_args(argv)
    over = {k: v for k, v in (("host", a.host), ("port", a.port)) if v is not None}
    settings = Settings.from_env(**over)
    setup_logging(stage, settings.log_level)
    server, _ = build(stage, service_name, add_to_server, default_impl, settings, servicer_cls, a.impl)
    server.serve_forever()
