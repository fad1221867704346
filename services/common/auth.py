"""Bearer-token authentication for gRPC servers and clients.

Every RPC must carry ``authorization: Bearer <token>`` metadata; the token is compared in constant time
(:func:`hmac.compare_digest`) against every accepted token. A missing or wrong token gives UNAUTHENTICATED,
for unary and streaming methods alike (and for unknown methods, so their existence is not revealed). The
standard health service (``grpc.health.v1.Health``) is exempt so that orchestrators can probe it.
"""

from __future__ import annotations

import hmac
from typing import Callable, Iterable

import grpc

HEALTH_PREFIX = "/grpc.health.v1.Health/"


def token_ok(given: str, accepted: Iterable[str]) -> bool:
    ok = False
    g = given.encode()
    for t in accepted:
        ok |= hmac.compare_digest(g, t.encode())  # no early exit: same work whichever token matches
    return ok


def bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    for k, v in metadata or ():
        if k.lower() == "authorization":
            v = v.decode() if isinstance(v, bytes) else v
            scheme, _, token = v.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return ""


def _deny(request_streaming: bool, response_streaming: bool) -> grpc.RpcMethodHandler:
    def deny(_request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

    if request_streaming and response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    if request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)


class BearerAuthInterceptor(grpc.ServerInterceptor):
    def __init__(self, tokens: Iterable[str], exempt_prefixes: tuple[str, ...] = (HEALTH_PREFIX,)) -> None:
        self._tokens = tuple(t for t in tokens if t)
        if not self._tokens:
            raise ValueError("BearerAuthInterceptor needs at least one token")
        self._exempt = exempt_prefixes

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        if details.method.startswith(self._exempt):
            return continuation(details)
        if token_ok(bearer(details.invocation_metadata), self._tokens):
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return _deny(False, False)
        return _deny(handler.request_streaming, handler.response_streaming)


class _ClientAuth(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                  grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the bearer token to every call (works on insecure channels too, unlike call credentials)."""

    def __init__(self, token: str) -> None:
        self._md = ("authorization", f"Bearer {token}")

    def _details(self, d: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        md = [m for m in (d.metadata or ()) if m[0].lower() != "authorization"] + [self._md]
        return _Details(d.method, d.timeout, md, d.credentials, d.wait_for_ready, d.compression)

    def intercept_unary_unary(self, cont, d, req):
        return cont(self._details(d), req)

    def intercept_unary_stream(self, cont, d, req):
        return cont(self._details(d), req)

    def intercept_stream_unary(self, cont, d, it):
        return cont(self._details(d), it)

    def intercept_stream_stream(self, cont, d, it):
        return cont(self._details(d), it)


class _Details(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression) -> None:
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression


def client_auth(token: str) -> grpc.UnaryUnaryClientInterceptor:
    return _ClientAuth(token)
