"""The PACS audit trail: append-only events modelled on DICOM PS3.15 A.5 / IHE ATNA, apart from the application
logs (which carry no patient data).

Each event is a new object ``pacs/audit/YYYY-MM-DD/{time_ns}-{source}-{rand}.json`` in the object store: new keys
only, never a rewrite, so the trail is append-only by construction and any process (node, worker, gateway)
adds to it without coordination. When the object store is down the event goes to a local JSONL file
(``CFRSEG_WORKDIR/pacs/audit-fallback.jsonl``, appended with fsync) and a warning is logged.

Events: ``association`` (accepted/rejected), ``instances_received``, ``query``, ``retrieve``, ``seg_created``,
``instances_sent``, ``security_alert``. Fields: time, event, outcome, source, calling/called AE, peer address,
Study/Series/SOP UIDs, PatientID (the audit trail is access-controlled; the app logs never get it), route,
model_id, job_id, detail.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger("cfrseg.pacs.audit")
EVENTS = ("association", "instances_received", "query", "retrieve", "seg_created", "instances_sent",
          "security_alert")


class Audit:
    def __init__(self, store: Any, source: str, fallback_dir: str | Path) -> None:
        self.store = store
        self.source = source
        self.fallback = Path(fallback_dir) / "audit-fallback.jsonl"
        self._lock = threading.Lock()

    def event(self, event: str, outcome: str = "success", **fields: Any) -> dict[str, Any]:
        if event not in EVENTS:
            raise ValueError(f"unknown audit event {event!r}")
        now = time.time()
        rec = {"time": datetime.datetime.fromtimestamp(now, datetime.UTC).isoformat(), "event": event,
               "outcome": outcome, "source": self.source,
               **{k: v for k, v in fields.items() if v not in (None, "")}}
        day = datetime.datetime.fromtimestamp(now, datetime.UTC).strftime("%Y-%m-%d")
        key = f"pacs/audit/{day}/{time.time_ns()}-{self.source}-{uuid.uuid4().hex[:8]}.json"
        data = json.dumps(rec, sort_keys=True).encode()
        try:
            self.store.put_bytes(key, data)
        except Exception as e:  # noqa: BLE001  (never lose an audit event: fall back to a local file)
            log.warning("audit: object store unavailable (%s); event kept in %s", type(e).__name__, self.fallback)
            with self._lock:
                self.fallback.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.fallback, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, data + b"\n")
                    os.fsync(fd)
                finally:
                    os.close(fd)
        return rec


def read_day(store: Any, day: str) -> list[dict[str, Any]]:
    """The events of one UTC day (``YYYY-MM-DD``), in time order."""
    return [json.loads(store.get_bytes(k)) for k in store.list(f"pacs/audit/{day}/")]
