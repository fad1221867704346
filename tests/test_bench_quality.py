"""The quality benchmark's logic: protocol splits, run keys and refusal of stale records, summary maths (mean ±
std over seeds, paired per-case comparison), the driver with a stand-in runner, and one run of real tiny stages
evaluated on two splits."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import protocol
import quality_summary as qs
import run_records as rr

IDS = [f"C{i:02d}" for i in range(80)]


# ------------------------------------------------------------------------------------------------ protocol
def test_splits_are_fixed_disjoint_and_cover_the_list():
    sp = protocol.split_ids(IDS)
    assert sp["val"] == IDS[64:80] and sp["test"] == IDS[48:64] and sp["pool"] == IDS[:48]
    assert sorted(sp["val"] + sp["test"] + sp["pool"]) == sorted(IDS)
    for L in (1, 4, 16, 48):
        for ev in (["val"], ["test"], ["val", "test"]):
            r = protocol.roles(IDS, L, ev)
            assert r["labeled"] == IDS[:L] and r["unlabeled"] == IDS[L:48]
            assert not set(r["test"]) & set(r["labeled"] + r["unlabeled"])
            assert set(r["test"]) == set().union(*(sp[s] for s in ev))


def test_split_errors():
    with pytest.raises(ValueError, match="80 unique"):
        protocol.split_ids(IDS[:79])
    with pytest.raises(ValueError, match="80 unique"):
        protocol.split_ids(IDS[:79] + IDS[:1])
    with pytest.raises(ValueError, match="two splits"):
        protocol.check_disjoint([["a", "b"], ["b"]])
    assert protocol.resolve_labeled("all", 48) == 48
    for bad in (0, 49, "x"):
        with pytest.raises(ValueError):
            protocol.resolve_labeled(bad, 48)
    with pytest.raises(ValueError, match="evaluation splits"):
        protocol.roles(IDS, 4, ["pool"])


@pytest.mark.la
def test_manifest_hides_unlabeled_labels(la_dir):
    ids, sha = protocol.read_ids(la_dir)
    assert len(sha) == 64
    man = protocol.manifest(la_dir, 4, ["val"])
    assert [c.case_id for c in man.labeled] == ids[:4]
    assert [c.case_id for c in man.test] == ids[64:80]
    assert len(man.unlabeled) == 44 and all(c.label is None for c in man.unlabeled)
    assert all(c.label for c in man.labeled + man.test)


# ------------------------------------------------------------------------------------------ records / keys
def _spec(**kw):
    s = {"bench": "quality_la", "profile": "lite", "resolved": {"retrain": {"seed": 0, "iterations": 1200}},
         "overrides": [], "seed": 0, "L": 4, "ceiling": False, "method": "mt", "split": "val",
         "split_ids": IDS[64:80], "labeled_ids": IDS[:4], "unlabeled_ids": IDS[4:48],
         "data_list_sha256": "0" * 64, "code": {"commit": "abc", "dirty": False, "diff_sha256": None},
         "platform": {"torch": "2.14.1", "cuda": None, "cpu_bf16_native": False}, "threads": 2}
    s.update(kw)
    return s


def _models(names=("MT",), dice=0.8):
    return {n: {c: {"dice": [dice], "jaccard": [dice / 2], "asd": [1.0], "hd95": [5.0]} for c in IDS[64:80]}
            for n in names}


TIMING = {"pipeline_wall_s": 600.0, "pipeline_cpu_s": 1100.0, "peak_rss_mb": 1500.0, "threads": 2}


def test_key_covers_every_field_and_train_key_ignores_evaluation_fields():
    base = _spec()
    changed = [_spec(seed=1), _spec(overrides=["retrain.iterations=5"]), _spec(split="test", split_ids=IDS[48:64]),
               _spec(code={"commit": "abc", "dirty": True, "diff_sha256": "f"}), _spec(threads=1),
               _spec(resolved={"retrain": {"seed": 0, "iterations": 600}}), _spec(L=16), _spec(method="acmt"),
               _spec(platform={"torch": "2.14.1", "cuda": "H200", "cpu_bf16_native": True})]
    keys = {rr.key_of(s) for s in [base, *changed]}
    assert len(keys) == len(changed) + 1
    assert rr.train_key(base) == rr.train_key(_spec(split="test", split_ids=IDS[48:64], threads=1))
    assert rr.train_key(base) != rr.train_key(_spec(seed=1))


def test_cached_record_is_reused_only_when_identical(tmp_path):
    spec = _spec()
    assert rr.load_cached(tmp_path, spec) is None
    path = rr.write_record(tmp_path, spec, _models(), TIMING)
    rec = rr.load_cached(tmp_path, spec)
    assert rec["models"]["MT"][IDS[64]]["dice"] == [0.8] and rec["timing"]["pipeline_wall_s"] == 600.0
    assert rr.load_cached(tmp_path, _spec(seed=1)) is None          # another key: simply not cached
    # a file at this key whose stored fields differ (edited by hand) is refused, with the fields named
    data = json.loads(path.read_text())
    data["spec"]["overrides"] = ["retrain.iterations=5"]
    path.write_text(json.dumps(data))
    with pytest.raises(rr.StaleRecord, match="overrides"):
        rr.load_cached(tmp_path, spec)
    with pytest.raises(rr.StaleRecord, match="key does not match"):
        rr.load_records(tmp_path)


def test_record_must_cover_exactly_the_split(tmp_path):
    models = _models()
    del models["MT"][IDS[70]]
    with pytest.raises(ValueError, match="differ from split"):
        rr.write_record(tmp_path, _spec(), models, TIMING)


def test_code_version_tracks_uncommitted_changes(tmp_path):
    import subprocess

    def git(*a):
        subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a")
    clean = rr.code_version(tmp_path)
    assert clean["dirty"] is False and len(clean["commit"]) == 40
    (tmp_path / "a.py").write_text("x = 2\n")
    d1 = rr.code_version(tmp_path)
    (tmp_path / "a.py").write_text("x = 3\n")
    d2 = rr.code_version(tmp_path)
    (tmp_path / "new.py").write_text("y = 1\n")
    d3 = rr.code_version(tmp_path)
    assert d1["dirty"] and d2["dirty"] and d3["dirty"]
    assert len({d1["diff_sha256"], d2["diff_sha256"], d3["diff_sha256"]}) == 3


def test_code_tag_groups_commits_that_differ_only_outside_the_core(tmp_path):
    import subprocess

    def git(*a):
        return subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True).stdout.decode().strip()

    def commit(path, text):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
        git("add", path)
        git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", path)
        return {"commit": git("rev-parse", "HEAD"), "dirty": False, "diff_sha256": None}

    git("init", "-q")
    c1 = commit("src/cfrseg/a.py", "x = 1\n")
    c2 = commit("bench/b.py", "y = 1\n")             # benchmark-only change: same core tree
    c3 = commit("src/cfrseg/a.py", "x = 2\n")        # core change: another group
    t1, t2, t3 = (rr.code_tag(c, tmp_path) for c in (c1, c2, c3))
    assert t1 == t2 != t3 and t1.startswith("core ")
    dirty = dict(c3, dirty=True, diff_sha256="ab" * 32)
    assert rr.code_tag(dirty, tmp_path) == c3["commit"][:10] + "+dirty:abababab"
    assert rr.code_tag({"commit": "0" * 40, "dirty": False}, tmp_path) == "0" * 10     # unknown commit


# ------------------------------------------------------------------------------------------------- summary
def _rec(model, seed, dice_by_case, L=4, split="val"):
    ids = IDS[64:80] if split == "val" else IDS[48:64]
    spec = _spec(seed=seed, L=L, split=split, split_ids=ids, method=model.lower())
    cases = {c: {"dice": [d], "jaccard": [d / 2], "asd": [float("nan") if d == 0 else 1.0], "hd95": [4.0]}
             for c, d in zip(ids, dice_by_case)}
    return {"spec": spec, "models": {model: cases}, "timing": dict(TIMING, pipeline_wall_s=60.0 * (seed + 1))}


def test_mean_std_over_seeds_and_nan_handling():
    rng = np.random.default_rng(0)
    dice = {s: rng.uniform(0.5, 0.9, 16) for s in (0, 1, 2)}
    dice[2][3] = 0.0   # an empty prediction: ASD NaN, left out of the ASD mean, Dice 0 kept
    recs = [_rec("MT", s, dice[s]) for s in (0, 1, 2)]
    (row,) = qs.aggregate(recs)
    per_seed = [dice[s].mean() for s in (0, 1, 2)]
    assert row["n_seeds"] == 3 and row["seeds"] == [0, 1, 2]
    assert row["dice"][0] == pytest.approx(np.mean(per_seed))
    assert row["dice"][1] == pytest.approx(np.std(per_seed, ddof=1))
    assert row["asd"][0] == pytest.approx(1.0)
    assert row["wall_min"] == pytest.approx(2.0)        # (1 + 2 + 3) / 3 minutes
    one = qs.aggregate(recs[:1])[0]
    assert math.isnan(one["dice"][1])                    # one seed: no std
    assert "± " not in qs._pm(one["dice"])


def test_paired_comparison_matches_a_direct_computation():
    from scipy.stats import wilcoxon

    rng = np.random.default_rng(1)
    base = {s: rng.uniform(0.6, 0.85, 16) for s in (0, 1, 2)}
    gain = rng.normal(0.03, 0.02, 16)
    recs = [_rec("MT", s, base[s]) for s in (0, 1, 2)]
    recs += [_rec("CFR_MT", s, base[s] + gain) for s in (0, 1)]          # seed 2 missing for CFR_MT
    (c,) = qs.paired(recs, "CFR_MT", "MT")
    assert c["seeds"] == [0, 1] and c["n_cases"] == 16
    diff = np.mean([base[s] + gain for s in (0, 1)], 0) - np.mean([base[s] for s in (0, 1)], 0)
    assert c["mean_diff"] == pytest.approx(diff.mean())
    assert c["wins"] == int((diff > 0).sum()) and c["losses"] == int((diff < 0).sum())
    assert c["wilcoxon_p"] == pytest.approx(wilcoxon(diff).pvalue)
    assert c["per_seed_diff"] == pytest.approx([gain.mean(), gain.mean()])
    same = [_rec("MT", 0, base[0]), _rec("CFR_MT", 0, base[0])]
    assert qs.paired(same)[0]["wilcoxon_p"] == 1.0 and qs.paired(same)[0]["ties"] == 16


def test_markdown_groups_by_setting_and_split():
    recs = [_rec("MT", 0, [0.7] * 16), _rec("CFR_MT", 0, [0.75] * 16), _rec("MT", 0, [0.123] * 16, split="test")]
    other = _rec("MT", 1, [0.2] * 16)
    other["spec"]["overrides"] = ["retrain.iterations=600"]
    md = qs.to_markdown(recs + [other], "val")
    assert md.count("| 4 | MT | 1 | 0.7000 |") == 1 and "| 4 | MT | 1 | 0.2000 |" in md
    assert "0.1230" not in md                              # test records never leak into a val table
    assert "| 4 | 1 | 16 | +0.0500 | 16 / 0 / 0 |" in md
    assert md.count("Split `val`") == 2 and "overrides `retrain.iterations=600`" in md
    gpu = _rec("MT", 0, [0.3] * 16)
    gpu["spec"]["platform"] = {"torch": "2.11.0", "cuda": "H200", "cpu_bf16_native": True}
    md = qs.to_markdown(recs + [gpu], "val")
    assert md.count("Split `val`") == 2 and "GPU H200" in md and "| 4 | MT | 1 | 0.3000 |" in md


def test_summary_png_draws_the_largest_setting_of_the_split(tmp_path):
    rng = np.random.default_rng(2)
    recs = [_rec(m, s, rng.uniform(0.5, 0.9, 16), L=L) for m in ("MT", "CFR_MT") for s in (0, 1) for L in (1, 4)]
    (c4,) = [c for c in qs.paired(recs) if c["L"] == "4"]
    assert len(c4["diff"]) == 16 and np.mean(c4["diff"]) == pytest.approx(c4["mean_diff"])
    assert qs.summary_png(recs, "test", tmp_path / "none.png") is None            # no test records
    out = qs.summary_png(recs, "val", tmp_path / "la.png")
    assert out == tmp_path / "la.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert qs.main(["--results", str(tmp_path / "empty"), "--split", "val", "--png", str(tmp_path / "x.png")]) == 0
    assert not (tmp_path / "x.png").exists()


# -------------------------------------------------------------------------------------------------- driver
@pytest.mark.la
def test_driver_runs_once_then_reuses_and_refuses_stale(la_dir, tmp_path, monkeypatch, capsys):
    import quality_la

    calls = []
    real_run = quality_la.subprocess.run

    def fake_run(cmd, check=False, **kw):     # the child process, without training: one record per split
        if cmd[0] == "git":                   # the summary's code tags still ask git
            return real_run(cmd, check=check, **kw)
        job = json.loads(Path(cmd[-1]).read_text())
        calls.append([s["split"] for s in job["specs"]])
        for s in job["specs"]:
            rr.write_record(Path(job["results"]), s, {"supervised": {c: {"dice": [0.5], "jaccard": [0.3],
                            "asd": [2.0], "hd95": [9.0]} for c in s["split_ids"]}}, TIMING)

        class R:
            returncode = 0
        return R()

    monkeypatch.setattr(quality_la.subprocess, "run", fake_run)
    monkeypatch.setattr(quality_la, "code_version", lambda: {"commit": "c0", "dirty": False, "diff_sha256": None})
    argv = ["--data", str(la_dir), "--results", str(tmp_path), "--labeled", "4", "all", "--methods", "supervised",
            "mt", "--seeds", "0", "1", "--split", "val"]
    assert quality_la.main(argv) == 0
    # L=4: supervised + mt, 2 seeds; the ceiling (L=48): supervised only, 2 seeds
    assert calls == [["val"]] * 6
    out = capsys.readouterr().out
    assert "| all (48) | supervised | 2 | 0.5000 ± 0.0000 |" in out and "skipped" in out
    assert quality_la.main(argv) == 0 and len(calls) == 6          # everything cached
    assert quality_la.main(argv[:-1] + ["val", "test"]) == 0
    assert calls[6:] == [["test"]] * 6                               # only the missing split runs
    recs = rr.load_records(tmp_path / "records")
    assert len(recs) == 12 and all(r["spec"]["code"]["commit"] == "c0" for r in recs)
    # a changed override is another run, not the cached one
    assert quality_la.main(argv + ["--set", "retrain.iterations=10"]) == 0 and len(calls) == 18
    # a tampered record at a requested key is refused, and nothing runs
    for p in (tmp_path / "records").glob("supervised_L4_seed0_val_*.json"):
        d = json.loads(p.read_text())
        d["spec"]["threads"] = 7
        p.write_text(json.dumps(d))
    assert quality_la.main(argv) == 2 and len(calls) == 18
    assert "refusing to reuse" in capsys.readouterr().err
    assert quality_la.main(["--results", str(tmp_path), "--summary-only"]) == 2


def _synthetic_la(root: Path, n: int = 80, shape=(40, 40, 20)) -> list[str]:
    """An LA-layout folder (train.list + <id>/mri_norm2.h5) of ``n`` small volumes, each a bright ellipsoid
    (the label) in noise."""
    import h5py

    rng = np.random.default_rng(5)
    ids = [f"S{i:02d}X" for i in range(n)]
    g = np.stack(np.meshgrid(*[np.arange(k, dtype=np.float32) for k in shape], indexing="ij"))
    for i, cid in enumerate(ids):
        c = np.array(shape, np.float32) / 2 + rng.uniform(-3, 3, 3)
        r = np.array([9, 8, 5], np.float32) + rng.uniform(-1, 1, 3)
        lbl = (((g - c[:, None, None, None]) / r[:, None, None, None]) ** 2).sum(0) <= 1
        img = rng.normal(0, 0.3, shape).astype(np.float32) + lbl
        (root / cid).mkdir(parents=True)
        with h5py.File(root / cid / "mri_norm2.h5", "w") as f:
            f["image"], f["label"] = img, lbl.astype(np.uint8)
    (root / "train.list").write_text("\n".join(ids) + "\n")
    return ids


@pytest.mark.parametrize("method", ["supervised", "cfr_mt"])
def test_a_trained_run_is_evaluated_on_the_other_split_without_training_again(tmp_path, method):
    """Real stages (tiny profile, synthetic LA layout): a job for val and test trains once with val as its
    evaluation set, then scores the same models on test (before, the stages' provenance check refused the
    second manifest, and only the first split got a record)."""
    import argparse

    import quality_la as qla

    ids = _synthetic_la(tmp_path / "la")
    args = argparse.Namespace(profile="tiny", set=[], threads=1)
    code = rr.code_version()
    specs = [qla.make_spec(args, "4", method, 0, split, code, ids, "0" * 64) for split in ("val", "test")]
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"specs": specs, "data": str(tmp_path / "la"), "work": str(tmp_path / "runs"),
                               "results": str(tmp_path / "records"), "teacher": None}))
    qla.run_one(str(job))
    recs = {r["spec"]["split"]: r for r in rr.load_records(tmp_path / "records")}
    assert sorted(recs) == ["test", "val"]
    names = qla.model_names(method)
    for split, r in recs.items():
        assert sorted(r["models"]) == sorted(names[:2] if method.startswith("cfr_") else names[:1])
        assert all(sorted(cases) == sorted(r["spec"]["split_ids"]) for cases in r["models"].values())
        assert r["timing"]["trained_with_split"] == "val"
    assert recs["test"]["extra"] == {"evaluated_only": True} and "evaluated_only" not in recs["val"]["extra"]
    assert set(recs["test"]["spec"]["split_ids"]) == set(ids[48:64])


# ------------------------------------------------------------------------------------------ teacher reuse
def test_teacher_key_ignores_only_the_retrain_side():
    base = _spec(method="cfr_mt", resolved={"retrain": {"seed": 0}, "finetune": {"seed": 0, "iterations": 400}})
    same = [_spec(method="cfr_magicnet", resolved=base["resolved"]),
            dict(base, overrides=["retrain.pl_weight=1.0"], resolved=dict(base["resolved"], retrain={"seed": 0,
                                                                                                   "pl_weight": 1})),
            dict(base, code={"commit": "def", "dirty": False, "diff_sha256": None})]
    other = [dict(base, resolved=dict(base["resolved"], finetune={"seed": 0, "iterations": 200})),
             dict(base, seed=1), dict(base, labeled_ids=IDS[:3]), dict(base, threads=1)]
    assert all(rr.teacher_key(s) == rr.teacher_key(base) for s in same)
    assert all(rr.teacher_key(s) != rr.teacher_key(base) for s in other)


def test_reused_teacher_is_copied_and_its_seconds_are_counted(tmp_path, monkeypatch):
    import quality_la as qla

    code = {"commit": "c0", "dirty": False, "diff_sha256": None}
    res = {"retrain": {"seed": 0}, "finetune": {"seed": 0}}
    src = _spec(method="cfr_mt", code=code, resolved=res)
    run = tmp_path / "runs" / qla.store_name(src)
    from cfrseg.provenance import code_version as core_code

    for st in qla.TEACHER_STAGES:
        (run / st).mkdir(parents=True)
        (run / st / "out.bin").write_bytes(st.encode())
        (run / st / "provenance.json").write_text(json.dumps({"code": core_code()}))
    (run / "report.json").write_text(json.dumps({"timings_s": {"finetune": 100.0, "pseudolabel": 50.0},
                                                 "peak_rss_mb": {"finetune": 2000.0, "pseudolabel": 3000.0}}))
    rr.write_record(tmp_path / "records", src, _models(("CFR_FT", "CFR_MT")), TIMING)
    new = dict(src, method="cfr_magicnet", overrides=["retrain.pl_weight=1.0"],
               resolved={"retrain": {"seed": 0, "pl_weight": 1.0}, "finetune": {"seed": 0}})
    assert qla.find_teacher(tmp_path, dict(new, method="magicnet")) is None         # not a CFR run
    assert qla.find_teacher(tmp_path, dict(new, resolved={"retrain": {}, "finetune": {"seed": 5}})) is None
    # stages made by other cfrseg sources are passed over (the stage's provenance check would refuse them)
    foreign = json.dumps({"code": {"version": "0", "sha256": "x"}})
    (run / "pseudolabel" / "provenance.json").write_text(foreign)
    assert qla.find_teacher(tmp_path, new)["stages"] == ["finetune"]    # the fine-tune alone is still good
    (run / "finetune" / "provenance.json").write_text(foreign)
    assert qla.find_teacher(tmp_path, new) is None
    for st in qla.TEACHER_STAGES:
        (run / st / "provenance.json").write_text(json.dumps({"code": core_code()}))
    seen = {}

    def evaluate(spec, data, store):     # the child's training, faked: sees the copied teacher stages
        seen["dir"] = sorted(p.name for p in (tmp_path / "runs" / qla.store_name(spec)).iterdir())
        (tmp_path / "runs" / qla.store_name(spec) / "finetune" / "out.bin").write_bytes(b"changed")
        one = {"dice": [0.8], "jaccard": [0.4], "asd": [1.0], "hd95": [5.0]}
        return {n: {c: one for c in spec["split_ids"]} for n in ("CFR_FT", "CFR_MAGICNET")}, {}

    def fake_run(cmd, check=False):
        qla.run_one(cmd[-1], evaluate=evaluate)

        class R:
            returncode = 0
        return R()

    monkeypatch.setattr(qla.subprocess, "run", fake_run)
    monkeypatch.setattr(qla, "code_version", lambda: code)
    assert qla.run_job(qla.__file__, tmp_path, [new], "data", "cfr_magicnet_L4_seed0", reuse_teacher=True) == 0
    assert seen["dir"] == ["finetune", "pseudolabel"]
    assert (run / "finetune" / "out.bin").read_bytes() == b"finetune"     # a copy: the source is untouched
    rec = rr.load_cached(tmp_path / "records", new)
    t = rec["timing"]
    assert t["teacher"]["from"] == run.name and t["teacher"]["stage_s"] == 150.0
    assert t["pipeline_wall_s"] == pytest.approx(t["own_wall_s"] + 150.0, abs=0.11)
    assert t["peak_rss_mb"] >= 3000.0
    # the same training scored later on another split (no --reuse-teacher then) still counts the teacher
    later = dict(new, split="test", split_ids=IDS[48:64])
    assert qla.run_job(qla.__file__, tmp_path, [later], "data", "cfr_magicnet_L4_seed0") == 0
    tl = rr.load_cached(tmp_path / "records", later)["timing"]
    assert tl["teacher"]["stage_s"] == 150.0 and tl["pipeline_wall_s"] == t["pipeline_wall_s"]
    assert tl["peak_rss_mb"] == t["peak_rss_mb"]
    # runs trained before bench_timing.json kept the teacher: it is found in the other split's record
    tfile = tmp_path / "runs" / qla.store_name(new) / qla.TIMING
    tfile.write_text(json.dumps({k: v for k, v in json.loads(tfile.read_text()).items() if k != "teacher"}))
    rr.record_path(tmp_path / "records", later).unlink()
    assert qla.run_job(qla.__file__, tmp_path, [later], "data", "cfr_magicnet_L4_seed0") == 0
    assert rr.load_cached(tmp_path / "records", later)["timing"]["pipeline_wall_s"] == t["pipeline_wall_s"]
    # a run that reused a teacher passes the origin's figures on, and copies from itself
    third = dict(new, overrides=["retrain.pl_weight=0.5"], resolved={"retrain": {"seed": 0, "pl_weight": 0.5},
                                                                        "finetune": {"seed": 0}})
    t3 = qla.find_teacher(tmp_path, third)
    assert t3["stage_s"] == 150.0 and t3["origin"] == run.name

    # other pseudo-label settings (TTA): only the fine-tuned SAM is reused, with the fine-tune's own figures
    tta = dict(new, resolved=dict(new["resolved"], pseudolabel={"tta": True}))
    t4 = qla.find_teacher(tmp_path, tta)
    assert t4["stages"] == ["finetune"] and t4["stage_s"] == 100.0 and t4["peak_rss_mb"] == 2000.0
    assert qla.run_job(qla.__file__, tmp_path, [tta], "data", "cfr_magicnet_L4_seed0", reuse_teacher=True) == 0
    assert seen["dir"] == ["finetune"]                       # the child pseudo-labels itself
    assert rr.load_cached(tmp_path / "records", tta)["timing"]["teacher"]["stages"] == ["finetune"]
    # a run whose pseudo-labels were made in its own run never lends them with the origin's seconds
    t5 = qla.find_teacher(tmp_path, dict(tta, overrides=["retrain.pl_weight=0.5"]))
    assert t5["stages"] == ["finetune"] and t5["stage_s"] == 100.0
    assert qla.find_teacher(tmp_path, dict(tta, resolved=dict(tta["resolved"], finetune={"seed": 1}))) is None


def test_a_run_trained_by_an_earlier_bench_commit_is_scored_not_trained_again(tmp_path, monkeypatch):
    """--score-trained: a spec whose only difference from a finished run is the bench's commit (same core) is
    scored on that run's model; the record keeps the training code and names the scoring code."""
    import argparse

    import quality_la as qla

    ids = _synthetic_la(tmp_path / "la")
    args = argparse.Namespace(profile="tiny", set=[], threads=1)
    old, new = ({"commit": c * 40, "dirty": False, "diff_sha256": None} for c in "ab")
    monkeypatch.setattr(qla, "code_tag", lambda c: "core 0123" if not c.get("dirty") else "dirty")
    res = tmp_path / "res"

    def run(spec, code):
        monkeypatch.setattr(qla, "code_version", lambda: code)
        job = tmp_path / "job.json"
        job.write_text(json.dumps({"specs": [spec], "data": str(tmp_path / "la"), "work": str(res / "runs"),
                                   "results": str(res / "records"), "teacher": None}))
        qla.run_one(str(job))

    def spec(split, code, **kw):
        return qla.make_spec(argparse.Namespace(**dict(vars(args), **kw)), "4", "supervised", 0, split, code, ids,
                             "0" * 64)

    trained_val = spec("val", old)
    assert qla.adopt_trained(res, trained_val) == trained_val                  # nothing trained yet
    run(trained_val, old)
    model = res / "runs" / qla.store_name(trained_val) / "retrain" / "model.pt"
    stamp = model.stat().st_mtime_ns
    test = qla.adopt_trained(res, spec("test", new))
    assert test["code"] == old and test["evaluated_with"] == new and rr.train_key(test) == rr.train_key(trained_val)
    assert rr.load_cached(res / "records", qla.adopt_trained(res, spec("val", new))) is not None   # val: cached
    run(test, new)
    rec = rr.load_cached(res / "records", test)
    assert rec["extra"] == {"evaluated_only": True} and set(rec["models"]["supervised"]) == set(ids[48:64])
    assert model.stat().st_mtime_ns == stamp                                   # not trained again
    # other settings, a dirty tree, or an unfinished run: nothing is adopted
    other = spec("test", new, set=["retrain.iterations=3"])
    assert qla.adopt_trained(res, other) == other
    dirty = spec("test", dict(new, dirty=True, diff_sha256="x"))
    assert qla.adopt_trained(res, dirty) == dirty
    model.unlink()
    assert qla.adopt_trained(res, spec("test", new))["code"] == new
    with pytest.raises(SystemExit, match="never trained"):
        run(test, new)
