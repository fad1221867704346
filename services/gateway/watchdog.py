"""Safety net for run step chains: a daemon thread in the gateway that re-enqueues the current step of any
unfinished run whose record has not changed for a while (its queued step was lost, e.g. Redis restarted
without persistence). Harmless when the chain is alive: a duplicate step carrying the same token is dropped by
the orchestrator once one of them has advanced the run."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from services.gateway.runs import Runs
from services.orchestrator.records import FINAL_STATES

log = logging.getLogger("cfrseg.gateway.watchdog")


class Watchdog:
    def __init__(self, runs: Runs, enqueue: Callable[[str, str, float], None], *, period_s: float = 10.0,
                 stale_s: float = 45.0) -> None:
        self.runs = runs
        self.enqueue = enqueue
        self.period_s = period_s
        self.stale_s = stale_s
        self._kicked: dict[str, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="run-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def check_once(self) -> list[str]:
        now = time.time()
        kicked = []
        for rec in self.runs.all():
            if rec["state"] in FINAL_STATES or now - float(rec.get("updated", 0)) < self.stale_s:
                continue
            rid, token = rec["run_id"], rec.get("token", "")
            prev = self._kicked.get(rid)
            if prev and prev[0] == token and now - prev[1] < self.stale_s:
                continue
            log.warning("run %s has not advanced for %.0f s; re-enqueueing its step", rid,
                        now - float(rec.get("updated", 0)))
            self.enqueue(rid, token, 0.0)
            self._kicked[rid] = (token, now)
            kicked.append(rid)
        return kicked

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.check_once()
            except Exception:
                log.warning("watchdog pass failed", exc_info=True)
