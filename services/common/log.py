"""Logging setup for the services: one line per record on stderr, with the service name."""

from __future__ import annotations

import logging
import sys


def setup_logging(service: str, level: str = "INFO") -> logging.Logger:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter(f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s"))
    root.addHandler(h)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    return logging.getLogger(f"cfrseg.services.{service}")
