"""cfrseg.data.io: geometry round trips for every format, the LA reader on real data, and bad input."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import SimpleITK as sitk

from cfrseg.data.io import (
    LA_SPACING,
    list_dicom_series,
    read_la_h5,
    read_volume,
    write_dicom_series,
    write_volume,
)
from cfrseg.data.volume import IDENTITY, Volume
from cfrseg.errors import InputError


def rotation(ax: float, ay: float, az: float) -> tuple[float, ...]:
    """A proper rotation (det +1) as ITK's row-major 3x3 direction."""
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return tuple(float(v) for v in (rz @ ry @ rx).ravel())


OBLIQUE = rotation(0.2, -0.1, 0.35)
SPACING = (0.7, 0.9, 2.5)
ORIGIN = (-12.5, 30.25, 7.0)


def make_volume(dtype=np.int16, shape=(7, 5, 4), direction=OBLIQUE) -> Volume:
    rng = np.random.default_rng(0)
    if np.issubdtype(dtype, np.floating):
        a = rng.normal(size=shape).astype(dtype)
    else:
        a = rng.integers(0, 200, size=shape).astype(dtype)
    a[0, 0, 0] = 0
    return Volume(a, SPACING, ORIGIN, direction)


def assert_same(a: Volume, b: Volume, exact: bool = True) -> None:
    assert a.shape == b.shape
    if exact:
        np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.spacing, b.spacing, atol=1e-5)
    np.testing.assert_allclose(a.origin, b.origin, atol=1e-4)
    np.testing.assert_allclose(a.direction, b.direction, atol=1e-5)
    assert a.same_geometry(b)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"])
@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_roundtrip_file_formats(tmp_path: Path, suffix: str, dtype) -> None:
    v = make_volume(dtype)
    p = write_volume(v, tmp_path / f"vol{suffix}")
    back = read_volume(p)
    assert back.array.dtype == dtype
    assert_same(v, back)
    # [x, y, z] convention: voxel index (i, j, k) is at origin + D @ (spacing * index)
    img = sitk.ReadImage(str(p))
    pt = img.TransformIndexToPhysicalPoint((3, 2, 1))
    d = np.array(v.direction).reshape(3, 3)
    np.testing.assert_allclose(pt, np.array(ORIGIN) + d @ (np.array(SPACING) * [3, 2, 1]), atol=1e-3)
    assert img.GetPixel(3, 2, 1) == pytest.approx(float(v.array[3, 2, 1]))
    assert not list(tmp_path.glob(".tmp-*"))


def test_roundtrip_identity_direction_and_labels(tmp_path: Path) -> None:
    lab = Volume(np.zeros((6, 5, 4), np.int64), (1.0, 1.0, 3.0), (1.0, 2.0, 3.0), IDENTITY)
    lab.array[2:4, 1:3, 1:3] = 3
    p = write_volume(lab, tmp_path / "lab.nii.gz", label=True)
    back = read_volume(p)
    assert back.array.dtype == np.uint8
    assert_same(lab, back)
    big = lab.with_array(lab.array * 100)
    assert read_volume(write_volume(big, tmp_path / "big.nrrd", label=True)).array.dtype == np.uint16
    boolean = lab.with_array(lab.array > 0)
    assert read_volume(write_volume(boolean, tmp_path / "b.mha")).array.dtype == np.uint8


@pytest.mark.parametrize("modality", ["MR", "CT"])
def test_roundtrip_dicom_series_integer(tmp_path: Path, modality: str) -> None:
    v = make_volume(np.int16)
    v.array[1, 1, 1] = -300
    files = write_dicom_series(v, tmp_path / "dcm", modality=modality)
    assert len(files) == v.shape[2]
    back = read_volume(tmp_path / "dcm")
    assert_same(v, back)
    import pydicom

    ds = pydicom.dcmread(files[0])
    assert ds.Modality == modality
    assert ds.FrameOfReferenceUID and float(ds.SliceThickness) == pytest.approx(SPACING[2])
    assert len({pydicom.dcmread(f).SOPInstanceUID for f in files}) == len(files)


