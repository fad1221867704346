"""Map exceptions to gRPC status codes.

Servicer code raises :class:`ServiceError` (or lets a ``cfrseg.errors`` exception through); the
:func:`unary` / :func:`stream` decorators turn it into ``context.abort(code, message)``. Unexpected exceptions
become INTERNAL with a short error id that is also logged with the traceback, so users can quote it.
"""

from __future__ import annotations

import functools
import logging
import uuid
from typing import Any, Callable, Iterator, TypeVar

import grpc

from cfrseg.errors import Cancelled, CfrsegError, ConfigError, InputError, NotFoundError
from services.common.retry import StoreUnavailable, is_transient

log = logging.getLogger("cfrseg.services")
F = TypeVar("F", bound=Callable[..., Any])


class ServiceError(Exception):
    """An error with an explicit gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (InputError, grpc.StatusCode.INVALID_ARGUMENT),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (Cancelled, grpc.StatusCode.CANCELLED),
    (CfrsegError, grpc.StatusCode.INVALID_ARGUMENT),
)


def new_error_id() -> str:
    return uuid.uuid4().hex[:12]


def status_of(exc: BaseException, where: str = "") -> tuple[grpc.StatusCode, str, str]:
    """(code, message, error_id) for ``exc``; error_id is "" unless the error was unexpected (then it is logged).

    Transient dependency errors (object store or Redis unreachable, S3 5xx; see :mod:`services.common.retry`)
    are UNAVAILABLE, which callers retry with backoff, not INTERNAL."""
    if isinstance(exc, ServiceError):
        return exc.code, exc.message, ""
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code, str(exc), ""
    if is_transient(exc):
        msg = str(exc) if isinstance(exc, StoreUnavailable) else \
            f"a dependency (object store or Redis) is unavailable ({type(exc).__name__}); retry later"
        log.warning("unavailable in %s: %s", where or "?", (str(exc).splitlines() or [""])[0][:300])
        return grpc.StatusCode.UNAVAILABLE, msg, ""
    eid = new_error_id()
    log.error("internal error %s in %s: %r", eid, where or "?", exc, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (id {eid}); see the service log", eid


def _abort(context: grpc.ServicerContext, exc: BaseException, where: str) -> None:
    code, msg, _ = status_of(exc, where)
    context.abort(code, msg)


def unary(fn: F) -> F:
    """Decorate a unary-response servicer method."""

    @functools.wraps(fn)
    def wrapper(self, request, context):
        try:
            return fn(self, request, context)
        except Exception as e:  # noqa: BLE001
            if _already_aborted(context):
                raise
            _abort(context, e, fn.__qualname__)

    return wrapper  # type: ignore[return-value]


def stream(fn: F) -> F:
    """Decorate a streaming-response servicer method (a generator)."""

    @functools.wraps(fn)
    def wrapper(self, request, context) -> Iterator[Any]:
        try:
            yield from fn(self, request, context)
        except Exception as e:  # noqa: BLE001
            if _already_aborted(context):
                raise
            _abort(context, e, fn.__qualname__)

    return wrapper  # type: ignore[return-value]


def _already_aborted(context: grpc.ServicerContext) -> bool:
    try:
        return context.code() is not None
    except Exception:  # noqa: BLE001  (older grpc without ServicerContext.code())
        return False
