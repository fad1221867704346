"""Caps on long-lived streams, so that idle watchers cannot take every handler thread.

Each open server stream holds one thread of the server's pool for as long as it is open. :class:`StreamLimiter`
bounds the streams of one kind (watch streams) per client and server-wide; the server-wide cap is at most half
the threads (``Settings.watch_limit``), so unary RPCs always find a free thread. A refused stream gets
RESOURCE_EXHAUSTED with a message naming the limit and its setting.

A client is its bearer token (hashed) plus its peer address: two users behind one NAT with their own tokens
are counted apart, one token used from two hosts is counted per host.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections.abc import Iterator

import grpc

from services.common.auth import bearer
from services.common.errors import ServiceError

log = logging.getLogger("cfrseg.services.limits")


def client_key(context: grpc.ServicerContext) -> str:
    """``host|token-hash`` of the caller (``host`` without the port: one client, many connections)."""
    peer = context.peer() or ""
    kind, _, rest = peer.partition(":")
    host = rest.rsplit(":", 1)[0] if kind in ("ipv4", "ipv6") else peer
    tok = bearer(context.invocation_metadata())
    return f"{host}|{hashlib.sha256(tok.encode()).hexdigest()[:12] if tok else '-'}"


class StreamLimiter:
    """Counts open streams of one kind per client and in all.

    Args:
        what: the kind, for messages ("watch").
        per_client: streams one client may hold open (CFRSEG_MAX_WATCHES_PER_CLIENT).
        total: streams all clients together may hold open (CFRSEG_MAX_WATCHES).
    """

    def __init__(self, what: str, per_client: int, total: int) -> None:
        self.what = what
        self.per_client = int(per_client)
        self.total = int(total)
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}
        self._count = 0

    def open_streams(self, key: str | None = None) -> int:
        with self._lock:
            return self._count if key is None else self._open.get(key, 0)

    @contextlib.contextmanager
    def hold(self, context: grpc.ServicerContext) -> Iterator[None]:
        """Hold one stream slot for the caller while the block runs (RESOURCE_EXHAUSTED when none is free)."""
        key = client_key(context)
        with self._lock:
            n = self._open.get(key, 0)
            if n >= self.per_client:
                raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"too many open {self.what} streams from this client ({n} open, limit "
                                   f"{self.per_client}: CFRSEG_MAX_WATCHES_PER_CLIENT); close one, or poll "
                                   f"GetRun instead")
            if self._count >= self.total:
                raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"the server has {self._count} open {self.what} streams (limit {self.total}: "
                                   f"CFRSEG_MAX_WATCHES); try again later, or poll GetRun instead")
            self._open[key] = n + 1
            self._count += 1
        released = threading.Event()

        def release() -> None:
            if released.is_set():
                return
            with self._lock:
                if released.is_set():
                    return
                released.set()
                left = self._open.get(key, 1) - 1
                if left > 0:
                    self._open[key] = left
                else:
                    self._open.pop(key, None)
                self._count -= 1

        context.add_callback(release)  # also when the client goes away while the generator is suspended
        try:
            yield
        finally:
            release()


def limit_stream(method, limiter: StreamLimiter):
    """Wrap a bound server-streaming servicer method so that each call holds a slot of ``limiter``; set it on
    the servicer instance before registering it (``servicer.Watch = limit_stream(servicer.Watch, lim)``)."""
    import functools

    @functools.wraps(method)
    def wrapper(request, context):
        try:
            slot = limiter.hold(context)
            slot.__enter__()
        except ServiceError as e:
            context.abort(e.code, e.message)
        try:
            yield from method(request, context)
        finally:
            slot.__exit__(None, None, None)

    return wrapper