def test_roundtrip_dicom_series_float_and_labels(tmp_path: Path) -> None:
    v = make_volume(np.float32)
    write_dicom_series(v, tmp_path / "f")
    back = read_volume(tmp_path / "f")
    step = (v.array.max() - v.array.min()) / 65000
    np.testing.assert_allclose(back.array, v.array, atol=step)
    assert_same(v, back, exact=False)
    lab = v.with_array((v.array > 0).astype(np.uint8))
    write_dicom_series(lab, tmp_path / "l")
    np.testing.assert_array_equal(read_volume(tmp_path / "l").array, lab.array)


def test_dicom_folder_with_two_series(tmp_path: Path) -> None:
    v = make_volume(np.int16, direction=IDENTITY)
    write_dicom_series(v, tmp_path / "d" / "a", series_uid="1.2.3.1")
    w = v.with_array(v.array + 7)
    write_dicom_series(w, tmp_path / "d" / "b", series_uid="1.2.3.2")
    for f in (tmp_path / "d" / "b").iterdir():
        f.rename(tmp_path / "d" / "a" / f"b_{f.name}")
    folder = tmp_path / "d" / "a"
    assert sorted(list_dicom_series(folder)) == ["1.2.3.1", "1.2.3.2"]
    with pytest.raises(InputError, match=r"2 DICOM series.*1\.2\.3\.1.*1\.2\.3\.2"):
        read_volume(folder)
    np.testing.assert_array_equal(read_volume(folder, series_uid="1.2.3.2").array, w.array)
    with pytest.raises(InputError, match="no DICOM series '9.9'"):
        read_volume(folder, series_uid="9.9")


def test_dicom_series_is_a_valid_seg_source(tmp_path: Path) -> None:
    hd = pytest.importorskip("highdicom")
    import pydicom

    v = make_volume(np.int16)
    files = write_dicom_series(v, tmp_path / "s", modality="CT")
    sources = [pydicom.dcmread(f) for f in files]
    mask = np.zeros((len(files), v.shape[1], v.shape[0]), bool)  # frames [z, rows=y, cols=x]
    mask[1, 1:3, 2:5] = True
    desc = hd.seg.SegmentDescription(
        segment_number=1, segment_label="fg",
        segmented_property_category=hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure"),
        segmented_property_type=hd.sr.CodedConcept("82471001", "SCT", "Left atrium"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[desc], series_instance_uid=hd.UID(), series_number=2,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="cfrseg",
        manufacturer_model_name="test", software_versions="0", device_serial_number="0")
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID


def test_read_la_h5_synthetic(tmp_path: Path) -> None:
    p = tmp_path / "mri_norm2.h5"
    img = np.random.default_rng(1).normal(size=(9, 8, 6)).astype(np.float32)
    with h5py.File(p, "w") as f:
        f["image"] = img
        f["label"] = (img > 0).astype(np.uint8)
    v = read_la_h5(p)
    np.testing.assert_array_equal(v.array, img)  # stored [x, y, z]: no transpose
    assert v.spacing == LA_SPACING and v.origin == (0.0, 0.0, 0.0) and v.direction == IDENTITY
    assert read_la_h5(p, "label", spacing=(1.0, 1.0, 2.0)).spacing == (1.0, 1.0, 2.0)
    assert read_volume(p).shape == (9, 8, 6)
    with pytest.raises(InputError, match=r"no dataset 'label_full'.*\['image', 'label'\]"):
        read_la_h5(p, "label_full")


@pytest.mark.la
def test_read_la_h5_real(la_dir: Path, la_ids: list[str]) -> None:
    for cid in la_ids[:2]:
        img = read_la_h5(la_dir / cid / "mri_norm2.h5")
        lab = read_la_h5(la_dir / cid / "mri_norm2.h5", "label")
        assert img.shape == lab.shape and img.shape[2] == 88 and 140 <= img.shape[0] <= 250
        assert img.array.dtype == np.float32 and lab.array.dtype == np.uint8
        assert set(np.unique(lab.array).tolist()) == {0, 1}
        assert img.same_geometry(lab) and img.spacing == LA_SPACING


# ------------------------------------------------------------------------------------------------ bad input


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nope\.nii\.gz: file not found"):
        read_volume(tmp_path / "nope.nii.gz")
    with pytest.raises(InputError, match=r"x\.h5: file not found"):
        read_la_h5(tmp_path / "x.h5")


def test_not_a_volume(tmp_path: Path) -> None:
    p = tmp_path / "notes.nii.gz"
    p.write_text("hello, not an image")
    with pytest.raises(InputError, match=r"notes\.nii\.gz: cannot read volume"):
        read_volume(p)
    q = tmp_path / "notes.txt"
    q.write_text("x")
    with pytest.raises(InputError, match=r"notes\.txt: unsupported file type"):
        read_volume(q)
    h = tmp_path / "bad.h5"
    h.write_bytes(b"\x00" * 100)
    with pytest.raises(InputError, match=r"bad\.h5: cannot read h5 file"):
        read_la_h5(h)


def test_truncated_file(tmp_path: Path) -> None:
    p = write_volume(make_volume(np.float32, shape=(30, 30, 20)), tmp_path / "v.nii")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"v\.nii: truncated file"):
        read_volume(p)
    g = write_volume(make_volume(np.float32, shape=(30, 30, 20)), tmp_path / "v.nii.gz")
    g.write_bytes(g.read_bytes()[:200])
    with pytest.raises(InputError, match=r"v\.nii\.gz"):
        read_volume(g)


