"""The DICOM node: ``python -m services.pacs [--check] [--health]`` (docs/pacs.md).

Needs ``CFRSEG_PACS_CONFIG`` (the routes file), the object store and Redis settings (docs/services.md), and the
Celery broker (``CFRSEG_BROKER_URL`` or ``CFRSEG_REDIS_URL``) to hand jobs to the worker. At start every route is
checked against its model (it exists; its segments match the model's classes): a route that does not fit stops
the node with a message naming it. ``--check`` also C-ECHOes every DIMSE destination and exits. ``--health``
(the container health check) exits 0 when the node's heartbeat is fresh and its DICOM port accepts connections.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from services.common.log import setup_logging


def health(workdir: str) -> int:
    hb = Path(workdir) / "pacs" / "node.alive"
    try:
        info = json.loads(hb.read_text())
    except (OSError, ValueError):
        return 1
    if time.time() - float(info.get("time", 0)) > 30:
        return 1
    for port in (info.get("ports") or {}).values():
        with socket.socket() as s:
            s.settimeout(2)
            if s.connect_ex(("127.0.0.1", int(port))) != 0:
                return 1
    return 0


def sweep(pjobs, keep_days: float, log) -> int:
    """Delete the patient data of FAILED/REJECTED jobs older than ``keep_days``."""
    n = 0
    cutoff = time.time() - keep_days * 86400
    for rec in pjobs.all():
        if rec["state"] in ("FAILED", "REJECTED") and not rec.get("sources_deleted") \
                and (rec.get("finished") or rec["created"]) < cutoff:
            with pjobs.lock(rec["job_id"]):
                if pjobs.delete_objects(rec["job_id"]):
                    n += 1
                rec["sources_deleted"] = True
                pjobs.put(rec)
    if n:
        log.info("deleted the sources of %d finished job(s) older than %.1f days", n, keep_days)
    return n


def main(argv: list[str] | None = None) -> int:
    from cfrseg.errors import ConfigError
    from services.common.settings import Settings

    ap = argparse.ArgumentParser(prog="python -m services.pacs", description="cfrseg DICOM node (C-STORE SCP)")
    ap.add_argument("--check", action="store_true", help="check the routes and C-ECHO the destinations, then exit")
    ap.add_argument("--health", action="store_true", help="exit 0 when the running node is healthy")
    ap.add_argument("--host", help="ignored (the DICOM bind address is 'bind' in CFRSEG_PACS_CONFIG)")
    ap.add_argument("--port", type=int, help="ignored (the DICOM port is 'port' in CFRSEG_PACS_CONFIG)")
    a = ap.parse_args(argv)
    settings = Settings.from_env()
    if a.health:
        return health(settings.workdir)
    log = setup_logging("dicomnode", settings.log_level)
    from services.common.jobstore import JobStore
    from services.common.s3store import S3Store
    from services.pacs.audit import Audit
    from services.pacs.config import PacsConfig
    from services.pacs.jobs import PacsJobs
    from services.pacs.models import check_routes
    from services.pacs.node import DicomNode

    try:
        config = PacsConfig.from_env()
        if config is None:
            raise ConfigError("set CFRSEG_PACS_CONFIG to the PACS routes file (docs/pacs.md)")
        store = S3Store.from_settings(settings)
        store.ensure_bucket()
        jobs = JobStore.connect(store, settings.redis_url)
        resolved = check_routes(config, store, jobs)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        log.error("refusing to start: %s", e)
        return 2
    for name, r in resolved.items():
        log.info("route %s: model %s, %d segment(s) %s", name, r["model"]["model_id"], len(r["segments"]),
                 [s["label"] for s in r["segments"]])
    if a.check:
        from services.pacs import dimse

        bad = 0
        for node in config.destinations.values():
            if node.dimse:
                try:
                    ok = dimse.echo(node, config.ae_title)
                except dimse.RemoteError as e:
                    ok, why = False, e.detail
                else:
                    why = "" if ok else "C-ECHO failed"
                print(f"{node.name}: {'ok' if ok else 'FAILED ' + why}")
                bad += not ok
        return 1 if bad else 0
    work = Path(settings.workdir) / "pacs"
    pjobs = PacsJobs(store, jobs)
    node = DicomNode(config, pjobs, Audit(store, "node", work), work / "spool", resolved)
    node.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    next_sweep = 0.0
    while not stop.wait(1.0):
        if time.time() >= next_sweep:
            next_sweep = time.time() + 3600
            try:
                sweep(pjobs, config.keep_failed_days, log)
            except Exception as e:  # noqa: BLE001
                log.warning("sweep of old job data failed: %r", e)
    log.info("stopping the DICOM node")
    node.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
