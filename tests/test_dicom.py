"""The core DICOM module (cfrseg.dicom) and the two cfrseg.data.io DICOM fixes, without any server: geometry
pre-checks and their reason codes, loading an oblique series exactly, SEG writing whose frames follow the
geometry whatever the source order, the post-check catching a misplaced SEG, LABELMAP and odd frame sizes,
coded concepts. Source fixtures are written with pydicom (tests/dicom_fixtures.py)."""

from __future__ import annotations

import random
import shutil
import subprocess

import numpy as np
import pytest

pytest.importorskip("highdicom")

from cfrseg.data.io import read_dicom_series, write_dicom_series
from cfrseg.data.volume import Volume
from cfrseg.dicom import DicomInputError
from cfrseg.dicom.codes import CodeSpec, SegmentSpec, default_segments
from cfrseg.dicom.seg import AlgorithmInfo, check_seg, seg_to_label, to_bytes, write_seg
from cfrseg.dicom.series import check_series, load_series, read_metadata, scan_series
from cfrseg.errors import ConfigError, InputError
from tests.dicom_fixtures import ENHANCED_MR, mr_series, rotation

SEGS = [SegmentSpec.from_dict({"value": 1, "label": "Left atrium"}),
        SegmentSpec.from_dict({"value": 2, "label": "LV", "rgb": [200, 30, 30]})]
ALGO = AlgorithmInfo(version="run-test", network="vnet", model_sha256="ab" * 32)


def _load(files):
    metas = read_metadata(files)
    geom = check_series(metas, min_slices=6)
    return metas, geom, load_series(files, geom)


