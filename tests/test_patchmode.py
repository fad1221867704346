"""Patch mode (paper section III-B): the fine-tune window chosen by the dataset plan (crop 'auto': volume or patch
mode; crop_mm: a physical window), patches covering and stitched back exactly with bounded memory, and the tiny
pipeline end to end in patch mode on K = 4 synthetic volumes with large slices."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from cfrseg.config import apply_overrides, load_profile
from cfrseg.data.io import read_volume
from cfrseg.data.plan import Plan
from cfrseg.errors import Cancelled, ConfigError
from cfrseg.sam.mosaic import MosaicSpec, plan_windows
from cfrseg.sam.window import mosaic_shrink
from cfrseg.stages import checkpoint as ckpt_io
from cfrseg.stages import pseudolabel as pl_mod
from cfrseg.stages.finetune import FinetuneConfig, read_artifact, run_finetune
from cfrseg.stages.pipeline import PipelineConfig, run_pipeline
from cfrseg.store import LocalStore, get_json
from tests.synth import synthetic_manifest

pytestmark = pytest.mark.usefixtures("one_thread")


def _mr(spacing, median, keep=False) -> Plan:
    return Plan("MR", spacing, 2, median_shape=median, anisotropic=keep, keep_slices=keep)


def _auto(**kw) -> FinetuneConfig:
    return FinetuneConfig(**{"crop": "auto", "image_size": 1024, "tile_pad": 0, **kw})


# ------------------------------------------------------------------------------------------- the auto rule

def test_auto_small_slices_is_volume_mode_with_the_whole_median_volume():
    plan = _mr((1.0, 1.0, 1.0), (60, 44, 30))
    w = _auto(image_size=256, tile_pad=1).window(plan)
    assert (w.mode, w.crop, w.grid) == ("volume", (60, 60, 30), 6)          # square in-plane for rot90
    assert w.shrink == pytest.approx(6 * 62 / 256)                           # 1.45: within max_shrink 1.5
    assert _auto(image_size=256, tile_pad=1, augment_rot90=False).window(plan).crop == (60, 44, 30)
    # a little stricter and the same volume goes to patch mode (96 capped by the volume: 60, 44 -> 60, 30)
    strict = _auto(image_size=256, tile_pad=1, max_shrink=1.2, patch_side=32).window(plan)
    assert (strict.mode, strict.crop) == ("patch", (32, 32, 30))
    spec = _auto(image_size=256, tile_pad=1).spec(plan)
    assert (spec.mode, spec.crop, spec.layout().scaled) == ("volume", (60, 60, 30), True)


def test_auto_large_slices_is_patch_mode_with_96_cubes_and_several_windows():
    plan = _mr((1.0, 1.0, 1.0), (300, 300, 120))
    w = _auto().window(plan)
    assert (w.mode, w.crop, w.grid, w.shrink) == ("patch", (96, 96, 96), 10, 1.0)   # 10x10 x 96 = 960 <= 1024
    starts = plan_windows((300, 300, 120), w.crop, 0.25, 0.25)
    assert len(starts) == 4 * 4 * 2 and sorted({s[2] for s in starts}) == [0, 24]      # overlapping along D too
    # the same plan at a coarser fine-tune grid: the whole volume (150, 150, 60) fits -> volume mode
    coarse = _auto(spacing_factor=(2.0, 2.0, 2.0)).window(plan)
    assert (coarse.mode, coarse.crop) == ("volume", (150, 150, 60))


def test_auto_few_thick_slices_take_every_slice():
    acdc = _mr((1.5, 1.5, 10.0), (200, 200, 10), keep=True)
    iso = _mr((1.5, 1.5, 10.0), (200, 200, 10), keep=False)
    cfg = _auto(image_size=256, tile_pad=1, patch_side=8)
    assert cfg.window(acdc).crop == (8, 8, 10) and cfg.window(acdc).mode == "patch"
    assert cfg.window(iso).crop == (8, 8, 8)
    # keep_slices also keeps the slice axis of the working grid at the plan's (lite's x2 is capped at 1)
    assert _auto(image_size=256, tile_pad=1, patch_side=48, spacing_factor=(1, 1, 2)).window(acdc).crop == (48, 48, 10)


def test_crop_mm_is_resolved_through_the_plan_and_capped_by_the_median_case():
    plan = _mr((0.5, 0.5, 2.0), (400, 400, 60))
    cfg = FinetuneConfig(crop_mm=(48.0, 48.0, 48.0), image_size=1024, tile_pad=0)
    assert cfg.window(plan).crop == (96, 96, 24) and cfg.spec(plan).mode == "patch"
    assert cfg.replace(spacing_factor=(2.0, 2.0, 2.0)).window(plan).crop == (48, 48, 12)
    big = FinetuneConfig(crop_mm=(1000.0, 1000.0, 1000.0), image_size=1024, tile_pad=0, max_shrink=64)
    assert big.window(plan).crop == (400, 400, 60)
    # crop_mm replaces a voxel crop (as retrain.patch_mm replaces patch); the fixed crop needs no plan
    assert FinetuneConfig(crop=(32, 32, 9)).spec().crop == (32, 32, 9)
    assert FinetuneConfig(crop=(32, 32, 9)).spec().mode == "fixed"


def test_impossible_windows_are_config_errors():
    plan = _mr((1.0, 1.0, 1.0), (300, 300, 120))
    # a set patch_side that does not fit is an error naming the largest that would ...
    with pytest.raises(ConfigError, match=r"patch_side <= (\d+)") as e:
        _auto(image_size=256, tile_pad=1, patch_side=96).window(plan)
    n = int(e.value.args[0].rsplit("<= ", 1)[1])
    assert mosaic_shrink((n, n, n), 256, 0, 1) <= 1.5 < mosaic_shrink((n + 1, n + 1, n + 1), 256, 0, 1)
    assert _auto(image_size=256, tile_pad=1, patch_side=n).window(plan).crop == (n, n, n)
    # ... and the automatic side (patch_side 0, the default) takes that largest cube by itself
    w = _auto(image_size=256, tile_pad=1).window(plan)
    assert (w.mode, w.crop) == ("patch", (n, n, n)) and n == 49 and w.shrink <= 1.5
    with pytest.raises(ConfigError, match="crop_mm .* needs shrink"):
        FinetuneConfig(crop_mm=(200.0, 200.0, 100.0), image_size=256).window(plan)
    with pytest.raises(ConfigError, match="set only one"):
        FinetuneConfig(crop="auto", crop_mm=(96.0, 96.0, 96.0))
    for bad in ({"crop_mm": (-1.0, 96.0, 96.0)}, {"crop_mm": (96.0, 96.0)}, {"crop": "patch"}, {"crop": (0, 4, 4)},
                {"crop": (4.5, 4, 4)}, {"patch_side": -1}, {"max_shrink": 0.5}):
        with pytest.raises(ConfigError):
            FinetuneConfig(**bad)
    with pytest.raises(ConfigError, match="dataset plan"):
        _auto().spec()
    with pytest.raises(ConfigError, match="no median case shape"):
        _auto().window(_mr((1.0, 1.0, 1.0), (0, 0, 0)))
    with pytest.raises(ConfigError, match="mode"):
        MosaicSpec(image_size=64, crop=(8, 8, 4), mode="tiles").check()


# ------------------------------------------------------------------------------ covering and stitching back

class Identity(torch.nn.Module):
    """A 'SAM' whose class-1 logit is its input: the probability of every voxel is known (sigmoid(40 (v - .5)))."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += x.shape[0]
        v = (x[:, :1] - 0.5) * 20
        return torch.cat([-v, v], dim=1)


