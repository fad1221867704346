"""Transient errors of the object store (and Redis) and a bounded retry loop.

An error is *transient* when retrying the same call later can succeed: the S3 server or Redis unreachable
(connection refused or reset, timeouts), an S3 5xx answer (``InternalError``, ``ServiceUnavailable``,
``SlowDown``...). Everything else (missing key, access denied, bad request) is not retried.

:func:`call` retries a function on transient errors with exponential backoff (0.2 s doubling to 5 s) until a
time budget is spent, then raises :class:`StoreUnavailable`, which the services map to gRPC ``UNAVAILABLE`` (the
caller retries later) instead of ``INTERNAL``. See docs/services.md, "Reliability".
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger("cfrseg.services.retry")
T = TypeVar("T")

FIRST_DELAY_S = 0.2
MAX_DELAY_S = 5.0
#: S3 error codes that mean "try again" (AWS and MinIO spellings).
TRANSIENT_S3_CODES = frozenset({"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout",
                                "RequestTimeTooSkewed", "XMinioServerNotInitialized", "XMinioStorageFull",
                                "OperationAborted", "ServerNotInitialized"})


class StoreUnavailable(Exception):
    """The object store (or Redis) could not be reached within the retry budget: retry later (UNAVAILABLE)."""


def is_transient(exc: BaseException) -> bool:
    """True for errors where the same call may succeed later (see the module docstring)."""
    if isinstance(exc, StoreUnavailable):
        return True
    if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout)):
        return True
    try:
        import urllib3.exceptions as u3

        if isinstance(exc, (u3.MaxRetryError, u3.ProtocolError, u3.TimeoutError, u3.NewConnectionError,
                            u3.ResponseError, u3.IncompleteRead)):
            return True
    except ImportError:  # pragma: no cover
        pass
    try:
        from minio.error import S3Error, ServerError

        if isinstance(exc, ServerError):
            return int(getattr(exc, "status_code", 500) or 500) >= 500
        if isinstance(exc, S3Error):
            status = getattr(getattr(exc, "response", None), "status", 0) or 0
            return exc.code in TRANSIENT_S3_CODES or int(status) >= 500
    except ImportError:  # pragma: no cover
        pass
    try:
        import redis.exceptions as rx

        if isinstance(exc, (rx.ConnectionError, rx.TimeoutError, rx.BusyLoadingError)):
            return True
    except ImportError:  # pragma: no cover
        pass
    return False


def call(fn: Callable[[], T], budget_s: float, what: str, *, sleep: Callable[[float], None] = time.sleep) -> T:
    """``fn()``, retried on transient errors for up to ``budget_s`` seconds (0: one attempt); then
    :class:`StoreUnavailable` naming ``what`` and the last error. Other errors propagate at once."""
    start = time.monotonic()
    delay = FIRST_DELAY_S
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except StoreUnavailable:
            raise
        except Exception as e:
            if not is_transient(e):
                raise
            waited = time.monotonic() - start
            if waited + delay > budget_s:
                raise StoreUnavailable(f"{what}: unavailable after {attempt} attempt(s) in {waited:.1f} s "
                                       f"({_short(e)}); retry later") from e
            if attempt == 1:
                log.warning("%s: %s; retrying for up to %.0f s", what, _short(e), budget_s)
            sleep(delay)
            delay = min(MAX_DELAY_S, delay * 2)


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text[:200]}"