def _label(vol: Volume) -> np.ndarray:
    lab = (vol.array > 500).astype(np.uint8)
    lab[:, : vol.shape[1] // 2][lab[:, : vol.shape[1] // 2] == 1] = 2   # two classes, asymmetric
    return lab


# ---------------------------------------------------------------------------------------------- series


def test_oblique_series_loads_exactly_whatever_the_file_order(tmp_path) -> None:
    s = mr_series(tmp_path, shape=(20, 16, 8))
    files = list(s.files)
    random.Random(3).shuffle(files)
    metas, geom, vol = _load(files)
    assert vol.shape == (20, 16, 8)
    assert np.array_equal(vol.array, s.array)
    assert np.allclose(vol.spacing, s.spacing, atol=1e-6)
    assert np.allclose(vol.origin, s.origin, atol=1e-6)
    assert np.allclose(np.reshape(vol.direction, (3, 3)), s.direction, atol=1e-7)
    assert list(geom.sop_instance_uids) == s.sop_uids
    info = scan_series(metas)
    assert (info.modality, info.num_instances, info.max_frames, info.is_own_output) == ("MR", 8, 1, False)


@pytest.mark.parametrize("kw, code, words", [
    ({"skip": (3,)}, "irregular_geometry", "gap of 5 mm after slice 3 (expected 2.5 mm)"),
    ({"duplicate": (2,)}, "irregular_geometry", "duplicate slice position"),
    ({"tilt_slice": 4}, "irregular_geometry", "mixed orientations"),
    ({"spacing_between": 1.0}, "irregular_geometry", "SpacingBetweenSlices 1 mm differs"),
    ({"shape": (20, 16, 4)}, "too_few_slices", "4 slice(s); at least 6"),
    ({"sop_class": ENHANCED_MR}, "multiframe_unsupported", "Enhanced MR"),
    ({"number_of_frames": 3}, "multiframe_unsupported", "3 frames"),
])
def test_precheck_reason_codes(tmp_path, kw, code, words) -> None:
    s = mr_series(tmp_path, **kw)
    with pytest.raises(DicomInputError) as e:
        check_series(read_metadata(s.files), min_slices=6)
    assert e.value.code == code and words in e.value.detail, e.value.detail


def test_mixed_frame_of_reference_and_tilted_stack(tmp_path) -> None:
    import pydicom

    s = mr_series(tmp_path / "a")
    ds = pydicom.dcmread(s.files[0])
    ds.FrameOfReferenceUID = "1.2.3.4"
    ds.save_as(s.files[0])
    with pytest.raises(DicomInputError, match="FrameOfReferenceUID"):
        check_series(read_metadata(s.files))
    t = mr_series(tmp_path / "b")   # shear: every slice moved sideways in-plane (gantry tilt)
    for f in t.files:
        ds = pydicom.dcmread(f)
        k = int(ds.InstanceNumber)
        ds.ImagePositionPatient = [float(v) + 0.4 * k * t.direction[0, 0] for v in ds.ImagePositionPatient]
        ds.save_as(f)
    with pytest.raises(DicomInputError, match="not stacked along the slice normal"):
        check_series(read_metadata(t.files))


@pytest.mark.parametrize("ts", ["RLE", "JPEGLS"])
def test_compressed_series_decode_exactly(tmp_path, ts) -> None:
    s = mr_series(tmp_path, transfer_syntax=ts)
    metas, _, vol = _load(s.files)
    assert np.array_equal(vol.array, s.array)
    assert scan_series(metas).transfer_syntaxes[0] != "1.2.840.10008.1.2.1"


# ---------------------------------------------------------------------------------------------- SEG


@pytest.mark.parametrize("seg_type", ["BINARY", "LABELMAP"])
def test_seg_roundtrip_oblique_with_shuffled_sources(tmp_path, seg_type) -> None:
    s = mr_series(tmp_path, shape=(20, 16, 10))
    files = list(s.files)
    metas, geom, vol = _load(files)
    lab = _label(vol)
    shuffled = list(metas)
    random.Random(1).shuffle(shuffled)   # the list order must not matter (highdicom #117, #214)
    ds = write_seg(shuffled, geom, vol.with_array(lab), SEGS, ALGO, seg_type=seg_type)
    data = to_bytes(ds)
    out = check_seg(data, metas, geom, lab, SEGS)
    assert out["segments"] == (2 if seg_type == "BINARY" else 3)  # LABELMAP adds the background segment
    assert np.array_equal(seg_to_label(data, geom), lab)
    assert ds.StudyInstanceUID == s.study_uid and ds.FrameOfReferenceUID == s.frame_uid
    assert ds.SeriesInstanceUID != s.series_uid and ds.Modality == "SEG"
    assert ds.Manufacturer == "cfrseg" and "research use" in ds.SeriesDescription
    seg1 = ds.SegmentSequence[-1]
    assert seg1.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
    assert seg1.SegmentAlgorithmName == "cfrseg"
    assert any(e.Manufacturer == "cfrseg" for e in ds.ContributingEquipmentSequence)
    # each frame sits where its source instance is
    by_uid = {m.SOPInstanceUID: m for m in metas}
    for fr in ds.PerFrameFunctionalGroupsSequence:
        src = by_uid[fr.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        assert np.allclose([float(v) for v in fr.PlanePositionSequence[0].ImagePositionPatient],
                           [float(v) for v in src.ImagePositionPatient], atol=1e-4)


def test_dciodvfy_accepts_the_binary_seg(tmp_path) -> None:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed (Debian dicom3tools; scripts/setup.sh --services)")
    s = mr_series(tmp_path / "src")
    metas, geom, vol = _load(s.files)
    f = tmp_path / "seg.dcm"
    f.write_bytes(to_bytes(write_seg(metas, geom, vol.with_array(_label(vol)), SEGS, ALGO)))
    r = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True, timeout=60, check=False)
    errors = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("Error")]
    assert not errors, errors


def test_post_check_catches_misplaced_content_and_wrong_source(tmp_path) -> None:
    s = mr_series(tmp_path / "a", shape=(20, 16, 10))
    metas, geom, vol = _load(s.files)
    lab = _label(vol)
    data = to_bytes(write_seg(metas, geom, vol.with_array(lab), SEGS, ALGO))
    with pytest.raises(DicomInputError, match="content differs"):
        check_seg(data, metas, geom, np.roll(lab, 1, axis=2), SEGS)
    other = mr_series(tmp_path / "b", shape=(20, 16, 10))
    ometas, ogeom, _ = _load(other.files)
    with pytest.raises(DicomInputError) as e:
        check_seg(data, ometas, ogeom)
    assert e.value.code == "seg_check_failed"


