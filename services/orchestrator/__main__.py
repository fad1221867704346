"""``python -m services.orchestrator [celery worker options]``: a Celery worker for run steps, with the settings
the stack needs (prefork, one process, no gossip/mingle/heartbeat; see docs/stack.md)."""

from __future__ import annotations

import sys

from services.common.log import setup_logging
from services.orchestrator.app import QUEUE, app


def main(argv: list[str] | None = None) -> None:
    setup_logging("worker")
    args = ["worker", "--loglevel=INFO", "--pool=prefork", "--concurrency=1", "--without-gossip",
            "--without-mingle", "--without-heartbeat", f"--queues={QUEUE}", "--hostname=cfrseg@%h",
            *(sys.argv[1:] if argv is None else argv)]
    app.worker_main(args)


if __name__ == "__main__":
    main()
