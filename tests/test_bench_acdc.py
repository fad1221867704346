"""The ACDC quality benchmark's logic without training: the by-patient split (validation = the last 10 patients
of splits.json's train list; its val list is the test split, read only when asked for), roles, run specs and
the per-class table."""

from __future__ import annotations

import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import acdc_protocol as ap_
import quality_acdc as qa
import run_records as rr

from tests.test_acdc import _acdc_dir

PATS = [f"acdc_patient{i:03d}" for i in (99, 38, 50, 100, 58, 21, 49, 20, 72, 1, 2, 3, 4, 5, 6, 7, 8)]
IDS = [f"{p}_frame{f}" for p in PATS for f in ("01", "02")]


def test_split_is_by_patient_and_the_last_ten_are_validation():
    sp = ap_.split_patients(IDS)
    assert sp["val"] == PATS[-10:] and sp["pool"] == PATS[:-10]
    r = ap_.roles(IDS, 3)
    assert r["labeled"] == IDS[:6] and r["unlabeled"] == IDS[6:14] and r["test"] == IDS[14:]
    small = ap_.roles(IDS, 1, max_pool=2, max_val=1)
    assert small == {"labeled": IDS[:2], "unlabeled": IDS[2:4], "test": IDS[14:16]}
    with pytest.raises(ValueError, match="labeled patients"):
        ap_.roles(IDS, 8)
    with pytest.raises(ValueError, match="max_val"):
        ap_.roles(IDS, 1, max_val=11)
    with pytest.raises(ValueError, match="not acdc_patient"):
        ap_.patients(["case_1"])


TEST_IDS = [f"acdc_patient{i:03d}_frame{f}" for i in (28, 85, 9) for f in ("01", "02")]


def test_splits_json_val_list_is_read_only_for_the_test_split(tmp_path):
    (tmp_path / "splits.json").write_text(json.dumps({"train": IDS, "val": "not a list: must not be read"}))
    ids, sha = ap_.read_train(tmp_path)
    assert ids == IDS and len(sha) == 64
    with pytest.raises(ValueError, match="'val' list"):
        ap_.read_test(tmp_path)
    (tmp_path / "splits.json").write_text(json.dumps({"train": IDS, "val": TEST_IDS}))
    assert ap_.read_test(tmp_path) == TEST_IDS
    r = ap_.roles(IDS, 3, test_ids=TEST_IDS)
    assert r["test"] == TEST_IDS and r["labeled"] == IDS[:6] and r["unlabeled"] == IDS[6:14]   # training unchanged
    assert ap_.roles(IDS, 3, max_val=2, test_ids=TEST_IDS)["test"] == TEST_IDS[:4]               # by patient
    (tmp_path / "splits.json").write_text(json.dumps({"train": IDS, "val": TEST_IDS + IDS[-2:]}))
    with pytest.raises(ValueError, match="share patients"):
        ap_.read_test(tmp_path)
    (tmp_path / "splits.json").write_text(json.dumps({"val": IDS}))
    with pytest.raises(ValueError, match="'train'"):
        ap_.read_train(tmp_path)