def test_label_must_lie_on_the_source_grid_and_values_need_segments(tmp_path) -> None:
    s = mr_series(tmp_path)
    metas, geom, vol = _load(s.files)
    shifted = Volume(_label(vol), vol.spacing, tuple(np.add(vol.origin, 0.3)), vol.direction)
    with pytest.raises(DicomInputError) as e:
        write_seg(metas, geom, shifted, SEGS, ALGO)
    assert e.value.code == "geometry_mismatch"
    with pytest.raises(DicomInputError, match=r"label value\(s\) \[3\]"):
        write_seg(metas, geom, vol.with_array(np.full(vol.shape, 3, np.uint8)), SEGS, ALGO)


def test_binary_seg_with_odd_frame_size_reads_back(tmp_path) -> None:
    """BINARY frames are bit-packed without byte alignment (17 x 13 bits per frame here)."""
    s = mr_series(tmp_path, shape=(17, 13, 7), rot=(33.0, -12.0), origin=(250.0, -260.0, 310.0))
    metas, geom, vol = _load(s.files)
    lab = (vol.array > 500).astype(np.uint8)
    data = to_bytes(write_seg(metas, geom, vol.with_array(lab), SEGS[:1], ALGO, omit_empty_frames=False))
    assert np.array_equal(seg_to_label(data, geom), lab)


def test_empty_label_gives_a_valid_seg(tmp_path) -> None:
    s = mr_series(tmp_path)
    metas, geom, vol = _load(s.files)
    zero = np.zeros(vol.shape, np.uint8)
    data = to_bytes(write_seg(metas, geom, vol.with_array(zero), SEGS, ALGO))
    check_seg(data, metas, geom, zero, SEGS)


# ---------------------------------------------------------------------------------------------- codes


def test_codes() -> None:
    c = CodeSpec.parse("SCT:82471001:Left atrium")
    assert (c.scheme, c.value, c.meaning) == ("SCT", "82471001", "Left atrium")
    for bad in ("82471001", "SCT::x", "SRT:T-32300:Left atrium", 5):
        with pytest.raises(ConfigError):
            CodeSpec.parse(bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="give its 'type' code"):
        SegmentSpec.from_dict({"value": 1, "label": "Thing"})
    with pytest.raises(ConfigError, match="1..65535"):
        SegmentSpec.from_dict({"value": 0, "label": "LA"})
    segs = default_segments(["Left atrium", "scar"])
    assert [str(s.type) for s in segs] == ["SCT:82471001:Left atrium", "SCT:85756007:Tissue"]


# ---------------------------------------------------------------------------------------------- cfrseg.data.io


def test_read_dicom_series_refuses_a_missing_slice_naming_the_gap(tmp_path) -> None:
    s = mr_series(tmp_path, skip=(3,))
    with pytest.raises(InputError, match=r"gap of 5 mm after slice 3 of 7 \(expected 2.5 mm\)"):
        read_dicom_series(tmp_path)
    full = mr_series(tmp_path / "ok", rot=(25.0, 20.0))
    v = read_dicom_series(full.folder)    # a regular oblique series is not mistaken for an irregular one
    assert np.array_equal(v.array, full.array) and np.allclose(v.spacing, full.spacing, atol=1e-6)
    assert s.files


def test_write_dicom_series_writes_spacing_between_slices(tmp_path) -> None:
    import pydicom

    import locale

    d = tuple(rotation(20, 15).reshape(-1))
    v = Volume(np.arange(10 * 12 * 8, dtype=np.int16).reshape(10, 12, 8), (0.7, 0.8, 2.5), (-40, -30, 20), d)
    before = locale.setlocale(locale.LC_ALL)
    files = write_dicom_series(v, tmp_path)
    assert locale.setlocale(locale.LC_ALL) == before   # GDCM's writer switches the process locale to "C"
    ds = pydicom.dcmread(files[0])
    assert float(ds.SpacingBetweenSlices) == pytest.approx(2.5) and "NumberOfFrames" not in ds
    back = read_dicom_series(tmp_path)
    assert back.same_geometry(v) and np.array_equal(back.array, v.array)
    metas = read_metadata(files)
    assert check_series(metas, min_slices=2).spacing[2] == pytest.approx(2.5)  # passes the SBS pre-check
