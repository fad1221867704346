"""Provenance digests, the reuse rule (resume only with equal digests) and the test-set guard."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cfrseg.data.io import write_volume
from cfrseg.data.manifest import Case, Manifest
from cfrseg.data.volume import Volume
from cfrseg.errors import ConfigError, InputError
from cfrseg.provenance import check_disjoint, differences, guard, stage_provenance
from cfrseg.store import LocalStore


def small_set(root: Path, n: int = 4) -> Manifest:
    cases = []
    for i in range(n):
        a = np.zeros((12, 10, 8), np.float32)
        a[3:8, 3:7, 2:6] = 1 + i
        img = write_volume(Volume(a), root / f"img{i}.nii.gz")
        lab = write_volume(Volume((a > 0).astype(np.uint8)), root / f"lab{i}.nii.gz", label=True)
        cases.append(Case(f"c{i}", str(img), str(lab), "labeled" if i == 0 else "unlabeled"))
    return Manifest("set", 2, tuple(cases))


def test_reuse_only_with_resume_and_equal_digests(tmp_path: Path) -> None:
    m = small_set(tmp_path)
    cfg = {"lr": 0.01, "iterations": 10}
    store = LocalStore(tmp_path / "stage")
    prov = stage_provenance("retrain", m, cfg, plan="p1")
    assert guard(store, "retrain", prov, resume=False, markers=("model.pt",)) is False   # fresh: recorded
    assert json.loads(store.get_bytes("provenance.json"))["manifest"] == prov["manifest"]
    store.put_bytes("model.pt", b"x")
    with pytest.raises(ConfigError,
                       match=r"already holds a retrain run \(provenance.json, model.pt\).*--resume"):
        guard(store, "retrain", prov, resume=False, markers=("model.pt",))
    assert guard(store, "retrain", prov, resume=True, markers=("model.pt",)) is True     # same digests: reuse
    # another --labeled: the message names the cases whose role changed
    m2 = replace(m, cases=(m.cases[0], replace(m.cases[1], role="labeled"), *m.cases[2:]))
    with pytest.raises(ConfigError, match=r"cannot resume.*roles changed \{'c1': 'unlabeled->labeled'\}"):
        guard(store, "retrain", stage_provenance("retrain", m2, cfg, plan="p1"), True, ("model.pt",))
    # another dataset file, another setting, another plan, another input
    edited = Path(m.cases[2].image)
    write_volume(Volume(np.ones((12, 10, 8), np.float32)), edited)
    prov3 = stage_provenance("retrain", m, {"lr": 0.02, "iterations": 10}, plan="p2",
                             inputs={"finetune": "b"})
    msg = " | ".join(differences(json.loads(store.get_bytes("provenance.json")), prov3))
    assert "files changed for ['c2']" in msg and "settings: lr 0.01->0.02" in msg
    assert "plan: p1 -> p2" in msg and "input finetune" in msg
    with pytest.raises(ConfigError, match="files changed for"):
        guard(store, "retrain", prov3, True, ("model.pt",))
    # cases removed / added
    m4 = replace(m, cases=m.cases[:2] + (Case("new", m.cases[3].image, None, "unlabeled"),))
    msg = " | ".join(differences(prov, stage_provenance("retrain", m4, cfg, plan="p1")))
    assert "cases added ['new']" in msg and "cases removed ['c2', 'c3']" in msg
    # a code change is a difference too
    old = dict(prov, code={"version": "0.0.1", "sha256": "0" * 64})
    assert any(d.startswith("code: cfrseg 0.0.1") for d in differences(old, prov))


def test_store_without_provenance_is_not_reused(tmp_path: Path) -> None:
    m = small_set(tmp_path)
    store = LocalStore(tmp_path / "old")
    store.put_bytes("checkpoint.pt", b"x")
    with pytest.raises(ConfigError, match="without provenance.json"):
        guard(store, "finetune", stage_provenance("finetune", m, {}), True, ("checkpoint.pt",))


def test_test_set_guard_by_id_and_by_image_content(tmp_path: Path) -> None:
    m = small_set(tmp_path)
    train = m.training
    check_disjoint(train[:2], train[2:])                             # disjoint: fine
    with pytest.raises(InputError, match=r"same case id as a training case: \['c1'\]"):
        check_disjoint(train, [train[1]])
    copy = tmp_path / "copy.nii.gz"
    copy.write_bytes(Path(train[0].image).read_bytes())              # the same scan under another name
    with pytest.raises(InputError, match=r"same image file content \(sha256\).*'t9=c0'"):
        check_disjoint(train, [Case("t9", str(copy), train[0].label, "test")])
    from cfrseg.provenance import file_sha256

    with pytest.raises(InputError, match="overlaps the training data"):
        check_disjoint({"c0": file_sha256(train[0].image)}, [Case("x", str(copy), None, "test")])


def test_pipeline_refuses_overlapping_test_sets(tmp_path: Path) -> None:
    from cfrseg.stages.pipeline import _test_sets

    m = small_set(tmp_path)
    held = replace(m, cases=m.cases[:3] + (replace(m.cases[3], role="test"),))
    assert [n for n, _, _ in _test_sets(held, None)] == ["holdout"]
    leak = Manifest("t", 2, (replace(m.cases[1], role="test"),))     # a training case as --test-data
    with pytest.raises(InputError, match=r"--test-data set overlaps the training data"):
        _test_sets(held, leak)
    dup = replace(held, cases=held.cases[:3] + (Case("c9", m.cases[0].image, m.cases[0].label, "test"),))
    with pytest.raises(InputError, match=r"holdout set overlaps.*'c9=c0'"):
        _test_sets(dup, None)
