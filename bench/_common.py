"""Helpers shared by the benchmark scripts: results folder, JSON output, peak RSS, a wall-clock timer."""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"  # git-ignored


def default_data(env_var: str, name: str) -> str:
    """A dataset's folder: ``$env_var`` if set, else ``../shared/data/<name>`` beside the checkout (the layout the
    tests use, docs/data.md), resolved from this file so the working directory does not matter."""
    return os.environ.get(env_var) or str(Path(__file__).resolve().parents[2] / "shared" / "data" / name)


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, tuples -> lists, numpy scalars -> Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(name: str, obj: dict[str, Any], results_dir: Path | None = None) -> Path:
    """Write ``obj`` (plus host info) to ``bench/results/<name>.json``; returns the path."""
    d = results_dir or RESULTS_DIR
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}.json"
    payload = {**obj, "host": host_info()}
    path.write_text(json.dumps(_clean(payload), indent=2) + "\n")
    return path


def host_info() -> dict[str, Any]:
    import torch

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (monotonic: it never goes down)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0 if sys.platform != "darwin" else peak / 2**20


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds`` (wall clock, perf_counter)."""

    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        self.seconds = math.nan
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def format_rows(rows: list[list[str]]) -> str:
    """Left-aligned plain-text table; the first row is the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