def test_patches_cover_every_voxel_and_overlap_along_every_axis():
    shape, crop = (37, 29, 23), (10, 10, 7)
    count = np.zeros(shape, np.int32)
    starts = plan_windows(shape, crop, 0.3, 0.3)
    for x, y, z in starts:
        count[x:x + crop[0], y:y + crop[1], z:z + crop[2]] += 1
    assert count.min() >= 1 and count.max() >= 8                             # corners shared by 2 x 2 x 2
    zs = sorted({s[2] for s in starts})
    assert zs == sorted(zs) and any(b - a < crop[2] for a, b in itertools.pairwise(zs))
    assert len({s[2] for s in plan_windows(shape, crop, 0.3)}) < len(zs)     # fixed mode: slice groups


@pytest.mark.parametrize("tta", [False, True])
def test_patch_mode_stitches_a_known_probability_map_exactly(tta):
    g = torch.Generator().manual_seed(0)
    vol = torch.rand(37, 29, 23, generator=g).numpy()
    vol[0, 0, 0], vol[1, 0, 0] = 0.0, 1.0                                    # [0, 1] normalisation = identity
    spec = MosaicSpec(image_size=64, crop=(10, 10, 7), grid=3, tile_pad=1, clip_percentiles=(0, 100), mode="patch")
    model = Identity()
    probs = pl_mod.predict_volume(model, spec, vol, 2, tta=tta, tta_count=2, overlap=0.3, batch_size=5)
    want = torch.sigmoid(torch.from_numpy((vol - 0.5) * 40).float())
    assert torch.allclose(probs[1], want, atol=1e-5) and torch.allclose(probs.sum(0), torch.ones(()), atol=1e-5)
    assert model.calls == len(plan_windows(vol.shape, spec.crop, 0.3, 0.3)) * (2 if tta else 1)