def test_2d_image_rejected(tmp_path: Path) -> None:
    p = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((6, 5), np.float32)), str(p))
    with pytest.raises(InputError, match=r"slice\.nii\.gz: 2D image of shape \(5, 6\)"):
        read_volume(p)
    q = tmp_path / "thin.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((1, 6, 5), np.float32)), str(q))
    with pytest.raises(InputError, match=r"shape \(5, 6, 1\) is a single slice"):
        read_volume(q)
    h = tmp_path / "flat.h5"
    with h5py.File(h, "w") as f:
        f["image"] = np.zeros((4, 4), np.float32)
    with pytest.raises(InputError, match=r"flat\.h5: 'image' has shape \(4, 4\) \(2D\)"):
        read_la_h5(h)


def test_4d_and_vector_images_rejected(tmp_path: Path) -> None:
    p = tmp_path / "t.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([sitk.Image(4, 5, 6, sitk.sitkFloat32)] * 3), str(p))
    with pytest.raises(InputError, match=r"t\.nii\.gz: 4D image of shape \(4, 5, 6, 3\)"):
        read_volume(p)
    one = tmp_path / "one.nii.gz"  # a 3D volume stored as 4D with a single time point is accepted
    sitk.WriteImage(sitk.JoinSeries([sitk.Image(4, 5, 6, sitk.sitkFloat32)]), str(one))
    assert read_volume(one).shape == (4, 5, 6)
    rgb = tmp_path / "rgb.mha"
    sitk.WriteImage(sitk.Image([4, 5, 6], sitk.sitkVectorFloat32, 3), str(rgb))
    with pytest.raises(InputError, match=r"rgb\.mha: vector image with 3 components"):
        read_volume(rgb)


def test_empty_folder_is_not_a_dicom_series(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no DICOM series found"):
        read_volume(tmp_path / "empty")


def test_write_rejects_bad_volumes(tmp_path: Path) -> None:
    v = make_volume(np.float32)
    with pytest.raises(InputError, match=r"cannot write this file type"):
        write_volume(v, tmp_path / "v.png")
    with pytest.raises(InputError, match=r"shape \(4, 4\).*must be 3D"):
        write_volume(Volume(np.zeros((4, 4))), tmp_path / "v.nii.gz")
    with pytest.raises(InputError, match="non-integer"):
        write_volume(v, tmp_path / "l.nii.gz", label=True)
    with pytest.raises(InputError, match="negative"):
        write_volume(v.with_array(np.full((2, 2, 2), -1)), tmp_path / "l.nii.gz", label=True)
