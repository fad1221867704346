"""Service settings, read from environment variables (documented in docs/services.md).

Secrets can be given directly or as a file (``X_FILE``, e.g. a compose/Docker secret); the file wins.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping

from cfrseg.errors import ConfigError


def _read_secret(env: Mapping[str, str], name: str) -> str:
    path = env.get(f"{name}_FILE", "")
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as e:
            raise ConfigError(f"{name}_FILE={path!r}: cannot read it ({e.strerror})") from None
    return env.get(name, "").strip()


def _tokens(raw: str) -> tuple[str, ...]:
    """Tokens separated by commas or newlines; blank entries and '#' comment lines are dropped."""
    out = []
    for line in raw.replace(",", "\n").splitlines():
        t = line.strip()
        if t and not t.startswith("#"):
            out.append(t)
    return tuple(out)


def _bool(env: Mapping[str, str], name: str, default: bool = False) -> bool:
    v = env.get(name, "").strip().lower()
    if not v:
        return default
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={v!r}: expected 1/0, true/false, yes/no or on/off")


def _num(env: Mapping[str, str], name: str, default: float) -> float:
    v = env.get(name, "").strip()
    try:
        return float(v) if v else default
    except ValueError:
        raise ConfigError(f"{name}={v!r}: expected a number") from None


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"                 # CFRSEG_HOST (0.0.0.0 in containers)
    port: int = 50051                       # CFRSEG_PORT (or --port)
    # object store
    s3_endpoint: str = "127.0.0.1:9000"     # CFRSEG_S3_ENDPOINT host:port
    s3_access_key: str = ""                 # CFRSEG_S3_ACCESS_KEY(_FILE)
    s3_secret_key: str = ""                 # CFRSEG_S3_SECRET_KEY(_FILE)
    s3_bucket: str = "cfrseg"               # CFRSEG_S3_BUCKET
    s3_secure: bool = False                 # CFRSEG_S3_SECURE (https)
    s3_region: str = "us-east-1"            # CFRSEG_S3_REGION
    redis_url: str = ""                     # CFRSEG_REDIS_URL; "" = records in the object store only
    # auth / TLS
    tokens: tuple[str, ...] = ()            # CFRSEG_TOKEN / CFRSEG_TOKEN_FILE (public gateway tokens)
    internal_token: str = ""                # CFRSEG_INTERNAL_TOKEN(_FILE): gateway/worker -> stage services
    auth_disabled: bool = False             # CFRSEG_AUTH_DISABLED=1: development only, logged loudly
    tls_cert: str = ""                      # CFRSEG_TLS_CERT (PEM); with CFRSEG_TLS_KEY enables TLS
    tls_key: str = ""                       # CFRSEG_TLS_KEY
    tls_ca: str = ""                        # CFRSEG_TLS_CA: CA bundle clients use to verify servers
    # server
    max_message_mb: int = 16                # CFRSEG_MAX_MESSAGE_MB (receive and send)
    workers: int = 16                       # CFRSEG_WORKERS: gRPC handler threads (each Watch holds one)
    grace_s: float = 30.0                   # CFRSEG_GRACE_S: SIGTERM grace period
    log_level: str = "INFO"                 # CFRSEG_LOG_LEVEL
    # stage services
    workdir: str = "/tmp/cfrseg-work"       # CFRSEG_WORKDIR: local copies of inputs
    stage_impl: str = ""                    # CFRSEG_STAGE_IMPL=module:function (default: the core stage)
    segment_impl: str = ""                  # CFRSEG_SEGMENT_IMPL=module:function (retrain's Segment)
    device: str = ""                        # CFRSEG_DEVICE: overrides the configs' "device" ("" = keep)
    # addresses of the stage services (gateway, worker)
    addrs: dict[str, str] = field(default_factory=dict)  # CFRSEG_{FINETUNE,PSEUDOLABEL,RETRAIN}_ADDR

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> "Settings":
        e = os.environ if env is None else env
        tokens = _tokens(_read_secret(e, "CFRSEG_TOKEN"))
        s = cls(
            host=e.get("CFRSEG_HOST", cls.host),
            port=int(_num(e, "CFRSEG_PORT", cls.port)),
            s3_endpoint=e.get("CFRSEG_S3_ENDPOINT", cls.s3_endpoint),
            s3_access_key=_read_secret(e, "CFRSEG_S3_ACCESS_KEY"),
            s3_secret_key=_read_secret(e, "CFRSEG_S3_SECRET_KEY"),
            s3_bucket=e.get("CFRSEG_S3_BUCKET", cls.s3_bucket),
            s3_secure=_bool(e, "CFRSEG_S3_SECURE"),
            s3_region=e.get("CFRSEG_S3_REGION", cls.s3_region),
            redis_url=e.get("CFRSEG_REDIS_URL", ""),
            tokens=tokens,
            internal_token=_read_secret(e, "CFRSEG_INTERNAL_TOKEN"),
            auth_disabled=_bool(e, "CFRSEG_AUTH_DISABLED"),
            tls_cert=e.get("CFRSEG_TLS_CERT", ""),
            tls_key=e.get("CFRSEG_TLS_KEY", ""),
            tls_ca=e.get("CFRSEG_TLS_CA", ""),
            max_message_mb=int(_num(e, "CFRSEG_MAX_MESSAGE_MB", cls.max_message_mb)),
            workers=int(_num(e, "CFRSEG_WORKERS", cls.workers)),
            grace_s=_num(e, "CFRSEG_GRACE_S", cls.grace_s),
            log_level=e.get("CFRSEG_LOG_LEVEL", cls.log_level).upper(),
            workdir=e.get("CFRSEG_WORKDIR", cls.workdir),
            stage_impl=e.get("CFRSEG_STAGE_IMPL", ""),
            segment_impl=e.get("CFRSEG_SEGMENT_IMPL", ""),
            device=e.get("CFRSEG_DEVICE", ""),
            addrs={s: e[f"CFRSEG_{s.upper()}_ADDR"] for s in ("finetune", "pseudolabel", "retrain", "gateway")
                   if e.get(f"CFRSEG_{s.upper()}_ADDR")},
        )
        s = replace(s, **overrides)
        s.validate()
        return s

    def validate(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("set both CFRSEG_TLS_CERT and CFRSEG_TLS_KEY (or neither)")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port {self.port} out of range")
        if self.max_message_mb < 1 or self.workers < 2:
            raise ConfigError("CFRSEG_MAX_MESSAGE_MB must be >= 1 and CFRSEG_WORKERS >= 2")

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"
