"""End to end through the local stack with the real core stages (``tiny`` profile) on three small real LA cases:
upload -> submit -> watch until done -> fetch the model -> segment a case -> evaluate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cfrseg.data.io import read_la_h5, read_volume, write_volume
from cfrseg.metrics import compute_case
from services.sdk import Client, state_name
from tests.stack_helpers import cleanup, dump_logs, need_servers

pytestmark = [pytest.mark.stack, pytest.mark.la, pytest.mark.slow]
CROP = (48, 48, 32)


def crop_la_cases(la_dir: Path, ids: list[str], out: Path) -> Path:
    """``out/images/<id>.nii.gz`` + ``out/labels/<id>.nii.gz``: CROP voxels around each label's centre."""
    for sub in ("images", "labels"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for cid in ids:
        h5 = la_dir / cid / "mri_norm2.h5"
        img, lab = read_la_h5(h5, "image"), read_la_h5(h5, "label")
        centre = np.round(np.argwhere(lab.array > 0).mean(axis=0)).astype(int)
        sl = tuple(slice(max(0, min(c - s // 2, n - s)), max(0, min(c - s // 2, n - s)) + s)
                   for c, s, n in zip(centre, CROP, img.shape))
        write_volume(img.with_array(np.ascontiguousarray(img.array[sl])), out / "images" / f"{cid}.nii.gz")
        write_volume(lab.with_array(np.ascontiguousarray(lab.array[sl])), out / "labels" / f"{cid}.nii.gz",
                     label=True)
    return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from services.stack import LocalStack

    need_servers()
    d = tmp_path_factory.mktemp("e2e") / "stack"
    st = LocalStack(d, env={"CFRSEG_DEVICE": "cpu", "OMP_NUM_THREADS": "1"})
    st.up()
    yield st
    st.down()
    cleanup(d)


def test_tiny_pipeline_through_the_stack(stack, la_dir, la_ids, tmp_path):
    data = crop_la_cases(la_dir, la_ids[:3], tmp_path / "la3")
    with Client(stack.addr("gateway"), stack.token) as c:
        ds = c.create_dataset(data, labeled=1, holdout=1, name="la3", num_classes=2, class_names=["atrium"])
        assert (ds.num_labeled, ds.num_unlabeled, ds.num_test) == (1, 1, 1)
        assert list(ds.class_names) == ["background", "atrium"] and ds.modality == "MR"
        test_id = next(x.case_id for x in ds.cases if x.role == 3)
        run = c.submit_run(ds.dataset_id, profile="tiny", ssl_method="mt", name="e2e")
        events = list(c.watch_run(run.run_id, timeout=600))
        final = c.get_run(run.run_id)
        assert state_name(final.state) == "SUCCEEDED", f"{final}\n{dump_logs(stack)}"
        assert {e.progress.stage for e in events} >= {"finetune", "pseudolabel", "retrain", "evaluate"}
        assert all(s.step == s.total and s.total > 0 for s in final.stages)
        assert 0.0 <= final.metrics["dice"] <= 1.0

        model = c.download_artifact(run.run_id, "retrain/model.pt", tmp_path / "model" / "model.pt")
        from cfrseg.stages.infer import load_model

        _net, meta = load_model(model.parent, device="cpu")
        assert meta["num_classes"] == 2
        assert meta["class_names"] == ["background", "atrium"]   # the dataset's names reach the model
        assert [m.classes[0].name for m in c.list_models() if m.model_id == final.model_id] == ["atrium"]
        report = c.download_artifact(run.run_id, "report.md", tmp_path).read_text(encoding="utf-8")
        assert "dice" in report and "atrium" in report

        out = tmp_path / "seg.nii.gz"
        res = c.segment_file(final.model_id, data / "images" / f"{test_id}.nii.gz", out)
        assert res.num_classes == 2
        pred, gt = read_volume(out), read_volume(data / "labels" / f"{test_id}.nii.gz")
        assert pred.shape == gt.shape and np.allclose(pred.spacing, gt.spacing)
        dice = compute_case(pred.array.astype(int), gt.array.astype(int), gt.spacing, 2)["dice"][0]
        assert dice == pytest.approx(final.metrics["dice"], abs=1e-6)  # the run's evaluation = this segmentation
