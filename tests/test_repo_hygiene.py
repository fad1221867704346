"""The repository names no path of the machine it was written on and no package registry's host.

Data and mirrors are found at run time (``$CFRSEG_LA_DIR`` or ``../shared/data`` beside the checkout; pip's own
configuration), so a literal path such as the absolute location of ``../shared`` or a mirror's host name in a
tracked file is a bug: it works on one machine and silently means something else on the next.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tracked_text_files() -> list[Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    files = []
    for name in out.decode().split("\0"):
        p = ROOT / name
        if name and p.is_file() and p.stat().st_size < 2_000_000:
            files.append(p)
    return files


def _package_sources() -> set[str]:
    """Host names and local paths of the package indexes and wheel folders this machine's pip is configured with
    (``index-url``, ``extra-index-url``, ``find-links``); an empty set where pip has none."""
    try:
        out = subprocess.run(["python3", "-m", "pip", "config", "list"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return set()
    found = set()
    for key, value in re.findall(r"""^\S*?([\w-]+)='?([^'\n]*)'?$""", out, flags=re.M):
        if not (key.endswith("index-url") or key == "find-links"):
            continue
        for part in value.split():
            url = urlparse(part)
            if url.hostname and url.hostname not in ("localhost", "127.0.0.1", "::1"):
                found.add(url.hostname)
            elif url.scheme in ("", "file") and len(url.path.rstrip("/")) > 4:
                found.add(url.path.rstrip("/"))
    return found


def test_no_machine_paths_or_registry_hosts_in_tracked_files() -> None:
    needles = {str(ROOT.parent / "shared"): "the absolute path of ../shared", ROOT.as_posix(): "this checkout's path"}
    needles.update({h: "a package source from pip's configuration" for h in _package_sources()})
    hits = []
    for path in _tracked_text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for needle, what in needles.items():
            if needle in text:
                hits.append(f"{path.relative_to(ROOT)}: {what} ({needle})")
    assert not hits, "tracked files name this machine:\n" + "\n".join(hits)
