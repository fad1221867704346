"""Fingerprint -> plan -> training crop -> inference -> source geometry, on oblique, flipped and anisotropic
synthetic volumes of the same physical object (an off-centre ellipsoid in LPS millimetres)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cfrseg.data.datasets import manifest_from_folders
from cfrseg.data.fingerprint import compute_fingerprint
from cfrseg.data.io import write_volume
from cfrseg.data.manifest import Case, Manifest
from cfrseg.data.plan import Plan, make_plan, plan_for, prepare_image, prepare_label
from cfrseg.data.resample import AxisMap, canonical_map, orientation_code, target_shape
from cfrseg.data.volume import Volume
from cfrseg.errors import InputError
from cfrseg.metrics import compute_case
from cfrseg.ssl.sampling import crop
from cfrseg.stages.infer import InferConfig, segment_volume

CENTRE = np.array([3.0, -5.0, 4.0])       # mm, LPS
RADII = np.array([22.0, 16.0, 12.0])      # mm: an asymmetric ellipsoid, so wrong flips/permutations show


def rotation_z(deg: float) -> np.ndarray:
    a = math.radians(deg)
    return np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1.0]])


def object_on(shape, spacing, origin, direction: np.ndarray) -> np.ndarray:
    """The object (uint8 mask) sampled at the voxel centres of a grid."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    world = np.asarray(origin) + (direction @ (idx * np.asarray(spacing)).T).T
    return ((((world - CENTRE) / RADII) ** 2).sum(1) <= 1.0).reshape(tuple(shape)).astype(np.uint8)


def sample(shape, spacing, direction: np.ndarray) -> tuple[Volume, Volume]:
    """Image (1 inside the ellipsoid, 0 outside) and label of the object sampled on a grid whose centre voxel
    sits at the world origin."""
    shape = tuple(shape)
    origin = -direction @ (np.asarray(spacing) * np.array([(n - 1) / 2 for n in shape]))
    lab = object_on(shape, spacing, origin, direction)
    geo = dict(spacing=tuple(float(s) for s in spacing), origin=tuple(float(o) for o in origin),
               direction=tuple(float(d) for d in direction.reshape(-1)))
    return Volume(lab.astype(np.float32), **geo), Volume(lab, **geo)


# the same physical grid stored three ways: as is (LPS), permuted + flipped (PIR-like), and rotated by 20 deg
PERM_FLIP = np.array([[0, 0, -1], [-1, 0, 0], [0, 1, 0]], dtype=float)   # array axes -> (-y, z, -x) world


class Oracle(torch.nn.Module):
    """A 'network' that labels voxels whose normalised intensity is above ``level`` (the object of a 0/1
    image after per-volume z-scoring): lets the whole inference path be checked exactly."""

    num_classes = 2

    def __init__(self, level: float = 0.0) -> None:
        super().__init__()
        self.level = level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = (x - self.level) * 50
        return torch.cat([-v, v], dim=1)


def half_level(img: Volume) -> float:
    """Where the value 0.5 of a 0/1 image lands after per-volume z-scoring (the object's boundary)."""
    a = img.array.astype(np.float64)
    return float((0.5 - a.mean()) / a.std())


def write_cases(root: Path, vols: dict[str, tuple[Volume, Volume]]) -> Manifest:
    for cid, (img, lab) in vols.items():
        write_volume(img, root / "images" / f"{cid}.nii.gz")
        write_volume(lab, root / "labels" / f"{cid}.nii.gz", label=True)
    return manifest_from_folders(root / "images", root / "labels", num_classes=2)


