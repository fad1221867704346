"""Dependency checks for :class:`services.common.health.HealthMonitor` (``server.monitor.add_check``).

Each factory returns a function that answers ``None`` when the dependency is usable, else a short reason an
operator can act on. Every check bounds its own time (a few seconds), so a dead dependency cannot stall the
monitor; the clients they use are made for the check (no retries), not the service's working clients.
"""

from __future__ import annotations

from collections.abc import Callable

from services.common.settings import Settings

Check = Callable[[], "str | None"]
TIMEOUT_S = 3.0


def s3_check(settings: Settings, timeout_s: float = TIMEOUT_S) -> Check:
    """The object store answers and the bucket exists (one HEAD bucket request, no retries)."""
    import os

    import certifi
    import urllib3
    from minio import Minio

    http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s),
                               retries=urllib3.Retry(total=0, redirect=0), maxsize=1, cert_reqs="CERT_REQUIRED",
                               ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where())  # as minio's own
    client = Minio(settings.s3_endpoint, access_key=settings.s3_access_key, secret_key=settings.s3_secret_key,
                   secure=settings.s3_secure, region=settings.s3_region, http_client=http)
    where = f"S3 endpoint {settings.s3_endpoint}"

    def check() -> str | None:
        try:
            if client.bucket_exists(settings.s3_bucket):
                return None
            return f"{where}: bucket {settings.s3_bucket!r} does not exist"
        except Exception as e:  # noqa: BLE001  (any failure is the reason)
            return f"{where} unreachable or refusing: {_short(e)}"

    return check


def redis_check(url: str, timeout_s: float = TIMEOUT_S) -> Check:
    """Redis answers PING (records and the Celery broker live there)."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                  retry_on_timeout=False)
    where = f"Redis at {_redact(url)}"

    def check() -> str | None:
        try:
            client.ping()
            return None
        except Exception as e:  # noqa: BLE001
            client.connection_pool.disconnect()
            return f"{where} unreachable: {_short(e)}"

    return check


def grpc_health_check(name: str, address: str, channel_factory: Callable[[], object],
                      timeout_s: float = TIMEOUT_S) -> Check:
    """The gRPC service at ``address`` answers the standard health check with SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    holder: dict[str, object] = {}

    def check() -> str | None:
        ch = holder.get("ch")
        if ch is None:
            ch = holder["ch"] = channel_factory()
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError as e:
            return f"{name} service at {address} unreachable: {e.code().name}: {_short(e.details() or '')}"
        if r.status != health_pb2.HealthCheckResponse.SERVING:
            return (f"{name} service at {address} is "
                    f"{health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)} (its own checks say why: "
                    f"cfrseg client health)")
        return None

    return check


def register_common(monitor, settings: Settings) -> None:
    """The checks every service has: the object store, and Redis when configured."""
    monitor.add_check("s3", s3_check(settings))
    if settings.redis_url:
        monitor.add_check("redis", redis_check(settings.redis_url))


def _short(e: object, n: int = 200) -> str:
    reason = getattr(e, "reason", None)  # urllib3's MaxRetryError: the underlying error says what happened
    if isinstance(e, BaseException) and isinstance(reason, BaseException):
        e = reason
    text = str(e) if not isinstance(e, BaseException) else (f"{type(e).__name__}: {e}" if str(e) else
                                                               type(e).__name__)
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _redact(url: str) -> str:
    """A Redis URL without its password."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        host = parts.hostname or ""
        netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