def test_one_training_has_a_spec_per_split_that_share_its_train_key():
    code = {"commit": "abc", "dirty": False, "diff_sha256": None}
    val = qa.make_spec(_args(), 3, "cfr_mt", 0, code, IDS, "0" * 64)
    test = qa.make_spec(_args(), 3, "cfr_mt", 0, code, IDS, "0" * 64, "test", TEST_IDS)
    assert val["split"] == "val" and test["split"] == "test" and test["split_ids"] == TEST_IDS
    assert rr.train_key(val) == rr.train_key(test) and rr.key_of(val) != rr.key_of(test)
    with pytest.raises(ValueError, match="test_ids"):
        qa.make_spec(_args(), 3, "cfr_mt", 0, code, IDS, "0" * 64, "test")
    # tables never mix the splits

    def rec(spec, d):
        return {"spec": spec, "timing": {}, "models": {"CFR_MT": {c: {"dice": [d] * 3, "jaccard": [d] * 3,
                                                                      "asd": [1.0] * 3, "hd95": [2.0] * 3}
                                                                  for c in spec["split_ids"]}}}
    md = qa.to_markdown([rec(val, 0.5), rec(test, 0.7)], ["RV", "Myo", "LV"])
    assert "Split `val` (20 frames)" in md and f"Split `test` ({len(TEST_IDS)} frames)" in md
    rows = [line for line in md.splitlines() if line.startswith("| 3 | CFR_MT | 1 |")]
    assert len(rows) == 2 and {"| 0.500 | 0.500 | 0.500 | 0.500 |" in r for r in rows} == {True, False}


def _args(**kw):
    a = {"profile": "tiny", "set": [], "max_pool": None, "max_val": None, "threads": 1}
    a.update(kw)
    return Namespace(**a)


def test_spec_keys_change_with_subset_and_table_is_per_class():
    code = {"commit": "abc", "dirty": False, "diff_sha256": None}
    s1 = qa.make_spec(_args(), 3, "cfr_mt", 0, code, IDS, "0" * 64)
    s2 = qa.make_spec(_args(max_val=1), 3, "cfr_mt", 0, code, IDS, "0" * 64)
    assert s1["split_ids"] == IDS[14:] and s1["labeled_ids"] == IDS[:6] and rr.key_of(s1) != rr.key_of(s2)
    assert s1["resolved"]["retrain"]["seed"] == 0 and s1["bench"] == "quality_acdc"

    def case(d, h):
        return {"dice": d, "jaccard": d, "asd": h, "hd95": h}
    recs = []
    for seed, method, models in ((0, "cfr_mt", ("CFR_FT", "CFR_MT")), (0, "cfr_magicnet", ("CFR_FT", "CFR_MAGICNET")),
                                 (1, "cfr_mt", ("CFR_FT", "CFR_MT"))):
        spec = dict(s1, seed=seed, method=method)
        d = 0.5 + 0.1 * seed
        recs.append({"spec": spec, "models": {m: {c: case([d, 0.6, 0.9], [2.0, None, 4.0]) for c in IDS[14:]}
                                              for m in models},
                     "timing": {"pipeline_wall_s": 120.0, "peak_rss_mb": 2048.0}})
    md = qa.to_markdown(recs, ["RV", "Myo", "LV"])
    rows = {line.split(" | ")[1]: line for line in md.splitlines() if line.startswith("| 3 |")}
    # two seeds of CFR_MT: RV 0.5 and 0.6 -> 0.550 ± 0.071; CFR_FT counted once per seed (not 3 records)
    assert "| 0.550 ± 0.071 | 0.600 ± 0.000 | 0.900 ± 0.000 |" in rows["CFR_MT"]
    assert rows["CFR_FT"].startswith("| 3 | CFR_FT | 2 |") and rows["CFR_MAGICNET"].startswith("| 3 | CFR_MAGICNET | 1 |")
    assert "| n/a |" in rows["CFR_MT"] and "| 3.00 ± 0.00 |" in rows["CFR_MT"]   # Myo HD95 undefined; mean 3
    assert "Dice RV" in md and "HD95 in voxels" in md


def test_manifest_on_real_acdc_hides_unlabeled_labels():
    root = _acdc_dir()
    if root is None:
        pytest.skip("ACDC data not found: set CFRSEG_ACDC_DIR to the acdc folder to run this test")
    ids, _ = ap_.read_train(root)
    assert len(ids) == 140 and len(ap_.patients(ids)) == 70
    val_list = set(json.loads((root / "splits.json").read_text())["val"])
    man = ap_.manifest(root, 3)
    assert man.num_classes == 4 and list(man.class_names) == ["background", "RV", "Myo", "LV"]
    assert [c.case_id for c in man.labeled] == ids[:6] and len(man.unlabeled) == 114 and len(man.test) == 20
    assert all(c.label is None for c in man.unlabeled) and all(c.label for c in man.labeled + man.test)
    assert not {c.case_id for c in man.cases} & val_list
    test = ap_.manifest(root, 3, split="test")
    assert {c.case_id for c in test.test} == val_list and len(test.test) == 20 and all(c.label for c in test.test)
    assert [c.case_id for c in test.labeled] == ids[:6] and len(test.unlabeled) == 114


