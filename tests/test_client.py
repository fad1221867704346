"""``cfrseg stack up|status|down`` as a user runs them, and ``cfrseg client ...`` against that stack (fake stages)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services import client as cli
from tests.stack_helpers import FAKE_ENV, make_dataset, need_servers

pytestmark = pytest.mark.stack
ROOT = Path(__file__).resolve().parent.parent


def cfrseg(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "cfrseg.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def stack_dir(tmp_path_factory):
    need_servers()
    d = tmp_path_factory.mktemp("cli") / ".stack"
    env = [a for k, v in {**FAKE_ENV, "CFRSEG_FAKE_STEPS": "3", "CFRSEG_FAKE_STEP_S": "0.1"}.items()
           for a in ("--env", f"{k}={v}")]
    r = cfrseg("stack", "up", "--dir", str(d), "--free-ports", *env)
    assert r.returncode == 0, r.stdout + r.stderr
    yield d
    r = cfrseg("stack", "down", "--dir", str(d))
    assert r.returncode == 0, r.stderr


def run_client(capsys, d: Path, *args: str) -> tuple[int, str, str]:
    rc = cli.main(["--stack-dir", str(d), *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_stack_and_client(stack_dir, capsys, tmp_path):
    r = cfrseg("stack", "status", "--dir", str(stack_dir))
    assert r.returncode == 0 and r.stdout.count(" up ") == 7, r.stdout
    assert (stack_dir / "token").stat().st_mode & 0o077 == 0
    r = cfrseg("stack", "up", "--dir", str(stack_dir))
    assert r.returncode == 1 and "already running" in r.stderr

    data = make_dataset(tmp_path / "set", n=3)
    rc, out, _ = run_client(capsys, stack_dir, "upload-dataset", str(data), "--labeled", "1", "--holdout", "1")
    assert rc == 0 and "1 labeled, 1 unlabeled, 1 test" in out
    ds_id = out.split()[1].rstrip(":")
    rc, out, err = run_client(capsys, stack_dir, "submit", "--dataset", ds_id, "--profile", "tiny", "--ssl", "mt",
                              "--watch")
    assert rc == 0, err
    run_id = out.split()[0]
    assert "SUCCEEDED" in out.splitlines()[-1] and "dice=" in out
    assert "retrain" in err  # progress bars go to stderr

    rc, out, _ = run_client(capsys, stack_dir, "get", run_id)
    assert json.loads(out)["state"] == "RUN_STATE_SUCCEEDED"
    rc, out, _ = run_client(capsys, stack_dir, "list", "--state", "succeeded")
    assert run_id in out
    rc, out, _ = run_client(capsys, stack_dir, "models")
    assert run_id in out
    rc, out, _ = run_client(capsys, stack_dir, "fetch", run_id, "--out", str(tmp_path / "got"))
    assert rc == 0 and (tmp_path / "got" / "retrain" / "model.pt").is_file()
    assert (tmp_path / "got" / "report.md").is_file() and (tmp_path / "got" / "evaluate" / "metrics.json").is_file()
    seg = tmp_path / "seg.nii.gz"
    rc, out, _ = run_client(capsys, stack_dir, "segment", "--model", run_id, str(data / "images" / "c2.nii.gz"),
                            str(seg))
    assert rc == 0 and seg.is_file()

    rc, _, err = run_client(capsys, stack_dir, "cancel", run_id)
    assert rc == 2 and "FAILED_PRECONDITION" in err
    rc, _, err = run_client(capsys, stack_dir, "get", "run-nope")
    assert rc == 2 and err.startswith("error: NOT_FOUND: no run 'run-nope'")
    rc, _, err = run_client(capsys, stack_dir, "--token", "wrong", "list")
    assert rc == 2 and "UNAUTHENTICATED" in err


def test_stack_down_stops_everything(tmp_path):
    need_servers()
    d = tmp_path / ".stack"
    assert cfrseg("stack", "up", "--dir", str(d), "--free-ports").returncode == 0
    pids = json.loads((d / "stack.json").read_text())["pids"]
    r = cfrseg("stack", "down", "--dir", str(d))
    assert r.returncode == 0 and r.stdout.count("stopped") == 7
    for pid in pids.values():
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    assert cfrseg("stack", "status", "--dir", str(d)).returncode == 1
