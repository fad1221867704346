"""``cfrseg stack up|status|down`` as a user runs them, and ``cfrseg client ...`` against that stack (fake stages)."""

from __future__ import annotations

import json
import os
import shlex
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
    rc, out, _ = run_client(capsys, stack_dir, "upload-dataset", str(data), "--labeled", "1", "--holdout", "1",
                            "--num-classes", "2", "--class-names", "tumour", "--modality", "ct")
    assert rc == 0 and "1 labeled, 1 unlabeled, 1 test (2 classes: tumour; CT)" in out
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
    r = cfrseg("stack", "up", "--dir", str(d), "--free-ports")
    assert r.returncode == 0
    # the printed hint works as printed (leading client options before the command)
    hint = next(line for line in r.stdout.splitlines() if "try: cfrseg client" in line).split("try: cfrseg ", 1)[1]
    h = cfrseg(*shlex.split(hint))
    assert h.returncode == 0 and not h.stderr.strip(), h.stderr
    pids = json.loads((d / "stack.json").read_text())["pids"]
    r = cfrseg("stack", "down", "--dir", str(d))
    assert r.returncode == 0 and r.stdout.count("stopped") == 7
    for pid in pids.values():
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    assert cfrseg("stack", "status", "--dir", str(d)).returncode == 1


@pytest.mark.la
def test_upload_dataset_takes_the_la_h5_layout(stack_dir, la_dir, la_ids, tmp_path):
    """The LA layout (train.list + <id>/mri_norm2.h5) through the real CLI: converted on the client side to
    NIfTI with the LA geometry (0.625 mm), voxels and labels unchanged."""
    import numpy as np
    from minio import Minio

    from cfrseg.data.io import read_la_h5, read_volume
    from services.sdk import Client, state_name

    ids = la_ids[:3]
    root = tmp_path / "la"
    root.mkdir()
    for i in ids:
        (root / i).symlink_to((la_dir / i).resolve(), target_is_directory=True)
    (root / "train.list").write_text("\n".join(ids) + "\n")
    r = cfrseg("client", "upload-dataset", str(root), "--labeled", "1", "--holdout", "1", "--stack-dir",
               str(stack_dir))
    assert r.returncode == 0, r.stderr
    assert "1 labeled, 1 unlabeled, 1 test (2 classes: left_atrium; MR)" in r.stdout   # LA layout names its class
    ds_id = r.stdout.split()[1].rstrip(":")

    st = json.loads((stack_dir / "stack.json").read_text())
    s3 = Minio(st["s3_endpoint"], access_key="cfrseg", secret_key=(stack_dir / "s3_secret_key").read_text().strip(),
               secure=False, region="us-east-1")
    with Client(st["gateway"], (stack_dir / "token").read_text().strip()) as c:
        ds = c.get_dataset(ds_id)
        by_id = {x.case_id: x for x in ds.cases}
        assert list(by_id) == ids and not by_id[ids[1]].label_upload_id  # the unlabeled case's label stays home
        for cid, what, up in ((ids[0], "image", by_id[ids[0]].image_upload_id),
                              (ids[0], "label", by_id[ids[0]].label_upload_id),
                              (ids[2], "label", by_id[ids[2]].label_upload_id)):
            local = tmp_path / f"{cid}-{what}.nii.gz"
            s3.fget_object(st["bucket"], f"uploads/{up}/volume.nii.gz", str(local))
            got, want = read_volume(local), read_la_h5(la_dir / cid / "mri_norm2.h5", what)
            assert got.spacing == pytest.approx((0.625, 0.625, 0.625)) and got.shape == want.shape
            assert np.array_equal(got.array, want.array), (cid, what)
        run = c.submit_run(ds_id, profile="tiny")
        assert state_name(c.wait_run(run.run_id, timeout=120).state) == "SUCCEEDED"
