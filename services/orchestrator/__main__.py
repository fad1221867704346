"""``python -m services.orchestrator [celery worker options]``: a Celery worker for run steps with the settings the
stack needs (prefork, one process, no gossip/mingle/heartbeat; see docs/stack.md), kept alive by a small
supervisor: kombu 5.7's Redis transport can crash the worker while reconnecting after a Redis restart
(``AttributeError: 'NoneType' object has no attribute 'hostname'`` in ``restore_unacked``), so a worker that
exits on its own is started again (like compose's ``restart: unless-stopped``). SIGTERM/SIGINT stop both.
``--no-supervise`` runs the worker in this process instead.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from services.common.log import setup_logging

RESTART_DELAY_S = 1.0


def worker_args(extra: list[str]) -> list[str]:
    from services.orchestrator.app import QUEUE

    return ["worker", "--loglevel=INFO", "--pool=prefork", "--concurrency=1", "--without-gossip",
            "--without-mingle", "--without-heartbeat", f"--queues={QUEUE}", "--hostname=cfrseg@%h", *extra]


def run_worker(extra: list[str]) -> None:
    from services.orchestrator.app import app

    app.worker_main(worker_args(extra))


def supervise(extra: list[str]) -> int:
    log = setup_logging("worker-supervisor")
    stopping = False
    child: subprocess.Popen | None = None

    def stop(signum, _frame):
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        child = subprocess.Popen([sys.executable, "-m", "services.orchestrator", "--no-supervise", *extra])
        rc = child.wait()
        if stopping:
            return 0
        log.warning("celery worker exited with %s; restarting in %.0f s", rc, RESTART_DELAY_S)
        time.sleep(RESTART_DELAY_S)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--no-supervise" in args:
        args.remove("--no-supervise")
        setup_logging("worker")
        run_worker(args)
        return 0
    return supervise(args)


if __name__ == "__main__":
    sys.exit(main())
