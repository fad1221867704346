"""Helpers of the container test (tests/test_containers.py): the docker/ci scripts, Compose and podman as
subprocesses, the phase timer and disk-peak sampler, and the project folder (secrets, TLS, weights) compose runs in."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import threading
import time
from pathlib import Path

from tests.certs import make_ca, make_cert

ROOT = Path(__file__).resolve().parent.parent
CI = ROOT / "docker" / "ci"
CTR_DIR = Path(os.environ.get("CFRSEG_CTR_DIR", "/var/tmp/cfrseg-containers"))
PROJECT = "cfrseg-ci"                                  # compose project name (containers cfrseg-ci-<service>-1)
S3_STANDIN = "localhost/cfrseg-ci/s3-standin:latest"   # docker/ci/images.sh: nanio, NOT MinIO
TARGETS = ("finetune", "pseudolabel", "retrain", "gateway", "worker", "tools")
UID = 10001                                            # the images' runtime user (docker/Dockerfile)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without cfrseg/compose settings of the caller, plus ``extra``."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("CFRSEG_", "MINIO_", "COMPOSE_", "DOCKER_"))}
    if "CFRSEG_CTR_DIR" in os.environ:
        keep["CFRSEG_CTR_DIR"] = os.environ["CFRSEG_CTR_DIR"]
    return {**keep, "PYTHON": os.environ.get("PYTHON", str(ROOT / ".venv" / "bin" / "python")), **extra}


def tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def script(name: str, *args: str, log: Path, timeout: float, env: dict[str, str] | None = None) -> None:
    """``bash docker/ci/<name> args``, output appended to ``log``; fails with the log's tail."""
    with open(log, "a") as f:
        f.write(f"\n$ bash docker/ci/{name} {' '.join(args)}\n")
        f.flush()
        r = subprocess.run(["bash", str(CI / name), *args], check=False, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                           env=env or clean_env(), timeout=timeout)
    assert r.returncode == 0, f"docker/ci/{name} {' '.join(args)} exited {r.returncode}:\n{tail(log)}"


def engine(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A command run with the engine's settings (docker/ci/env.sh), e.g. ``engine("podman", "ps")``."""
    return subprocess.run(["bash", str(CI / "env.sh"), *args], check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env or clean_env())


class Phases:
    """Wall time per phase and the disk peak (used bytes of the filesystem holding the engine's store)."""

    def __init__(self, where: Path) -> None:
        self.where = where
        self.times: dict[str, float] = {}
        self.start_used = shutil.disk_usage(where).used
        self.peak_used = self.start_used
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            self.peak_used = max(self.peak_used, shutil.disk_usage(self.where).used)

    def timed(self, name: str):
        phases = self

        class _T:
            def __enter__(self):
                self.t0 = time.monotonic()

            def __exit__(self, *exc):
                phases.times[name] = round(time.monotonic() - self.t0, 1)

        return _T()

    def result(self) -> dict:
        self._stop.set()
        self._thread.join(2)
        used = shutil.disk_usage(self.where).used
        return {"seconds": self.times, "total_s": round(sum(self.times.values()), 1),
                "disk_peak_gb_above_start": round((self.peak_used - self.start_used) / 1e9, 2),
                "disk_end_gb_above_start": round((used - self.start_used) / 1e9, 2),
                "engine_store": str(CTR_DIR)}

    def write(self, path: Path) -> str:
        text = json.dumps(self.result(), indent=2)
        path.write_text(text + "\n")
        return text


def make_project(d: Path, gateway_port: int) -> dict:
    """The folder compose runs in (``--project-directory``): secrets/ (tokens, keys, the gateway's TLS certificate
    for localhost and 127.0.0.1 signed by a fresh CA, owned by the services' user, mode 400) and weights/ (the
    LiteMedSAM checkpoint, as ``cfrseg weights fetch lite_medsam --dest weights`` leaves it)."""
    from cfrseg.sam.weights import cached_path, fetch

    sec, weights = d / "secrets", d / "weights"
    sec.mkdir(parents=True)
    weights.mkdir()
    for name in ("s3_access_key", "s3_secret_key", "internal_token"):
        (sec / name).write_text(secrets.token_urlsafe(24) + "\n")
    token = secrets.token_urlsafe(24)
    (sec / "api_tokens").write_text(f"# the container test's client\n{token}\n")
    ca = make_ca(d / "pki")
    crt, key = make_cert(d / "pki", ca, "gateway", dns=["localhost"], ips=["127.0.0.1"])
    (sec / "gateway.crt").write_bytes(crt.read_bytes() + ca[0].read_bytes())   # the chain, leaf first
    shutil.copy(key, sec / "gateway.key")
    shutil.copy(ca[0], sec / "ca.crt")
    for f in sec.iterdir():
        os.chown(f, UID, -1)
        f.chmod(0o400)
    token_file = d / "client-token"   # the client's copy of its token
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    src = cached_path("lite_medsam") or fetch("lite_medsam")
    shutil.copy(src, weights / src.name)
    return {"dir": d, "token": token, "token_file": token_file, "ca": ca[0], "address": f"127.0.0.1:{gateway_port}"}