def test_axis_maps_are_exact_and_keep_physical_positions() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 6, 7)).astype(np.float32)
    for direction in (np.eye(3), PERM_FLIP, PERM_FLIP @ rotation_z(30), np.diag([-1.0, -1.0, 1.0])):
        v = Volume(a, (0.7, 1.1, 2.5), (10.0, -3.0, 5.0), tuple(direction.reshape(-1)))
        m = canonical_map(v.direction)
        c = m.volume(v)
        assert np.array_equal(m.invert(m.apply(a)), a)
        assert np.array_equal(m.invert(torch.from_numpy(m.apply(a).copy())).numpy(), a)
        d = np.asarray(c.direction).reshape(3, 3)
        assert np.all(np.diag(d) > 0.8), d                       # canonical: closest to the identity (LPS)
        # every voxel keeps its world position and value
        for _ in range(20):
            j = tuple(int(rng.integers(n)) for n in c.shape)
            i = [0, 0, 0]
            for k, p in enumerate(m.perm):
                i[p] = (v.shape[p] - 1 - j[k]) if m.flip[k] else j[k]
            w_old = np.asarray(v.origin) + np.asarray(v.direction).reshape(3, 3) @ (np.asarray(v.spacing) * i)
            w_new = np.asarray(c.origin) + d @ (np.asarray(c.spacing) * j)
            assert np.allclose(w_old, w_new) and c.array[j] == a[tuple(i)]
    assert orientation_code(np.eye(3).reshape(-1)) == "LPS"
    assert orientation_code(np.diag([-1.0, -1.0, 1.0]).reshape(-1)) == "RAS"
    assert orientation_code(PERM_FLIP.reshape(-1)) == "ASR"
    comp = AxisMap((2, 0, 1), (True, False, False)).then(AxisMap((1, 2, 0), (False, True, False)))
    assert np.array_equal(comp.apply(a), AxisMap((1, 2, 0), (False, True, False)).apply(
        AxisMap((2, 0, 1), (True, False, False)).apply(a)))


def test_flipped_and_oblique_copies_meet_on_one_working_grid_and_come_back_exactly(tmp_path: Path) -> None:
    """No resampling (all spacings equal the target): the flipped/permuted copy gives the SAME working arrays
    as the LPS original, the oblique copy keeps its voxels, and predictions come back equal to each case's
    own label (exact)."""
    shape, sp = (48, 40, 36), (1.0, 1.0, 1.0)
    vols = {"lps": sample(shape, sp, np.eye(3)),
            "permflip": sample(AxisMap((1, 2, 0)).shape(shape), AxisMap((1, 2, 0)).shape(sp), PERM_FLIP),
            "oblique": sample(shape, sp, rotation_z(20))}
    m = write_cases(tmp_path, vols)
    fp = compute_fingerprint(m)
    assert sorted(c["orientation"] for c in fp["cases"]) == ["ASR", "LPS", "LPS"]
    assert [c["oblique_deg"] for c in fp["cases"] if c["case_id"] == "oblique"] == [pytest.approx(20.0)]
    plan = make_plan(fp)
    assert plan.target_spacing == (1.0, 1.0, 1.0) and plan.slice_axis == 2 and not plan.anisotropic
    work = {}
    for c in m.cases:
        img, lab = vols[c.case_id]
        t, geo = prepare_image(plan, img)
        assert not geo.resampled
        work[c.case_id] = (t[0].numpy(), prepare_label(lab.array, geo))
    # the permuted + flipped copy is the same physical grid: the same working arrays, voxel for voxel (labels
    # exactly; images up to the float summation order of the per-volume mean / std)
    assert np.array_equal(work["lps"][1], work["permflip"][1])
    assert np.allclose(work["lps"][0], work["permflip"][0], atol=1e-6)
    # a training crop (the retrain sampler's cut) holds the object where the image is bright
    for cid, (im, lb) in work.items():
        centre = np.argwhere(lb > 0).mean(0).astype(int)
        start = tuple(int(c) - 8 for c in centre)
        ci, cl = crop(im, start, (16, 16, 16)), crop(lb, start, (16, 16, 16))
        assert cl.any() and np.array_equal(ci > 0, cl > 0), cid
    # inference with the plan gives labels in each case's own source geometry, exactly
    pre = {"normalize": "plan", "plan": plan.to_dict(), "spacing_factor": (1, 1, 1)}
    cfg = InferConfig(patch=(32, 32, 16), stride=(16, 16, 8), device="cpu")
    for cid, (img, lab) in vols.items():
        pred = segment_volume(Oracle(half_level(img)), img, cfg, pre)
        assert pred.same_geometry(img) and np.array_equal(pred.array, lab.array), cid


