"""Re-training stage on 2-3 real LA cases with the tiny network (seconds each)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from cfrseg.errors import Cancelled, ConfigError, InputError
from cfrseg.progress import ProgressEvent
from cfrseg.stages.retrain import RetrainConfig, evaluate_model, learning_rate, load_checkpoint, run_retrain
from cfrseg.store import LocalStore

pytestmark = pytest.mark.usefixtures("one_thread")



def _cfg(**kw) -> RetrainConfig:
    base: dict = {"network": "tiny", "network_kwargs": {"has_dropout": True}, "iterations": 30,
                  "patch": (32, 32, 16), "zoom": (0.5, 0.5, 0.5), "uamt_T": 2, "lr_schedule": "constant",
                  "lr": 0.02, "seed": 7, "device": "cpu",
                  "infer": {"patch": (32, 32, 16), "stride": (16, 16, 8), "batch_size": 8}}
    base.update(kw)
    return RetrainConfig(**base)


@pytest.fixture(scope="module")
def la2(la_dir):
    from cfrseg.data.datasets import manifest_from_la

    return manifest_from_la(la_dir, 1, limit=2)          # 1 labeled + 1 unlabeled


@pytest.fixture(scope="module")
def la2_pl(la2):
    # the unlabeled case's own (LA h5) label stands in for a SAM pseudo-label
    return la2.with_pseudo_labels({c.case_id: c.image for c in la2.unlabeled})


def _first_last(history, key, n=8):
    v = [h[key] for h in history]
    return float(np.mean(v[:n])), float(np.mean(v[-n:]))


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("bad, match", [
    ({"ssl": "fixmatch"}, "ssl must be one of"),
    ({"ssl": "magicnet", "network": "vnet_magic"}, "must be a V-Net"),
    ({"ssl": "magicnet", "magic_grid": (2, 2, 2)}, "multiples of 16"),          # 16 / 2 = 8
    ({"ssl": "magicnet", "magic_grid": (1, 1, 1)}, "at least 2 cubes"),
    ({"ssl": "magicnet", "magic_transposed_recovery": True}, "equal x and z"),  # auto grid (2, 2, 1)
    ({"ssl": "magicnet", "magic_blend_window": 0}, "magic_blend_window"),
    ({"iterations": 0}, "iterations must be an integer >= 1"),
    ({"patch": (30, 32, 16)}, "multiples of 16"),
    ({"zoom": (0.5, 0.5)}, "zoom"),
    ({"lr": -1.0}, "lr must be a positive"),
    ({"ema_decay": 1.0}, "ema_decay"),
    ({"lr_schedule": "cosine"}, "lr_schedule"),
    ({"acmt_threshold": (0.95, 0.75)}, "acmt_threshold"),
    ({"pl_ramp": "linear"}, "pl_ramp"),
    ({"evaluate": "best"}, "evaluate"),
    ({"batch_unlabeled": 0}, "batch_unlabeled must be >= 1"),
    ({"precision": "fp16"}, "precision must be one of"),
    ({"foreground_prob": 1.5}, "foreground_prob"),
    ({"precision": "bf16", "patch": (32, 32, 16)}, "needs patch x and y >= 48"),
])
def test_bad_config_values(bad, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(**bad)


def test_config_json_roundtrip_and_unknown_key():
    c = _cfg(zoom=0.5)       # the legacy alias: zoom 0.5 = a working grid twice as coarse as the plan's
    assert c.zoom is None and c.spacing_factor == (2.0, 2.0, 2.0)
    assert RetrainConfig.from_dict(json.loads(c.to_json())) == c
    with pytest.raises(ConfigError, match="unknown option"):
        RetrainConfig.from_dict({"iteration": 5})


def test_lr_schedules():
    c = RetrainConfig(iterations=6000)
    assert [learning_rate(c, s) for s in (0, 2499, 2500, 4999, 5000)] == pytest.approx(
        [0.01, 0.01, 0.001, 0.001, 0.0001])
    p = c.replace(lr_schedule="poly")
    assert learning_rate(p, 0) == 0.01 and learning_rate(p, 3000) == pytest.approx(0.01 * 0.5 ** 0.9)


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.la
@pytest.mark.parametrize("ssl", ["none", "mt", "st", "uamt", "acmt"])
def test_each_method_learns(ssl, la2, tmp_path):
    events: list[ProgressEvent] = []
    res = run_retrain(_cfg(ssl=ssl, iterations=30), la2, LocalStore(tmp_path), progress=events.append)
    hist = json.loads((tmp_path / "history.json").read_text())
    assert [e.message for e in events[:2]] == [f"fingerprint {c.case_id}" for c in la2.cases]   # planning
    events = [e for e in events if e.losses]
    assert res.iterations == 30 and len(hist) == 30 and len(events) == 30
    assert events[-1].stage == "retrain" and events[-1].step == 30 and "loss" in events[-1].losses
    first, last = _first_last(hist, "sup")
    assert last < first, (ssl, first, last)
    if ssl != "none":
        assert "cons" in hist[-1] and hist[-1]["w_cons"] > hist[0]["w_cons"]
    for key in ("model.pt", "checkpoint.pt", "config.json", "history.json", "loss.png"):
        assert (tmp_path / key).is_file(), key
    art = torch.load(tmp_path / "model.pt", weights_only=True)
    assert art["student"] is not None and art["teacher"] is not None and art["evaluate"] == "teacher"
    assert art["preprocess"]["normalize"] == "plan" and art["preprocess"]["spacing_factor"] == (2.0, 2.0, 2.0)
    assert art["preprocess"]["plan"]["target_spacing"] == [0.625] * 3
    assert art["class_names"] == ["background", "left_atrium"] and art["provenance"]["training_images"]


def _same_weights(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


class _CancelAfter:
    def __init__(self, n: int) -> None:
        self.n, self.polls = n, 0

    def is_set(self) -> bool:
        self.polls += 1
        return self.polls > self.n


@pytest.mark.la
def test_resume_is_bit_exact_and_cancel_checkpoints(la2_pl, tmp_path):
    cfg = _cfg(ssl="uamt", iterations=12, pl_ramp="sigmoid", lr_schedule="step", num_workers=2)
    straight = LocalStore(tmp_path / "a")
    run_retrain(cfg, la2_pl, straight)
    crashed = LocalStore(tmp_path / "b")
    with pytest.raises(Cancelled):
        # the planning (fingerprint) polls the flag once per case before training starts
        run_retrain(cfg, la2_pl, crashed, cancel=_CancelAfter(5 + len(la2_pl.cases)))
    ck = load_checkpoint(crashed)
    assert ck["iteration"] == 5 and not crashed.exists("model.pt")
    torch.manual_seed(12345)  # the caller's RNG must not matter: the checkpoint restores it
    res = run_retrain(cfg.replace(resume=True), la2_pl, crashed)
    assert res.iterations == 12
    a, b = load_checkpoint(straight), load_checkpoint(crashed)
    assert _same_weights(a["student"], b["student"]) and _same_weights(a["teacher"], b["teacher"])
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]


@pytest.mark.la
def test_bf16_training_learns_resumes_exactly_and_differs_from_fp32(la2_pl, tmp_path):
    """bf16 autocast: fp32 master weights, finite losses, exact resume; not silently the fp32 run."""
    cfg = _cfg(ssl="mt", iterations=8, precision="bf16", patch=(48, 48, 16),
               infer={"patch": (48, 48, 16), "stride": (24, 24, 8), "batch_size": 8})
    straight = LocalStore(tmp_path / "a")
    run_retrain(cfg, la2_pl, straight)
    crashed = LocalStore(tmp_path / "b")
    with pytest.raises(Cancelled):
        run_retrain(cfg, la2_pl, crashed, cancel=_CancelAfter(3))
    run_retrain(cfg.replace(resume=True), la2_pl, crashed)
    a, b = load_checkpoint(straight), load_checkpoint(crashed)
    assert all(v.dtype == torch.float32 for k, v in a["student"].items() if v.is_floating_point())
    assert _same_weights(a["student"], b["student"]) and _same_weights(a["teacher"], b["teacher"])
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert all(np.isfinite(h["loss"]) for h in a["history"])
    fp32 = LocalStore(tmp_path / "c")
    run_retrain(cfg.replace(precision="fp32"), la2_pl, fp32)
    c = load_checkpoint(fp32)
    assert not _same_weights(a["student"], c["student"])
    # the two runs stay close: same data, same seed, only rounding differs
    assert abs(a["history"][0]["loss"] - c["history"][0]["loss"]) < 0.05
    with pytest.raises(ConfigError, match="precision"):
        run_retrain(cfg.replace(resume=True, precision="fp32"), la2_pl, crashed)


def test_auto_precision_is_bf16_only_where_native_and_the_patch_allows(monkeypatch):
    from cfrseg.stages import precision

    cfg = _cfg(precision="auto", patch=(64, 64, 48))
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: True)
    assert cfg.resolved_precision("cpu").precision == "bf16"
    assert cfg.replace(patch=(32, 32, 16)).resolved_precision("cpu").precision == "fp32"   # oneDNN guard
    assert cfg.replace(precision="fp32").resolved_precision("cpu").precision == "fp32"      # explicit wins
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: False)
    assert cfg.resolved_precision("cpu").precision == "fp32"


@pytest.mark.la
def test_auto_precision_is_resolved_once_and_recorded(la2_pl, tmp_path, monkeypatch):
    """'auto' becomes what ran (in the checkpoint and model config); a run made in bf16 does not resume where
    'auto' would now mean fp32."""
    from cfrseg.stages import precision

    cfg = _cfg(ssl="mt", iterations=4, precision="auto", patch=(48, 48, 16),
               infer={"patch": (48, 48, 16), "stride": (24, 24, 8), "batch_size": 8})
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: True)
    store = LocalStore(tmp_path / "a")
    with pytest.raises(Cancelled):
        run_retrain(cfg, la2_pl, store, cancel=_CancelAfter(2))
    assert load_checkpoint(store)["config"]["precision"] == "bf16"
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: False)
    with pytest.raises(ConfigError, match="precision"):
        run_retrain(cfg.replace(resume=True), la2_pl, store)
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: True)
    run_retrain(cfg.replace(resume=True), la2_pl, store)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["precision"] == "bf16"


@pytest.mark.la
def test_resume_refuses_other_settings_and_finished_is_idempotent(la2, tmp_path):
    store = LocalStore(tmp_path)
    cfg = _cfg(ssl="none", iterations=4)
    run_retrain(cfg, la2, store)
    mtime = (tmp_path / "checkpoint.pt").stat().st_mtime_ns
    events: list[ProgressEvent] = []
    res = run_retrain(cfg.replace(resume=True), la2, store, progress=events.append)
    assert res.iterations == 4 and (tmp_path / "checkpoint.pt").stat().st_mtime_ns == mtime
    assert events[-1].message == "already finished"
    store.delete("model.pt")
    with pytest.raises(ConfigError, match="settings: lr 0.02->0.5"):
        run_retrain(cfg.replace(resume=True, lr=0.5), la2, store)


@pytest.mark.la
def test_pseudo_label_term(la2_pl, tmp_path):
    cfg = _cfg(ssl="none", iterations=10, pl_weight=0.5, pl_ramp="sigmoid", pl_rampup=0.5)
    run_retrain(cfg, la2_pl, LocalStore(tmp_path))
    hist = json.loads((tmp_path / "history.json").read_text())
    from cfrseg.ssl import sigmoid_rampup

    assert all("pl" in h for h in hist)
    assert [h["w_pl"] for h in hist] == pytest.approx([0.5 * sigmoid_rampup(s, 5) for s in range(10)])
    assert hist[0]["loss"] == pytest.approx(hist[0]["sup"] + hist[0]["w_pl"] * hist[0]["pl"], rel=1e-5)


def test_pseudo_labels_steer_unlabeled_crops_only_when_asked():
    """pl_foreground_prob places unlabeled crops on pseudo-label foreground; labeled crops keep following
    foreground_prob and the ground truth; without pseudo-labels the option changes no batch."""
    from cfrseg.stages.retrain import BatchMaker, TrainData

    img = np.random.default_rng(0).normal(size=(96, 96, 16)).astype(np.float32)
    small = np.zeros(img.shape, np.uint8)
    small[80:84, 4:8, 6:9] = 1                              # a small structure in a corner
    td = TrainData([(img, small)], [(img, small.copy()), (img, None)], ["l0"], ["u0", "u1"])

    def batches(n: int = 60, data: TrainData = td, **kw) -> list[dict[str, torch.Tensor]]:
        bm = BatchMaker(_cfg(ssl="mt", patch=(16, 16, 16), batch_labeled=1, batch_unlabeled=2, **kw), data, True,
                        torch.device("cpu"))
        return [bm.next() for _ in range(n)]

    def share(bs, key: str) -> float:
        return float(np.mean([bool(b[key][i].any()) for b in bs for i in range(len(b[key]))
                              if key == "label_l" or bool(b["pl_mask"][i])]))

    base, steered = batches(), batches(pl_foreground_prob=1.0)
    assert share(base, "pl_u") < 0.2 and share(steered, "pl_u") == 1.0     # only the pseudo-labelled case
    assert share(steered, "label_l") < 0.2                                 # labeled crops still uniform
    assert share(batches(foreground_prob=1.0), "pl_u") < 0.2               # ground truth steers labeled only
    # without pseudo-labels (MT) the option draws nothing: the batches are those of a run without it
    no_pl = TrainData(td.labeled, [(img, None), (img, None)], ["l0"], ["u0", "u1"])
    plain, asked = batches(data=no_pl), batches(data=no_pl, pl_foreground_prob=1.0)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(plain, asked) for k in a)
    with pytest.raises(ConfigError, match="pl_foreground_prob"):
        _cfg(pl_foreground_prob=2.0)


@pytest.mark.la
def test_no_pseudo_label_term_without_pseudo_labels(la2, tmp_path):
    run_retrain(_cfg(ssl="mt", iterations=2), la2, LocalStore(tmp_path))
    hist = json.loads((tmp_path / "history.json").read_text())
    assert "pl" not in hist[-1]


@pytest.mark.la
def test_single_labeled_case_with_batch_two(la2, tmp_path):
    res = run_retrain(_cfg(ssl="mt", iterations=3, batch_labeled=2, batch_unlabeled=1), la2, LocalStore(tmp_path))
    assert res.iterations == 3


@pytest.mark.la
def test_missing_unlabeled_cases_is_a_clear_error(la2, tmp_path):
    only_lab = dataclasses.replace(la2, cases=tuple(la2.labeled))
    with pytest.raises(InputError, match="needs unlabeled cases"):
        run_retrain(_cfg(ssl="mt", iterations=2), only_lab, LocalStore(tmp_path))


@pytest.mark.la
def test_evaluate_model(la_dir, tmp_path):
    from cfrseg.data.datasets import manifest_from_la

    m = manifest_from_la(la_dir, 1, limit=2, holdout=1)   # 1 labeled, 1 test
    store = LocalStore(tmp_path / "run")
    run_retrain(_cfg(ssl="none", iterations=3), m, store)
    out = evaluate_model(tmp_path / "run", m, predictions=tmp_path / "pred")
    (cid,) = out["cases"]
    assert set(out["cases"][cid]) >= {"dice", "jaccard", "asd", "hd95"}
    assert out["summary"]["n_cases"] == 1 and out["evaluate"] == "teacher"
    assert (tmp_path / "pred" / f"{cid}.nii.gz").is_file()
    out2 = evaluate_model(store, m.test, m)                  # from a Store, with a case list
    assert out2["cases"][cid]["dice"] == out["cases"][cid]["dice"]
    assert out["class_names"] == ["background", "left_atrium"] and "left_atrium" in out["table"]
    # the model knows what it was trained on: scoring its training case is refused, whatever the manifest says
    leak = dataclasses.replace(m, cases=(dataclasses.replace(m.labeled[0], role="test"),))
    with pytest.raises(InputError, match="against the model's own training cases.*same case id"):
        evaluate_model(store, leak)