def test_paired_table_and_chart(tmp_path):
    code = {"commit": "abc", "dirty": False, "diff_sha256": None}
    s = qa.make_spec(_args(), 3, "mt", 0, code, IDS, "0" * 64)
    frames = IDS[14:]

    def case(d):
        return {"dice": [d, d, d], "jaccard": [d] * 3, "asd": [1.0] * 3, "hd95": [2.0] * 3}
    # CFR_MT beats MT on every frame but the last, by 0.1 (seed 0) and 0.2 (seed 1)
    recs = []
    for seed in (0, 1):
        recs.append({"spec": dict(s, seed=seed, method="mt"), "timing": {},
                     "models": {"MT": {c: case(0.5) for c in frames}}})
        up = 0.1 * (seed + 1)
        recs.append({"spec": dict(s, seed=seed, method="cfr_mt"), "timing": {},
                     "models": {"CFR_MT": {c: case(0.5 + (up if c != frames[-1] else -up)) for c in frames},
                                "CFR_FT": {c: case(0.4) for c in frames}}})
    md = qa.to_markdown(recs, ["RV", "Myo", "LV"])
    row = next(line for line in md.splitlines() if "CFR_MT - MT" in line)
    n = len(frames)
    assert row.startswith(f"| 3 | CFR_MT - MT | 2 | {n} | {0.15 * (n - 2) / n:+.3f} | {n - 1} / 1 / 0 |"), row
    assert "CFR_MAGICNET - MAGICNET" not in md          # no MagicNet records: no such row
    png = qa.dice_png(recs, ["RV", "Myo", "LV"], tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert qa.dice_png([], ["RV"], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_pseudo_label_settings_borrow_the_runs_without_pseudo_labels():
    """A setting that adds retrain.pl_* (inert without pseudo-labels) shows, and pairs against, the MT run of the
    same setting without it; a setting differing in anything else borrows nothing."""
    code = {"commit": "abc", "dirty": False, "diff_sha256": None}
    frames = IDS[14:]

    def rec(method, overrides, d):
        spec = dict(qa.make_spec(_args(), 3, method, 0, code, IDS, "0" * 64), overrides=overrides)
        models = {"CFR_MT" if method == "cfr_mt" else "MT": {c: {"dice": [d] * 3, "jaccard": [d] * 3,
                                                                 "asd": [1.0] * 3, "hd95": [2.0] * 3}
                                                             for c in frames}}
        return {"spec": spec, "models": models, "timing": {}}
    recs = [rec("mt", ["retrain.foreground_prob=0.33"], 0.2), rec("mt", ["retrain.iterations=5"], 0.9),
            rec("cfr_mt", ["retrain.foreground_prob=0.33", "retrain.pl_weight=1.0"], 0.5)]
    groups = qa.group_records(recs)
    with_pl = next(v for v in groups.values() if "retrain.pl_weight=1.0" in v[0][0]["spec"]["overrides"])
    assert with_pl[1] == [recs[0]]
    assert all(not b for rs, b in groups.values() if rs[0] is not recs[2])
    md = qa.to_markdown(recs, ["RV", "Myo", "LV"])
    assert "| 3 | CFR_MT - MT | 1 | 20 | +0.300 | 20 / 0 / 0 |" in md
    assert "Rows without pseudo-labels (mt L=3)" in md
