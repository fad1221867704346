"""The pseudo-label stage resumes per case after a crash: kill -9 of a process running it mid-stage, then a
restart with resume redoes only the unfinished cases, and the result equals an uninterrupted run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cfrseg.data.io import read_volume, write_volume
from cfrseg.data.manifest import Case, Manifest
from cfrseg.data.volume import Volume
from cfrseg.stages.finetune import FinetuneConfig, run_finetune
from cfrseg.stages.pseudolabel import PseudolabelConfig, run_pseudolabel
from cfrseg.store import LocalStore

TINY = dict(model="tiny", image_size=128, crop=(30, 30, 16), spacing_factor=(2.0, 2.0, 2.0), batch_size=1,
            iterations=2, warmup_iterations=1, checkpoint_interval_s=3600, device="cpu")

CRASH = """
import os, signal, sys
from cfrseg.data.manifest import Manifest
from cfrseg.stages.pseudolabel import PseudolabelConfig, run_pseudolabel
from cfrseg.store import LocalStore

def progress(ev):
    if ev.stage == "pseudolabel" and ev.step == int(sys.argv[4]):
        os.kill(os.getpid(), signal.SIGKILL)       # a hard crash right after this case was written

run_pseudolabel(PseudolabelConfig(resume=True, device="cpu"), Manifest.load(sys.argv[1]),
                LocalStore(sys.argv[2]), finetuned=LocalStore(sys.argv[3]), progress=progress)
"""


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Manifest, LocalStore, Path]:
    root = tmp_path_factory.mktemp("plres")
    rng = np.random.default_rng(0)
    cases = []
    for i in range(5):
        a = rng.normal(size=(44, 40, 28)).astype(np.float32)
        lab = np.zeros(a.shape, np.uint8)
        lab[10 + i:30, 8:28, 6:20] = 1
        a += 3 * lab
        geo = dict(spacing=(0.9, 0.9, 1.5), origin=(float(i), -4.0, 2.0))
        write_volume(Volume(a, **geo), root / f"c{i}.nii.gz")
        write_volume(Volume(lab, **geo), root / f"c{i}_lab.nii.gz", label=True)
        cases.append(Case(f"c{i}", str(root / f"c{i}.nii.gz"), str(root / f"c{i}_lab.nii.gz"),
                          "labeled" if i == 0 else "unlabeled"))
    m = Manifest("small", 2, tuple(cases))
    m.save(root / "manifest.json")
    ft = LocalStore(root / "ft")
    run_finetune(FinetuneConfig(**TINY), m, ft)
    return m, ft, root


def test_kill9_mid_stage_then_resume_redoes_only_unfinished_cases(small, tmp_path: Path) -> None:
    m, ft, root = small
    out = tmp_path / "pl"
    cmd = [sys.executable, "-c", CRASH, str(root / "manifest.json"), str(out), str(ft.root), "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == -9, r.stderr
    store = LocalStore(out)
    done = sorted(k.split("/")[1][: -len(".json")] for k in store.list("cases/"))
    assert done == ["c1", "c2"] and not store.exists("summary.json")
    mtimes = {k: store.path(k).stat().st_mtime_ns for k in store.list() if k.split("/")[0] in (
        "labels", "confidence", "cases") and any(f"/{c}." in k for c in done)}
    assert len(mtimes) == 6
    # the restart skips the two finished cases (files untouched) and predicts only c3, c4
    events = []
    res = run_pseudolabel(PseudolabelConfig(resume=True, device="cpu"), m, store, finetuned=ft,
                          progress=events.append)
    assert sorted(res.skipped) == done and sorted(res.labels) == ["c1", "c2", "c3", "c4"]
    assert [e.message for e in events] == ["c1 (already done)", "c2 (already done)", "c3", "c4"]
    assert {k: store.path(k).stat().st_mtime_ns for k in mtimes} == mtimes
    # the result equals an uninterrupted run
    straight = LocalStore(tmp_path / "straight")
    ref = run_pseudolabel(PseudolabelConfig(device="cpu"), m, straight, finetuned=ft)
    for cid in ref.labels:
        for key in (f"labels/{cid}.nii.gz", f"confidence/{cid}.nii.gz"):
            a, b = read_volume(store.path(key)), read_volume(straight.path(key))
            assert a.same_geometry(b) and np.array_equal(a.array, b.array), key
    # a record whose image changed is redone, not trusted
    import json

    rec = json.loads(store.get_bytes("cases/c3.json"))
    store.put_bytes("cases/c3.json", json.dumps(dict(rec, image_sha256="0" * 64)).encode())
    again = run_pseudolabel(PseudolabelConfig(resume=True, device="cpu"), m, store, finetuned=ft)
    assert sorted(again.skipped) == ["c1", "c2", "c4"]