def test_anisotropic_sagittal_data_slices_along_the_thick_axis_and_round_trips(tmp_path: Path) -> None:
    """Thick sagittal slices (x spacing 3.5-5 mm, 1 mm in-plane): the anisotropy rule keeps x coarse (10th
    percentile of the x spacings), x becomes the slice axis (last working axis), the cases are resampled,
    and predictions mapped back reach Dice >= 0.99 against the source labels."""
    vols = {}
    for k, sx in enumerate((4.0, 5.0, 3.5, 4.0)):
        shape = (int(round(64 / sx)) + 1, 64, 60)
        vols[f"c{k}"] = sample(shape, (sx, 1.0, 1.0), np.eye(3) if k % 2 == 0 else np.diag([-1.0, -1.0, 1.0]))
    m = write_cases(tmp_path, vols)
    plan = plan_for(m)
    assert plan.anisotropic and plan.slice_axis == 0 and plan.working_order == (1, 2, 0)
    assert plan.target_spacing[0] == pytest.approx(np.percentile([4.0, 5.0, 3.5, 4.0], 10))
    assert plan.target_spacing[1:] == (1.0, 1.0)
    pre = {"normalize": "plan", "plan": plan.to_dict(), "spacing_factor": (1, 1, 1)}
    cfg = InferConfig(patch=(32, 32, 16), stride=(16, 16, 8), device="cpu")
    for cid, (img, lab) in vols.items():
        t, geo = prepare_image(plan, img)
        assert geo.resampled and geo.working_shape[2] != img.shape[0] and geo.working_shape[:2] == (64, 60)
        wl = prepare_label(lab.array, geo)
        assert wl.shape == geo.working_shape
        # the resampled label is the object on the working grid (same extent, voxel centres moved by
        # align_corners=False resampling): compare with the object sampled there
        o = geo.amap.volume(img)
        work_sp = np.asarray(o.spacing) * np.asarray(o.shape) / np.asarray(geo.working_shape)
        d = np.asarray(o.direction).reshape(3, 3)
        origin = np.asarray(o.origin) + d @ ((work_sp - np.asarray(o.spacing)) / 2)
        truth = object_on(geo.working_shape, work_sp, origin, d)

        def centroid(mask: np.ndarray) -> np.ndarray:   # world mm
            return origin + d @ (np.argwhere(mask > 0).mean(0) * work_sp)

        # nearest-neighbour resampling of 3.5-5 mm slices: a few boundary voxels move, the object does not
        assert compute_case(wl, truth, tuple(work_sp), 2)["dice"][0] > 0.93
        assert np.abs(centroid(wl) - centroid(truth)).max() < work_sp.max() / 4
        assert compute_case((t[0].numpy() > half_level(img)).astype(np.uint8), wl, tuple(work_sp),
                            2)["dice"][0] > 0.93
        pred = segment_volume(Oracle(half_level(img)), img, cfg, pre)
        assert pred.same_geometry(img)
        assert compute_case(pred.array, lab.array, img.spacing, 2)["dice"][0] >= 0.99, cid