def test_patch_mode_memory_is_one_patch_of_slices(monkeypatch):
    """No K x volume float buffer: every accumulator holds at most one patch depth of planes, whatever D."""
    made = []

    class Recording(pl_mod.SweepAccumulator):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(pl_mod, "SweepAccumulator", Recording)
    k, d = 6, 64
    vol = np.random.default_rng(0).random((24, 24, d)).astype(np.float32)
    spec = MosaicSpec(image_size=64, crop=(12, 12, 8), grid=3, tile_pad=1, mode="patch")
    sink = pl_mod.ArgmaxSink(vol.shape, k, 2)
    pl_mod.stream_volume(torch.nn.Conv2d(3, k, 1).eval(), spec, vol, k, sink, overlap=0.25)
    assert made and all(a.peak_planes <= 8 and a.acc.shape[1] <= 8 for a in made)
    assert sink.labels.shape == vol.shape


# ------------------------------------------------------------------------------ the pipeline in patch mode


def test_tiny_pipeline_in_patch_mode_k4_large_slices(tmp_path):
    """K = 4, slices of 96 x 96 (48 x 48 at tiny's x2 grid) with 48 slices: the tiny canvas (128) cannot hold
    the whole volume, so crop 'auto' (set as a profile override) picks 16^3 patches, 32 per volume."""
    data = synthetic_manifest(tmp_path / "data", 4, 4, labeled=1, holdout=1, shape=(96, 96, 48))
    prof = apply_overrides(load_profile("tiny"), ["finetune.crop=auto", "finetune.patch_side=16",
                                                  "retrain.iterations=2"])
    cfg = PipelineConfig.from_profile(prof, profile="tiny")
    too_big = PipelineConfig.from_profile(apply_overrides(prof, ["finetune.patch_side=40"]), profile="tiny")
    with pytest.raises(ConfigError, match="patch_side <= 3[0-9]"):
        run_pipeline(too_big, data, LocalStore(tmp_path / "run"))
    assert not (tmp_path / "run" / "pipeline_config.json").exists()   # no run recorded: the same --out is usable
    torch.manual_seed(0)
    res = run_pipeline(cfg, data, LocalStore(tmp_path / "run"))
    win = res.report["finetune"]["window"]
    assert (win["mode"], tuple(win["crop"]), win["grid"]) == ("patch", (16, 16, 16), 4), win
    ft = LocalStore(tmp_path / "run" / "finetune")
    art = read_artifact(ft)
    assert art["spec"]["mode"] == "patch" and art["spec"]["crop"] == [16, 16, 16] and art["window"] == win
    assert get_json(ft, "window.json")["spec"] == art["spec"]
    assert "on (16, 16, 16) windows (patch mode)" in (tmp_path / "run" / "report.md").read_text(encoding="utf-8")
    for c in data.unlabeled:
        lab = read_volume(tmp_path / "run" / "pseudolabel" / "labels" / f"{c.case_id}.nii.gz")
        img = read_volume(c.image)
        assert lab.same_geometry(img) and lab.array.shape == (96, 96, 48) and int(lab.array.max()) < 4
    rep = json.loads((tmp_path / "run" / "report.json").read_text(encoding="utf-8"))
    assert rep["retrain"]["iterations"] == 2 and rep["metrics"]["final"]["holdout"]["summary"]

    # an interrupted fine-tune resumes on the same window; a checkpoint of another window is refused
    stop = _CancelAt(2)
    part = LocalStore(tmp_path / "part")
    with pytest.raises(Cancelled):
        run_finetune(cfg.finetune, data, part, progress=stop.progress, cancel=stop)
    assert ckpt_io.loads(part.get_bytes("checkpoint.pt"), "part")["spec"]["crop"] == [16, 16, 16]
    done = run_finetune(cfg.finetune.replace(resume=True), data, part)
    assert done.resumed_from == 2 and done.window == win
    ck = ckpt_io.loads(part.get_bytes("checkpoint.pt"), "part")
    ck["spec"]["crop"] = [12, 12, 12]
    part.delete("finetune.pt")
    part.put_bytes("checkpoint.pt", ckpt_io.dumps(ck))
    with pytest.raises(ConfigError, match="mosaic window"):
        run_finetune(cfg.finetune.replace(resume=True), data, part)


class _CancelAt:
    def __init__(self, n: int) -> None:
        self.n, self.set = n, False

    def progress(self, ev) -> None:
        if ev.losses and ev.step >= self.n:
            self.set = True

    def is_set(self) -> bool:
        return self.set


def test_gateway_overrides_accept_the_window_settings():
    from services.gateway.overrides import check_overrides

    check_overrides({"finetune": {"crop": "auto", "patch_side": 64, "max_shrink": 2.0}})
    check_overrides({"finetune": {"crop": [96, 96, 96], "crop_mm": [96.0, 96.0, 96.0]}})
    check_overrides({"finetune": {"crop_mm": None}})
    check_overrides({"finetune": {"crop": "auto", "patch_side": 0}})       # 0: the automatic side
    for bad in ({"crop": "whole"}, {"crop_mm": [0.5, 96, 96]}, {"patch_side": -1}, {"max_shrink": 0.9}):
        with pytest.raises(Exception, match="out of bounds"):
            check_overrides({"finetune": bad})
