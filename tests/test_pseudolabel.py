"""Pseudo-label stage: whole-volume prediction in the source geometry, resumable, TTA, evaluate_sam."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cfrseg.data.io import read_la_h5, read_volume, write_volume
from cfrseg.data.manifest import Case, Manifest
from cfrseg.data.volume import Volume
from cfrseg.errors import ConfigError, NotFoundError
from cfrseg.sam.mosaic import MosaicSpec
from cfrseg.stages.finetune import FinetuneConfig, run_finetune
from cfrseg.stages.pseudolabel import PseudolabelConfig, evaluate_sam, predict_volume, run_pseudolabel
from cfrseg.store import LocalStore

# tiny SAM (random ViT, 128 px): windows 30x30x16 on a 4x4 grid of 32 px (as in test_finetune.py)
TINY = dict(model="tiny", image_size=128, crop=(30, 30, 16), zoom=(0.25, 0.25, 0.25), batch_size=2,
            lr=3e-3, weight_decay=0.0, warmup_iterations=2, checkpoint_interval_s=3600)


@pytest.fixture(scope="module")
def la_small(la_dir, la_ids, tmp_path_factory):
    """Three real LA cases cropped small (NIfTI with a non-trivial geometry) + a tiny fine-tuned SAM."""
    root = tmp_path_factory.mktemp("la_small")
    cases = []
    for k, cid in enumerate(la_ids[:3]):
        img = read_la_h5(la_dir / cid / "mri_norm2.h5", "image")
        lab = read_la_h5(la_dir / cid / "mri_norm2.h5", "label")
        sl = (slice(30, 130), slice(20, 110), slice(10, 74))     # (100, 90, 64)
        geo = dict(spacing=(0.625, 0.7, 1.25), origin=(-10.0, 5.5, 3.0))
        write_volume(Volume(img.array[sl], **geo), root / f"{cid}_img.nii.gz")
        write_volume(Volume(lab.array[sl], **geo), root / f"{cid}_lab.nii.gz", label=True)
        cases.append(Case(cid, str(root / f"{cid}_img.nii.gz"), str(root / f"{cid}_lab.nii.gz"),
                          "labeled" if k == 0 else "unlabeled"))
    m = Manifest("la_small", 2, tuple(cases))
    ft = LocalStore(root / "ft")
    run_finetune(FinetuneConfig(**dict(TINY, iterations=4, zoom=(0.5, 0.5, 0.5))), m, ft)
    return m, ft


@pytest.mark.la
def test_pseudolabels_in_source_geometry_and_resumable(la_small, tmp_path):
    m, ft = la_small
    out = LocalStore(tmp_path / "pl")
    events = []
    res = run_pseudolabel(PseudolabelConfig(), m, out, finetuned=ft, progress=events.append)
    assert sorted(res.labels) == sorted(c.case_id for c in m.unlabeled) and not res.skipped
    assert [e.step for e in events] == [1, 2] and events[-1].stage == "pseudolabel"
    for cid, key in res.labels.items():
        src = read_volume(m.case(cid).image)
        lab = read_volume(res.paths[cid])
        conf = read_volume(out.path(res.confidence[cid]))
        assert lab.same_geometry(src) and conf.same_geometry(src)
        assert lab.array.dtype == np.uint8 and set(np.unique(lab.array)) <= {0, 1}
        assert conf.array.min() >= 0.5 - 1e-6 and conf.array.max() <= 1.0     # max of 2 probabilities
        assert key == f"labels/{cid}.nii.gz"
    # rerun: refused without resume; with resume everything is skipped, files untouched
    mtimes = {k: out.path(k).stat().st_mtime_ns for k in out.list("labels/")}
    with pytest.raises(ConfigError, match="already holds a pseudolabel run"):
        run_pseudolabel(PseudolabelConfig(), m, out, finetuned=ft)
    again = run_pseudolabel(PseudolabelConfig(resume=True), m, out, finetuned=ft)
    assert sorted(again.skipped) == sorted(res.labels)
    assert {k: out.path(k).stat().st_mtime_ns for k in out.list("labels/")} == mtimes
    # the manifest takes the paths
    m2 = m.with_pseudo_labels(again.paths)
    assert all(c.pseudo_label for c in m2.unlabeled)


@pytest.mark.la
def test_missing_finetune_and_foreign_store(la_small, tmp_path):
    m, ft = la_small
    with pytest.raises(NotFoundError, match="finetune.pt"):
        run_pseudolabel(PseudolabelConfig(), m, LocalStore(tmp_path / "o"), finetuned=LocalStore(tmp_path / "none"))
    # a store holding labels of another fine-tuned SAM is refused, resume or not
    out = LocalStore(tmp_path / "pl")
    run_pseudolabel(PseudolabelConfig(roles=("labeled",)), m, out, finetuned=ft)
    prov = json.loads(out.get_bytes("provenance.json"))
    prov["inputs"]["finetune_sha256"] = "abc"
    out.put_bytes("provenance.json", json.dumps(prov).encode())
    with pytest.raises(ConfigError, match="input finetune_sha256: abc"):
        run_pseudolabel(PseudolabelConfig(roles=("labeled",), resume=True), m, out, finetuned=ft)


@pytest.mark.la
def test_evaluate_sam_and_tta(la_small):
    m, ft = la_small
    res = evaluate_sam(PseudolabelConfig(roles=("labeled",), tta=True), m, ft)
    assert list(res["cases"]) == [m.labeled[0].case_id]
    assert 0.0 <= res["summary"]["metrics"]["dice"]["mean"][0] <= 1.0


class Identity(torch.nn.Module):
    """A 'SAM' that returns the mosaic itself as the class-1 logit: lets us check the geometry exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = (x[:, :1] - 0.5) * 40
        return torch.cat([-v, v], dim=1)


@pytest.mark.parametrize("tta", [False, True])
def test_predict_volume_inverts_mosaic_windows_and_orientations(tta):
    """A model that thresholds its input: the whole path (zoom 1, windows with overlap, slice groups, rot/flip
    TTA, inverse mosaic) must give back the thresholded volume exactly."""
    g = torch.Generator().manual_seed(0)
    vol = torch.rand(37, 29, 23, generator=g).numpy()
    vol[0, 0, 0], vol[1, 0, 0] = 0.0, 1.0                   # fix the [0, 1] normalisation range
    spec = MosaicSpec(image_size=64, crop=(14, 14, 9), grid=3, tile_pad=1, clip_percentiles=(0, 100))
    probs = predict_volume(Identity(), spec, vol, 2, tta=tta, overlap=0.3, batch_size=3)
    assert probs.shape == (2, 37, 29, 23)
    assert torch.allclose(probs.sum(0), torch.ones(()), atol=1e-5)
    assert np.array_equal(probs.argmax(0).numpy(), (vol > 0.5).astype(np.int64))


def test_tta_subset_is_evenly_spread():
    from cfrseg.sam.mosaic import MosaicSpec
    from cfrseg.stages.pseudolabel import PseudolabelConfig, tta_family

    spec = MosaicSpec(image_size=64, crop=(16, 16, 4))
    assert tta_family(spec, 0) == spec.orientations() == tta_family(spec, 8) and len(spec.orientations()) == 8
    assert tta_family(spec, 2) == [(0, False), (0, True)]
    assert tta_family(spec, 4) == [(0, False), (2, False), (0, True), (2, True)]
    with pytest.raises(Exception):
        PseudolabelConfig(tta_count=-1)