def test_ct_plan_clips_to_foreground_percentiles_and_uses_dataset_statistics(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    img, lab = sample((32, 32, 24), (1.0, 1.0, 2.0), np.eye(3))
    hu = np.where(lab.array > 0, 60 + 10 * rng.normal(size=lab.shape), -1000.0).astype(np.float32)
    write_volume(img.with_array(hu), tmp_path / "images" / "ct.nii.gz")
    write_volume(lab, tmp_path / "labels" / "ct.nii.gz", label=True)
    m = manifest_from_folders(tmp_path / "images", tmp_path / "labels", num_classes=2)
    from dataclasses import replace

    plan = plan_for(replace(m, modality="CT"))
    norm = plan.normalization
    assert norm["scheme"] == "ct" and 20 < norm["clip"][0] < 45 and 75 < norm["clip"][1] < 100
    assert norm["mean"] == pytest.approx(60, abs=2) and norm["std"] == pytest.approx(10, abs=1.5)
    z = plan.zscore(hu)
    assert z.min() == pytest.approx((norm["clip"][0] - norm["mean"]) / norm["std"], rel=1e-5)
    assert plan.unit_window() == tuple(norm["clip"])
    # SAM's input: the HU window scaled to [0, 1] (air clipped to 0), on the working grid
    from cfrseg.sam.mosaic import MosaicSpec, prepare_case

    pv, geo = prepare_case(plan, MosaicSpec(image_size=64, crop=(16, 16, 4), spacing_factor=(1.0, 1.0, 1.0)),
                           img.with_array(hu), None, 2, torch.device("cpu"))
    assert float(pv.image.min()) == 0.0 and float(pv.image.max()) == 1.0
    assert tuple(pv.image.shape) == (32, 32, 24)
    # MR of the same data: per-volume z-score, no window
    mr = plan_for(m)
    assert mr.normalization == {"scheme": "per_volume"} and mr.unit_window() is None
    assert mr.zscore(hu).mean() == pytest.approx(0, abs=1e-4)


def test_plan_command_prints_and_writes_the_plan(tmp_path: Path, capsys) -> None:
    from cfrseg.cli import main

    vols = {"a": sample((24, 20, 12), (0.8, 0.8, 3.0), np.eye(3)), "b": sample((20, 24, 12), (0.8, 0.8, 3.0),
                                                                              np.diag([-1.0, -1.0, 1.0]))}
    write_cases(tmp_path / "d", vols)
    assert main(["plan", "--data", str(tmp_path / "d"), "--num-classes", "2",
                 "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "target spacing (0.8, 0.8, 3) mm, slice axis z" in out and "'LPS', 'RAS'" in out
    saved = __import__("json").loads((tmp_path / "o" / "plan.json").read_text())
    assert Plan.from_dict(saved).slice_axis == 2
    assert main(["plan", "--data", str(tmp_path / "d")]) == 2          # classes are explicit for folders
    assert "--num-classes" in capsys.readouterr().err


def test_classes_without_labeled_voxels_are_an_error_naming_them(tmp_path: Path) -> None:
    img, lab = sample((24, 24, 16), (1, 1, 1), np.eye(3))
    write_volume(img, tmp_path / "images" / "a.nii.gz")
    write_volume(lab.with_array(lab.array * 3), tmp_path / "labels" / "a.nii.gz", label=True)
    m = manifest_from_folders(tmp_path / "images", tmp_path / "labels", num_classes=4)
    with pytest.raises(InputError, match=r"class\(es\) 1 \(class_1\), 2 \(class_2\) have no voxel"):
        compute_fingerprint(m)


def test_lite_spacing_factors_reproduce_the_former_zoom_grids() -> None:
    """LA (0.625 mm): lite's spacing factors 1/0.33 (SAM, in-plane), 2 (SAM slices; the 3D network) give
    exactly the shapes the former zoom factors 0.33 / 0.5 gave, for every size except exact rounding ties
    (n * 0.33 = k + 0.5: n = 150, 250, which no LA case has), where float rounding may differ by one voxel."""
    from cfrseg.config import load_profile

    plan = Plan("MR", (0.625, 0.625, 0.625), 2)
    lite = load_profile("lite")
    assert lite["finetune"]["spacing_factor"] == [1 / 0.33, 1 / 0.33, 2.0]
    for n in (n for n in range(60, 260) if n % 100 not in (49, 50)):
        shape = (n, n + 1, 88)
        sam = target_shape(shape, (0.625,) * 3, plan.working_spacing(lite["finetune"]["spacing_factor"]))
        assert sam == tuple(max(1, int(round(s * z))) for s, z in zip(shape, (0.33, 0.33, 0.5)))
        net = target_shape(shape, (0.625,) * 3, plan.working_spacing(lite["retrain"]["spacing_factor"]))
        assert net == tuple(max(1, int(round(s * 0.5))) for s in shape)
    med = Plan("MR", (0.625,) * 3, 2, median_shape=(192, 143, 88))
    assert med.patch_voxels((80, 80, 60), (2, 2, 2)) == (64, 64, 48)
    assert med.patch_voxels((70, 70, 50)) == (112, 112, 80)
    assert med.patch_voxels((500, 500, 500)) == (192, 144, 96)          # capped at the median case


def test_plan_round_trips_and_rejects_bad_values() -> None:
    p = Plan("CT", (0.8, 0.8, 2.5), 2, {"scheme": "ct", "clip": [-100.0, 200.0], "mean": 50.0, "std": 30.0},
             (256, 256, 80), True, "abc")
    assert Plan.from_dict(p.to_dict()) == p and p.digest() == Plan.from_dict(p.to_dict()).digest()
    from cfrseg.errors import ConfigError

    with pytest.raises(ConfigError, match="slice_axis"):
        Plan("MR", (1, 1, 1), 3)
    with pytest.raises(ConfigError, match="CT normalization needs"):
        Plan("CT", (1, 1, 1), 2, {"scheme": "ct"})
    with pytest.raises(ConfigError, match="orientation"):
        Plan("MR", (1, 1, 1), 2, orientation="RAS")


def test_case_records_are_geometry_independent_of_paths(tmp_path: Path) -> None:
    img, lab = sample((16, 16, 8), (1, 1, 1), np.eye(3))
    write_volume(img, tmp_path / "a" / "x.nii.gz")
    write_volume(img, tmp_path / "b" / "x.nii.gz")
    from cfrseg.provenance import digest, manifest_record

    ma = Manifest("a", 2, (Case("x", str(tmp_path / "a" / "x.nii.gz"), None, "unlabeled"),))
    mb = Manifest("b", 2, (Case("x", str(tmp_path / "b" / "x.nii.gz"), None, "unlabeled"),))
    assert digest(manifest_record(ma)) == digest(manifest_record(mb))   # contents, not paths or names
