"""Multi-class CFR on synthetic K = 4 and K = 14 data: concat, fine-tune (tiny), pseudo-label, re-train with every
SSL method with and without pseudo-labels, inference, per-class metrics, report tables and overlays."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cfrseg.config import load_profile
from cfrseg.data.datasets import load_case
from cfrseg.data.io import read_volume
from cfrseg.metrics import compute_case, format_table, summarize
from cfrseg.report import OVERLAY_COLORS, class_colors, overlay_png, per_class_md
from cfrseg.sam import concat
from cfrseg.ssl.methods import METHODS
from cfrseg.stages.infer import load_model, segment_volume
from cfrseg.stages.pipeline import PipelineConfig, run_pipeline
from cfrseg.stages.retrain import RetrainConfig, run_retrain
from cfrseg.store import LocalStore
from tests.synth import synthetic_case, synthetic_manifest

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module", params=[4, 14], ids=["K4", "K14"])
def run(request, tmp_path_factory):
    """The whole tiny pipeline (MagicNet + SAM pseudo-labels) on 4 synthetic cases: 1 labeled, 2 unlabeled,
    1 held out."""
    k = request.param
    root = tmp_path_factory.mktemp(f"k{k}")
    data = synthetic_manifest(root / "data", k, 4, labeled=1, holdout=1)
    torch.manual_seed(0)
    cfg = PipelineConfig.from_profile(load_profile("tiny"), ssl="magicnet", profile="tiny")
    res = run_pipeline(cfg, data, LocalStore(root / "run"))
    return k, data, root / "run", res


def test_label_mosaic_round_trip_for_many_classes():
    _, lab = synthetic_case(14, (48, 48, 20))
    t = torch.from_numpy(lab.astype(np.int64))
    layout = concat.plan_mosaic(lab.shape, 256, pad=1)
    assert torch.equal(concat.from_mosaic(concat.to_mosaic(t, layout), layout), t)
    assert set(np.unique(lab)) == set(range(14))


def test_pipeline_end_to_end(run):
    k, data, out, res = run
    rep = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert "final 3D model on holdout: Dice" in res.summary
    assert rep["dataset"]["num_classes"] == k and rep["retrain"]["ssl"] == "magicnet"
    for key in ("CFR_FT", "final"):
        s = rep["metrics"][key]["holdout"]["summary"]
        assert s["classes"] == list(range(1, k)) and len(s["metrics"]["dice"]["mean"]) == k - 1
    # pseudo-labels: K-class label maps in each unlabeled case's geometry, scored per class
    for c in data.unlabeled:
        pl = read_volume(out / "pseudolabel/labels" / f"{c.case_id}.nii.gz")
        img = read_volume(c.image)
        assert pl.same_geometry(img) and pl.array.max() < k
    assert len(rep["pseudolabel"]["quality"]["summary"]["metrics"]["dice"]["mean"]) == k - 1
    # the kept model is the plain V-Net (location head dropped), K classes
    net, meta = load_model(out / "retrain", device="cpu")
    assert meta["network"] == "tiny" and meta["num_classes"] == k and not hasattr(net, "locate")
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "## Per class" in md and "mean over classes" in md
    assert f"| class {k - 1} |" in md and f"| class {k} |" not in md
    png = next((out / "overlays").glob("*.png")).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("ssl", METHODS)
@pytest.mark.parametrize("with_pl", [False, True], ids=["no_pl", "pl"])
def test_every_method_retrains_multiclass(run, ssl, with_pl, tmp_path):
    k, data, out, _ = run
    if with_pl:
        data = data.with_pseudo_labels({c.case_id: str(out / "pseudolabel/labels" / f"{c.case_id}.nii.gz")
                                        for c in data.unlabeled})
    cfg = RetrainConfig(network="tiny", network_kwargs={"has_dropout": True}, ssl=ssl, iterations=2,
                        patch=(32, 32, 16), zoom=(0.5, 0.5, 0.5), uamt_T=2, lr_schedule="constant", device="cpu",
                        magic_blend_start=0, magic_blend_window=1, seed=3,
                        infer={"patch": (32, 32, 16), "stride": (16, 16, 16), "batch_size": 4})
    res = run_retrain(cfg, data, LocalStore(tmp_path))
    hist = json.loads((tmp_path / "history.json").read_text(encoding="utf-8"))
    assert res.iterations == 2 and len(hist) == 2
    assert all(math.isfinite(h["loss"]) for h in hist)
    assert ("pl" in hist[-1]) == with_pl, hist[-1]
    assert ("cons" in hist[-1]) == (ssl != "none")
    if ssl == "magicnet":
        assert {"loc", "loc_acc", "blend"} <= set(hist[-1]) and hist[-1]["blend"] == 1.0
    net, meta = load_model(tmp_path, device="cpu")
    assert meta["num_classes"] == k and net.classifier.out_channels == k
    case = data.test[0]
    image, gt = load_case(case, data, check_pseudo=False)
    pred = segment_volume(net, image, load_config(meta), meta["preprocess"]).array
    assert pred.shape == gt.shape and pred.dtype == np.uint8 and int(pred.max()) < k
    m = compute_case(pred, gt.array, image.spacing, k)
    assert all(len(v) == k - 1 for v in m.values())


def load_config(meta):
    from cfrseg.stages.infer import InferConfig

    return InferConfig.from_dict(dict(meta["infer"], device="cpu"))


def test_per_class_metrics_tables_and_overlay_legend(tmp_path):
    k = 14
    img, gt = synthetic_case(k, (48, 48, 20), seed=1)
    pred = gt.copy()
    pred[gt == 3] = 0                                        # class 3 missed
    pred[pred == 5] = 6                                      # class 5 called 6
    res = [compute_case(pred, gt, (1.0, 1.0, 2.0), k), compute_case(gt, gt, (1.0, 1.0, 2.0), k)]
    s = summarize(res)
    dice = s["metrics"]["dice"]["mean"]
    assert dice[2] == 0.5 and dice[4] == 0.5 and dice[0] == 1.0          # (0 + 1) / 2 for the missed classes
    assert s["metrics"]["dice"]["class_mean"] == pytest.approx(float(np.mean(dice)))
    names = {c: f"organ{c}" for c in range(1, k)}
    table = format_table(s, class_names=names)
    assert "organ13" in table and "mean over classes" in table
    assert "mean over classes" not in format_table(summarize([compute_case(gt > 0, gt > 0, (1, 1, 1), 2)]))
    md = per_class_md({"A": s, "B": s}, names)
    assert md.count("| organ") == 2 * (k - 1) and "**dice**" in md and "**hd95 (mm)**" in md
    cols = class_colors(k)
    assert len(set(cols[1:])) == k - 1 and cols[1:8] == list(OVERLAY_COLORS[1:8])    # binary colours kept
    p = overlay_png(tmp_path / "o.png", img, [("gt", gt), ("pred", pred)], num_classes=k, class_names=names)
    import matplotlib.image as mpimg

    a = mpimg.imread(p)
    assert a.shape[0] > 300 and a.shape[2] >= 3            # taller than the binary layout: a legend row
    b = mpimg.imread(overlay_png(tmp_path / "b.png", img, [("gt", (gt > 0).astype(np.uint8))]))
    assert b.shape[0] == 320                                  # binary overlays unchanged (no legend)
