"""Progress reporting and cancellation, shared by every stage.

Stages call ``progress(ProgressEvent(...))`` as they go; the CLI turns events into progress bars, the services
into streamed gRPC messages. A stage polls ``cancel.is_set()`` between steps and raises :class:`Cancelled`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from cfrseg.errors import Cancelled


@dataclass(frozen=True)
class ProgressEvent:
    stage: str                      # "finetune" | "pseudolabel" | "retrain" | "evaluate" | ...
    step: int                       # steps done so far
    total: int                      # steps in all (0 when unknown)
    losses: dict[str, float] = field(default_factory=dict)
    message: str = ""
    eta_s: float | None = None      # estimated seconds left, when known


ProgressFn = Callable[[ProgressEvent], None]


class CancelFlag(Protocol):
    def is_set(self) -> bool: ...


def check_cancel(cancel: CancelFlag | None, stage: str) -> None:
    """Raise :class:`Cancelled` when ``cancel`` is set."""
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"{stage} cancelled")


class Eta:
    """Estimates time left from the steps done since it started (resume-aware: counts from the first step seen)."""

    def __init__(self) -> None:
        self._t0: float | None = None
        self._s0 = 0

    def __call__(self, step: int, total: int) -> float | None:
        now = time.monotonic()
        if self._t0 is None:
            self._t0, self._s0 = now, step
            return None
        done = step - self._s0
        if done <= 0 or total <= 0:
            return None
        return (now - self._t0) / done * max(total - step, 0)


def emit(progress: ProgressFn | None, event: ProgressEvent) -> None:
    if progress is not None:
        progress(event)
