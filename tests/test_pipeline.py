"""The whole CFR pipeline end to end with `cfrseg run` (tiny profile) on four small real LA crops."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cfrseg.cli import main
from cfrseg.data.io import read_volume
from tests.la_crops import write_cropped_la


@pytest.fixture(scope="module")
def crops(la_dir, la_ids, tmp_path_factory) -> Path:
    return write_cropped_la(la_dir, la_ids[:4], tmp_path_factory.mktemp("la4"))


@pytest.mark.la
def test_cfrseg_run_tiny_end_to_end(crops: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    # 4 cases: first labeled, last held out for evaluation, the middle ones unlabeled
    rc = main(["run", "--profile", "tiny", "--data", str(crops), "--labeled", "1", "--holdout", "1",
               "--ssl", "mt", "--out", str(out), "--num-classes", "2", "--class-names", "atrium"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["dataset"] == {"name": rep["dataset"]["name"], "num_classes": 2, "labeled": 1, "unlabeled": 2,
                              "test": {"holdout": 1}, "class_names": ["background", "atrium"], "modality": "MR"}
    assert rep["plan"]["orientation"] == "LPS" and rep["plan"]["target_spacing"] == [0.625] * 3
    assert rep["distance_unit"] == "mm"  # LA has a real 0.625 mm spacing
    assert rep["finetune"]["iterations"] == 4 and rep["retrain"]["iterations"] == 6
    for key in ("CFR_FT", "final"):
        s = rep["metrics"][key]["holdout"]["summary"]
        assert s["n_cases"] == 1 and 0.0 <= s["metrics"]["dice"]["mean"][0] <= 1.0
    # the 3D model against its teacher, paired on the held-out case
    comp = rep["student_vs_teacher"]["holdout"]
    final_dice = rep["metrics"]["final"]["holdout"]["summary"]["metrics"]["dice"]["mean"][0]
    sam_dice = rep["metrics"]["CFR_FT"]["holdout"]["summary"]["metrics"]["dice"]["mean"][0]
    assert comp["n_cases"] == 1 and comp["mean_a"] == pytest.approx(final_dice)
    assert comp["mean_b"] == pytest.approx(sam_dice) and comp["mean_diff"] == pytest.approx(final_dice - sam_dice)
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "## The 3D model against its teacher" in md
    assert ("is below the fine-tuned SAM on holdout" in md) == (final_dice < sam_dice)
    for f in ("report.md", "loss_curves.png", "retrain/model.pt", "finetune/finetune.pt"):
        assert (out / f).is_file(), f
    assert list((out / "overlays").glob("*.png"))
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the pseudo-label of the unlabeled case is in that case's source geometry
    cid = sorted(p.name[:-7] for p in (crops / "images").glob("*.nii.gz"))[1]
    pl, src = read_volume(out / "pseudolabel/labels" / f"{cid}.nii.gz"), read_volume(crops / "images" / f"{cid}.nii.gz")
    assert pl.same_geometry(src)
    # a second run resumes: every stage is found finished and nothing is trained again
    ft_ck = (out / "finetune/checkpoint.pt").stat().st_mtime_ns
    assert main(["run", "--profile", "tiny", "--data", str(crops), "--labeled", "1", "--holdout", "1",
                 "--ssl", "mt", "--out", str(out), "--resume", "--num-classes", "2",
                 "--class-names", "atrium"]) == 0
    assert (out / "finetune/checkpoint.pt").stat().st_mtime_ns == ft_ck
    capsys.readouterr()
    # without --resume the same --out is refused; another --labeled is refused even with --resume
    assert main(["run", "--profile", "tiny", "--data", str(crops), "--labeled", "1", "--holdout", "1",
                 "--out", str(out), "--num-classes", "2", "--class-names", "atrium"]) == 2
    assert "already holds a pipeline run" in capsys.readouterr().err
    kept = {f: (out / f).stat().st_mtime_ns for f in ("plan.json", "fingerprint.json", "pipeline_config.json")}
    assert main(["run", "--profile", "tiny", "--data", str(crops), "--labeled", "2", "--holdout", "1",
                 "--out", str(out), "--num-classes", "2", "--class-names", "atrium", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume the finetune run" in err and "roles changed" in err and "unlabeled->labeled" in err
    assert (out / "finetune/checkpoint.pt").stat().st_mtime_ns == ft_ck
    assert {f: (out / f).stat().st_mtime_ns for f in kept} == kept      # the refused run changed nothing


@pytest.mark.la
def test_segment_and_evaluate_commands(crops: Path, tmp_path: Path, capsys) -> None:
    model_dir = tmp_path / "model"
    assert main(["retrain", "--profile", "tiny", "--data", str(crops), "--labeled", "2", "--ssl", "none",
                 "--out", str(model_dir), "--num-classes", "2"]) == 0
    pred = tmp_path / "pred"
    assert main(["segment", "--model", str(model_dir), "--input", str(crops / "images"),
                 "--output", str(pred), "--device", "cpu"]) == 0
    files = sorted(pred.glob("*.nii.gz"))
    assert len(files) == 4
    for f in files:
        p, s = read_volume(f), read_volume(crops / "images" / f.name)
        assert p.same_geometry(s) and set(np.unique(p.array)) <= {0, 1}
    js = tmp_path / "m.json"
    assert main(["evaluate", "--pred", str(pred), "--gt", str(crops / "labels"), "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    assert set(res["cases"]) == {f.name[:-7] for f in files}
    assert res["summary"]["n_cases"] == 4
    assert "dice" in capsys.readouterr().out


def test_cli_bad_input_exits_2(tmp_path: Path, capsys) -> None:
    assert main(["evaluate", "--pred", str(tmp_path / "nope"), "--gt", str(tmp_path)]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["segment", "--model", str(tmp_path), "--input", "x", "--output", "y"]) == 2
    assert "model file not found" in capsys.readouterr().err
    assert main(["run", "--profile", "nosuch", "--data", str(tmp_path), "--labeled", "1", "--out",
                 str(tmp_path / "o")]) == 2
    assert "unknown profile" in capsys.readouterr().err
    assert main(["retrain", "--profile", "tiny", "--set", "retrain.iterations", "--data", str(tmp_path),
                 "--labeled", "1", "--out", str(tmp_path / "o")]) == 2
    assert "STAGE.KEY=VALUE" in capsys.readouterr().err


def test_profile_overrides_parse_json_and_reject_bad_items() -> None:
    from cfrseg.config import apply_overrides, parse_overrides
    from cfrseg.errors import ConfigError

    assert parse_overrides(["retrain.iterations=100", "finetune.crop=[8,8,4]", "retrain.ssl=mt"]) == {
        "retrain": {"iterations": 100, "ssl": "mt"}, "finetune": {"crop": [8, 8, 4]}}
    prof = {"retrain": {"iterations": 6, "lr": 0.1}}
    out = apply_overrides(prof, ["retrain.iterations=3"])
    assert out["retrain"] == {"iterations": 3, "lr": 0.1} and prof["retrain"]["iterations"] == 6
    for bad in ("retrain.iterations", "iterations=3", ".x=1", "retrain.=1"):
        with pytest.raises(ConfigError, match="STAGE.KEY=VALUE"):
            parse_overrides([bad])


@pytest.mark.parametrize("name", ["tiny", "lite", "paper"])
def test_every_profile_builds_valid_stage_configs(name: str) -> None:
    from cfrseg.config import load_profile
    from cfrseg.stages.pipeline import PipelineConfig

    cfg = PipelineConfig.from_profile(load_profile(name), ssl="mt", profile=name, sam_checkpoint=None)
    assert cfg.retrain.ssl == "mt" and cfg.finetune.iterations >= 1
    spec = cfg.finetune.spec()
    assert spec.image_size in (128, 256, 1024)
    # the round trip through JSON gives the same configs
    again = PipelineConfig.from_profile({k: v for k, v in cfg.to_dict().items() if k in ("finetune", "pseudolabel",
                                         "retrain")}, profile=name)
    assert again.to_dict()["retrain"] == cfg.to_dict()["retrain"]
