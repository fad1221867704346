"""Service settings, read from environment variables (documented in docs/services.md).

Secrets can be given directly or as a file (``X_FILE``, e.g. a compose/Docker secret); the file wins.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping

from cfrseg.errors import ConfigError

log = logging.getLogger("cfrseg.services.settings")
DEVICE_RE = re.compile(r"^(|auto|cpu|cuda|cuda:\d+)$")


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
    tls_cert: str = ""                      # CFRSEG_TLS_CERT (PEM chain); with CFRSEG_TLS_KEY enables TLS
    tls_key: str = ""                       # CFRSEG_TLS_KEY
    tls_client_ca: str = ""                 # CFRSEG_TLS_CLIENT_CA: require client certificates signed by it (mTLS)
    internal_ca: str = ""                   # CFRSEG_INTERNAL_CA: CA bundle for outgoing calls to the stage services
    internal_cert: str = ""                 # CFRSEG_INTERNAL_CERT/KEY: client certificate for those calls (when
    internal_key: str = ""                  # the stage services require one: their CFRSEG_TLS_CLIENT_CA)
    # server
    max_message_mb: int = 16                # CFRSEG_MAX_MESSAGE_MB (receive and send)
    workers: int = 32                       # CFRSEG_WORKERS: gRPC handler threads (each open stream holds one)
    max_concurrent_rpcs: int = 0            # CFRSEG_MAX_CONCURRENT_RPCS: refused beyond (0 = 4 x workers)
    max_watches: int = 0                    # CFRSEG_MAX_WATCHES: open watch streams, server-wide (0 = workers/2)
    max_watches_per_client: int = 8         # CFRSEG_MAX_WATCHES_PER_CLIENT: per (token, peer address)
    keepalive_s: float = 60.0               # CFRSEG_KEEPALIVE_S: HTTP/2 ping period on idle connections
    health_interval_s: float = 10.0         # CFRSEG_HEALTH_INTERVAL_S: seconds between dependency checks
    grace_s: float = 30.0                   # CFRSEG_GRACE_S: SIGTERM grace period
    log_level: str = "INFO"                 # CFRSEG_LOG_LEVEL
    # stage services
    workdir: str = "/tmp/cfrseg-work"       # CFRSEG_WORKDIR: local copies of inputs
    stage_impl: str = ""                    # CFRSEG_STAGE_IMPL=module:function (default: the core stage)
    segment_impl: str = ""                  # CFRSEG_SEGMENT_IMPL=module:function (retrain's Segment)
    device: str = ""                        # CFRSEG_DEVICE: cuda (-> cuda:CFRSEG_GPU), cuda:N, cpu, auto; "" = keep
    # addresses of the stage services (gateway, worker)
    addrs: dict[str, str] = field(default_factory=dict)  # CFRSEG_{FINETUNE,PSEUDOLABEL,RETRAIN}_ADDR
    # devices, weights, retries (docs/services.md, "Weights and devices", "Reliability")
    gpu: int = 0                            # CFRSEG_GPU: the CUDA index this service uses with CFRSEG_DEVICE=cuda
    lock_dir: str = ""                      # CFRSEG_LOCK_DIR: per-device lock files shared by the GPU services
    gpu_wait_s: float = 30.0                # CFRSEG_GPU_WAIT_S: Segment's wait for a busy device
    weights_dir: str = ""                   # CFRSEG_CACHE: weights folder ("" = ~/.cache/cfrseg/weights)
    default_profile: str = "lite"           # CFRSEG_DEFAULT_PROFILE: the gateway's default profile
    required_weights: str = "auto"          # CFRSEG_REQUIRED_WEIGHTS: auto (the default profile's) | none | a,b
    s3_retry_s: float = 5.0                 # CFRSEG_S3_RETRY_S: retry budget of one S3 call in an RPC
    s3_job_retry_s: float = 300.0           # CFRSEG_S3_JOB_RETRY_S: the same inside a running stage job

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> "Settings":
        e = os.environ if env is None else env
        tokens = _tokens(_read_secret(e, "CFRSEG_TOKEN"))
        internal_ca = e.get("CFRSEG_INTERNAL_CA", "")
        if e.get("CFRSEG_TLS_CA"):
            # deprecated: it meant both "CA of my outgoing calls" and "CA of my own healthcheck"
            log.warning("CFRSEG_TLS_CA is deprecated: use CFRSEG_INTERNAL_CA (CA for calls to the stage services) "
                        "and CFRSEG_HEALTHCHECK_CA (CA of the container healthcheck); taken as CFRSEG_INTERNAL_CA%s",
                        " (ignored: CFRSEG_INTERNAL_CA is set)" if internal_ca else "")
            internal_ca = internal_ca or e["CFRSEG_TLS_CA"]
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
            tls_client_ca=e.get("CFRSEG_TLS_CLIENT_CA", ""),
            internal_ca=internal_ca,
            internal_cert=e.get("CFRSEG_INTERNAL_CERT", ""),
            internal_key=e.get("CFRSEG_INTERNAL_KEY", ""),
            max_message_mb=int(_num(e, "CFRSEG_MAX_MESSAGE_MB", cls.max_message_mb)),
            workers=int(_num(e, "CFRSEG_WORKERS", cls.workers)),
            max_concurrent_rpcs=int(_num(e, "CFRSEG_MAX_CONCURRENT_RPCS", cls.max_concurrent_rpcs)),
            max_watches=int(_num(e, "CFRSEG_MAX_WATCHES", cls.max_watches)),
            max_watches_per_client=int(_num(e, "CFRSEG_MAX_WATCHES_PER_CLIENT", cls.max_watches_per_client)),
            keepalive_s=_num(e, "CFRSEG_KEEPALIVE_S", cls.keepalive_s),
            health_interval_s=_num(e, "CFRSEG_HEALTH_INTERVAL_S", cls.health_interval_s),
            grace_s=_num(e, "CFRSEG_GRACE_S", cls.grace_s),
            log_level=e.get("CFRSEG_LOG_LEVEL", cls.log_level).upper(),
            workdir=e.get("CFRSEG_WORKDIR", cls.workdir),
            stage_impl=e.get("CFRSEG_STAGE_IMPL", ""),
            segment_impl=e.get("CFRSEG_SEGMENT_IMPL", ""),
            device=e.get("CFRSEG_DEVICE", ""),
            addrs={s: e[f"CFRSEG_{s.upper()}_ADDR"] for s in ("finetune", "pseudolabel", "retrain", "gateway")
                   if e.get(f"CFRSEG_{s.upper()}_ADDR")},
            gpu=int(_num(e, "CFRSEG_GPU", cls.gpu)),
            lock_dir=e.get("CFRSEG_LOCK_DIR", ""),
            gpu_wait_s=_num(e, "CFRSEG_GPU_WAIT_S", cls.gpu_wait_s),
            weights_dir=e.get("CFRSEG_CACHE", ""),
            default_profile=e.get("CFRSEG_DEFAULT_PROFILE", cls.default_profile).strip() or cls.default_profile,
            required_weights=e.get("CFRSEG_REQUIRED_WEIGHTS", cls.required_weights).strip() or "auto",
            s3_retry_s=_num(e, "CFRSEG_S3_RETRY_S", cls.s3_retry_s),
            s3_job_retry_s=_num(e, "CFRSEG_S3_JOB_RETRY_S", cls.s3_job_retry_s),
        )
        s = replace(s, **overrides)
        s.validate()
        return s

    def validate(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("set both CFRSEG_TLS_CERT and CFRSEG_TLS_KEY (or neither)")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("CFRSEG_TLS_CLIENT_CA (mTLS) needs TLS: set CFRSEG_TLS_CERT and CFRSEG_TLS_KEY too")
        if bool(self.internal_cert) != bool(self.internal_key):
            raise ConfigError("set both CFRSEG_INTERNAL_CERT and CFRSEG_INTERNAL_KEY (or neither)")
        for name, path in (("CFRSEG_TLS_CERT", self.tls_cert), ("CFRSEG_TLS_KEY", self.tls_key),
                           ("CFRSEG_TLS_CLIENT_CA", self.tls_client_ca), ("CFRSEG_INTERNAL_CA", self.internal_ca),
                           ("CFRSEG_INTERNAL_CERT", self.internal_cert), ("CFRSEG_INTERNAL_KEY", self.internal_key)):
            if path and not os.access(path, os.R_OK):
                raise ConfigError(f"{name}={path!r}: no readable file there")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port {self.port} out of range")
        if self.max_message_mb < 1 or self.workers < 2:
            raise ConfigError("CFRSEG_MAX_MESSAGE_MB must be >= 1 and CFRSEG_WORKERS >= 2")
        if self.max_concurrent_rpcs < 0 or self.max_watches < 0 or self.max_watches_per_client < 1:
            raise ConfigError("CFRSEG_MAX_CONCURRENT_RPCS and CFRSEG_MAX_WATCHES must be >= 0 (0 = default), "
                              "CFRSEG_MAX_WATCHES_PER_CLIENT >= 1")
        if self.keepalive_s < 1 or self.health_interval_s <= 0:
            raise ConfigError("CFRSEG_KEEPALIVE_S must be >= 1 and CFRSEG_HEALTH_INTERVAL_S > 0")
        if not DEVICE_RE.match(self.device.strip().lower()):
            raise ConfigError(f"CFRSEG_DEVICE={self.device!r}: expected cuda, cuda:N, cpu, auto or empty")
        if self.gpu < 0:
            raise ConfigError(f"CFRSEG_GPU={self.gpu}: expected a device index >= 0")
        if self.gpu_wait_s < 0 or self.s3_retry_s < 0 or self.s3_job_retry_s < 0:
            raise ConfigError("CFRSEG_GPU_WAIT_S, CFRSEG_S3_RETRY_S and CFRSEG_S3_JOB_RETRY_S must be >= 0")

    @property
    def weights_path(self) -> Path:
        """The weights folder: CFRSEG_CACHE, else the core's default cache (~/.cache/cfrseg/weights)."""
        from cfrseg.sam.weights import default_cache_dir

        return Path(self.weights_dir).expanduser() if self.weights_dir else default_cache_dir()

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    @property
    def rpc_limit(self) -> int:
        """RPCs in progress (running or queued for a thread) beyond which new ones get RESOURCE_EXHAUSTED."""
        return self.max_concurrent_rpcs or 4 * self.workers

    @property
    def watch_limit(self) -> int:
        """Open watch streams, server-wide: at most half the threads, so unary RPCs always find one."""
        return self.max_watches or max(1, self.workers // 2)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"
