"""ACDC end to end (issue 12): real cardiac cine-MRI frames (4 classes, 6-18 thick slices with a nominal 1 mm
spacing) through the ``tiny`` pipeline, and the plan rule that keeps their few slices (docs/data.md).

The real-data tests read the shared ACDC folder from $CFRSEG_ACDC_DIR (scripts/test.sh sets it), else
``../shared/data/acdc`` next to the repository; without it they are skipped. Nothing is copied: the test builds a
small nnU-Net folder of symlinks (4 patients, both frames) in a temporary directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cfrseg.config import load_profile
from cfrseg.data.datasets import build_manifest, load_case
from cfrseg.data.io import read_volume
from cfrseg.data.plan import Plan, make_plan
from cfrseg.data.volume import Volume
from cfrseg.stages.infer import InferConfig, load_model, segment_volume
from cfrseg.stages.pipeline import PipelineConfig, run_pipeline
from cfrseg.store import LocalStore

REPO = Path(__file__).resolve().parents[1]
# the four smallest frames' patients (154-208 x 224-256 x 6-8 voxels): sorted ids give labeled = patient041,
# unlabeled = 070 and 090, held out = 091 (both frames each)
PATIENTS = ("041", "070", "090", "091")
NAMES = ["background", "RV", "Myo", "LV"]


def _acdc_dir() -> Path | None:
    d = os.environ.get("CFRSEG_ACDC_DIR")
    root = Path(d) if d else REPO.parent / "shared" / "data" / "acdc"
    return root if (root / "dataset.json").is_file() and (root / "imagesTr").is_dir() else None


@pytest.fixture(scope="module")
def acdc_subset(tmp_path_factory) -> Path:
    src = _acdc_dir()
    if src is None:
        pytest.skip("ACDC data not found: set CFRSEG_ACDC_DIR to the acdc folder (with dataset.json, imagesTr, "
                    "labelsTr) to run this test")
    root = tmp_path_factory.mktemp("acdc")
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    shutil.copyfile(src / "dataset.json", root / "dataset.json")       # metadata only; images are symlinks
    for p in PATIENTS:
        for f in ("01", "02"):
            cid = f"acdc_patient{p}_frame{f}"
            (root / "imagesTr" / f"{cid}_0000.nii.gz").symlink_to((src / "imagesTr" / f"{cid}_0000.nii.gz").resolve())
            (root / "labelsTr" / f"{cid}.nii.gz").symlink_to((src / "labelsTr" / f"{cid}.nii.gz").resolve())
    return root


@pytest.fixture(scope="module", params=["mt", "magicnet"])
def run(request, acdc_subset, tmp_path_factory):
    data = build_manifest(acdc_subset, labeled=2, holdout=2)
    out = tmp_path_factory.mktemp(f"run_{request.param}")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        cfg = PipelineConfig.from_profile(load_profile("tiny"), ssl=request.param, profile="tiny")
        res = run_pipeline(cfg, data, LocalStore(out))
    finally:
        torch.set_num_threads(n)
    return request.param, data, out, res


def test_manifest_reads_acdc_classes(acdc_subset):
    data = build_manifest(acdc_subset, labeled=2, holdout=2)
    assert data.num_classes == 4 and list(data.class_names) == NAMES and data.modality == "MR"
    roles = {c.case_id: c.role for c in data.cases}
    assert [k for k, r in roles.items() if r == "labeled"] == ["acdc_patient041_frame01", "acdc_patient041_frame02"]
    assert [k for k, r in roles.items() if r == "test"] == ["acdc_patient091_frame01", "acdc_patient091_frame02"]


def test_tiny_pipeline_on_real_acdc(run):
    ssl, data, out, _ = run
    rep = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert rep["dataset"]["num_classes"] == 4 and rep["dataset"]["class_names"] == NAMES
    assert rep["retrain"]["ssl"] == ssl
    # the plan kept every slice: ACDC's z holds 6-18 slices at a nominal 1 mm
    plan = Plan.from_dict(json.loads((out / "plan.json").read_text(encoding="utf-8")))
    assert plan.slice_axis == 2 and plan.keep_slices
    # per-class report: three foreground classes, named
    for key in ("CFR_FT", "final"):
        s = rep["metrics"][key]["holdout"]["summary"]
        assert s["classes"] == [1, 2, 3] and len(s["metrics"]["dice"]["mean"]) == 3
        assert set(rep["metrics"][key]["holdout"]["cases"]) == {c.case_id for c in data.test}
    md = (out / "report.md").read_text(encoding="utf-8")
    assert all(f"| {n} |" in md for n in NAMES[1:]) and "mean over classes" in md
    # every frame carries ACDC's nominal 1 mm spacing: distances are labelled as voxel steps
    assert rep["distance_unit"] == "mm = voxels" and "**hd95 (mm = voxels)**" in md and "HD95 in mm = voxels" in md
    # pseudo-labels: one 4-class map per unlabeled frame, in that frame's own source geometry
    for c in data.unlabeled:
        pl = read_volume(out / "pseudolabel/labels" / f"{c.case_id}.nii.gz")
        img = read_volume(c.image)
        assert pl.same_geometry(img) and int(pl.array.max()) < 4
    # the kept model: 4 classes named background-first; predictions in the source geometry
    net, meta = load_model(out / "retrain", device="cpu")
    assert meta["num_classes"] == 4 and meta["class_names"] == NAMES
    case = data.test[0]
    image, _ = load_case(case, data, check_pseudo=False)
    pred = segment_volume(net, image, InferConfig.from_dict(dict(meta["infer"], device="cpu")), meta["preprocess"])
    assert pred.same_geometry(image) and pred.array.dtype == np.uint8 and int(pred.array.max()) < 4
    # the working grid of the re-train stage kept the slices (tiny coarsens by 2 in-plane only here)
    geo = plan.geometry(image, meta["preprocess"]["spacing_factor"])
    assert geo.working_shape[2] == image.shape[2] and geo.working_shape[0] < image.shape[0]


# ------------------------------------------------------------------------------------- the plan rule (synthetic)

def _fingerprint(shapes):
    return {"modality": "MR", "cases": [{"canonical_shape": list(s), "canonical_spacing": [1.0, 1.0, 1.0]}
                                        for s in shapes]}


def test_plan_keeps_few_thick_slices_and_nothing_else():
    acdc = make_plan(_fingerprint([(216, 256, 9), (154, 224, 6), (232, 256, 18)]))
    assert acdc.keep_slices and not acdc.anisotropic and acdc.median_shape == (216, 256, 9)
    vol = Volume(np.zeros((216, 256, 9), np.float32))
    # lite's factors: in-plane coarsened, the 9 slices kept; a refining factor still refines
    assert acdc.geometry(vol, (2.0, 2.0, 2.0)).working_shape == (108, 128, 9)
    assert acdc.geometry(vol, (3.03, 3.03, 2.0)).working_shape[2] == 9
    assert acdc.geometry(vol, (1.0, 1.0, 0.5)).working_shape[2] == 18
    # lite's 80x80x60 mm patch: the slice axis is clamped to the stack (rounded up to the network's 16)
    assert acdc.patch_voxels((80.0, 80.0, 60.0), (2.0, 2.0, 2.0)) == (32, 32, 16)
    # LA-like volumes (88 slices of 192 x 142) are not "few slices": unchanged
    la = make_plan(_fingerprint([(192, 142, 88)] * 3))
    assert not la.keep_slices
    assert la.geometry(Volume(np.zeros((192, 142, 88), np.float32)), (2.0, 2.0, 2.0)).working_shape == (96, 71, 44)
    # a plan written before the rule (no key) replays as it was made; plans it leaves alone serialise as before
    old = {k: v for k, v in acdc.to_dict().items() if k != "keep_slices"}
    assert Plan.from_dict(old).geometry(vol, (2.0, 2.0, 2.0)).working_shape == (108, 128, 4)
    assert acdc.to_dict()["keep_slices"] is True and "keep_slices" not in la.to_dict()
    assert Plan.from_dict(acdc.to_dict()) == acdc and Plan.from_dict(la.to_dict()) == la


def test_subject_pattern_on_real_acdc() -> None:
    src = _acdc_dir()
    if src is None:
        pytest.skip("ACDC data not found (CFRSEG_ACDC_DIR)")
    m = build_manifest(src, labeled=3, holdout=10, subject=r"patient\d+")
    by_role: dict[str, set[str]] = {}
    for c in m.cases:
        by_role.setdefault(c.role, set()).add(c.case_id.split("_frame")[0])
    # L and holdout count patients: 3 labeled and 10 test patients, both frames each; no patient in two roles
    assert len(by_role["labeled"]) == 3 and len(by_role["test"]) == 10
    assert sum(c.role == "labeled" for c in m.cases) == 6 and sum(c.role == "test" for c in m.cases) == 20
    assert not (by_role["labeled"] & by_role["unlabeled"]) and not (by_role["unlabeled"] & by_role["test"])
