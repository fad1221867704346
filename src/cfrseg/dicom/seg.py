"""DICOM Segmentation (SEG) objects with highdicom: write one for a label map, check it against its source
series, read it back to a label map.

The label map goes to highdicom as an ``hd.Volume`` built from cfrseg's own geometry (spacing, origin,
direction), matched to the source series' geometry with ``match_geometry`` (axis permutations and flips
only, no resampling): highdicom then places each frame by position, so a frame can never land on the wrong
slice whatever the order of the source list (docs/pacs.md, "Geometry"). :func:`check_seg` re-reads written
bytes and compares, frame by frame, positions, orientation, pixel spacing, the referenced instances, the frame
of reference, the study and patient identifiers, and the content in physical space.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cfrseg.data.volume import Volume
from cfrseg.dicom import DicomInputError
from cfrseg.dicom.codes import SegmentSpec
from cfrseg.dicom.series import Geometry

SEG_TYPES = ("BINARY", "LABELMAP")
BINARY_SEG = "1.2.840.10008.5.1.4.1.1.66.4"
LABELMAP_SEG = "1.2.840.10008.5.1.4.1.1.66.7"
POS_TOL_MM = 1e-3
COPIED = ("StudyInstanceUID", "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber",
          "StudyID", "FrameOfReferenceUID")


@dataclass(frozen=True)
class AlgorithmInfo:
    """Who made the segmentation: goes into the segment descriptions and the equipment modules."""

    name: str = "cfrseg"           # AlgorithmName
    version: str = ""              # AlgorithmVersion: the model id
    network: str = ""              # ManufacturerModelName (e.g. "vnet")
    model_sha256: str = ""         # DeviceSerialNumber = its first 16 hex digits
    software_version: str = ""     # cfrseg version (default: the installed one)

    def __post_init__(self) -> None:
        if not self.name or not self.version:
            raise DicomInputError("bad_request", "algorithm name and version (model id) are required")


def source_geometry(g: Geometry) -> Any:
    """The ``hd.VolumeGeometry`` of a checked series. highdicom stacks frames against the slice normal from
    the given position, so the position is the LAST slice along the normal (index 0 = last slice)."""
    import highdicom as hd

    last = np.asarray(g.origin) + np.asarray(g.normal) * (g.positions[-1] - g.positions[0])
    return hd.VolumeGeometry.from_attributes(
        image_position=[float(v) for v in last], image_orientation=[*g.row_cosine, *g.column_cosine],
        rows=g.rows, columns=g.columns, pixel_spacing=[g.spacing[1], g.spacing[0]],
        spacing_between_slices=g.spacing[2], number_of_frames=g.num_slices, coordinate_system="PATIENT",
        frame_of_reference_uid=g.frame_of_reference_uid)


def _hd_volume(array: np.ndarray, v: Volume, frame_uid: str) -> Any:
    import highdicom as hd

    return hd.Volume.from_components(array, spacing=[float(s) for s in v.spacing], position=[float(o) for o in v.origin],
                                     direction=[float(d) for d in v.direction], coordinate_system="PATIENT",
                                     frame_of_reference_uid=frame_uid)


def segment_numbers(label: np.ndarray, segments: Sequence[SegmentSpec]) -> np.ndarray:
    """The label map relabelled to SEG segment numbers 1..S (segments in order of value); background 0.
    A label value without a segment is refused (the route's segment list must cover the model's classes)."""
    values = [s.value for s in segments]
    if len(set(values)) != len(values):
        raise DicomInputError("bad_request", f"duplicate segment values {values}")
    a = np.asarray(label)
    if not np.issubdtype(a.dtype, np.integer):
        if not np.all(a == np.round(a)):
            raise DicomInputError("bad_request", "label map has non-integer values")
        a = a.astype(np.int64)
    present = set(np.unique(a).tolist()) - {0}
    extra = sorted(present - set(values))
    if extra:
        raise DicomInputError("bad_request", f"label value(s) {extra} have no segment (segments: {values})")
    lut = np.zeros(int(max([*values, *present, 0])) + 1, dtype=np.uint16)
    for i, s in enumerate(sorted(segments, key=lambda s: s.value), start=1):
        lut[s.value] = i
    out = lut[a]
    return out.astype(np.uint8 if len(values) < 256 else np.uint16)


def _descriptions(segments: Sequence[SegmentSpec], algorithm: AlgorithmInfo) -> list[Any]:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algo = hd.AlgorithmIdentificationSequence(name=algorithm.name, family=codes.DCM.ArtificialIntelligence,
                                              version=algorithm.version)
    out = []
    for i, s in enumerate(sorted(segments, key=lambda s: s.value), start=1):
        color = hd.color.CIELabColor.from_rgb(*s.rgb) if s.rgb is not None else None
        out.append(hd.seg.SegmentDescription(
            segment_number=i, segment_label=s.label, segmented_property_category=s.category.to_code(),
            segmented_property_type=s.type.to_code(), algorithm_type="AUTOMATIC", algorithm_identification=algo,
            tracking_uid=hd.UID(), tracking_id=f"{s.label} (class {s.value})"[:64], display_color=color))
    return out


def write_seg(metas: Sequence[Any], geometry: Geometry, label: Volume, segments: Sequence[SegmentSpec],
              algorithm: AlgorithmInfo, *, seg_type: str = "BINARY", series_number: int = 9001,
              series_description: str = "cfrseg segmentation (AI, research use only)",
              omit_empty_frames: bool = True, series_uid: str | None = None, sop_uid: str | None = None) -> Any:
    """A DICOM SEG (pydicom Dataset) of ``label`` (class values, on the source grid up to axis order) for the
    source series ``metas`` (metadata only is enough) whose checked geometry is ``geometry``.

    Frames are placed through highdicom's Volume geometry, never by list order. The SEG is a new series in the
    source study with the source's frame of reference, one segment per entry of ``segments`` (coded concepts,
    algorithm identification), Manufacturer "cfrseg", a research-use series description and contributing
    equipment "Processing Algorithm". Explicit VR Little Endian.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    import cfrseg

    seg_type = seg_type.upper()
    if seg_type not in SEG_TYPES:
        raise DicomInputError("bad_request", f"seg_type must be one of {SEG_TYPES}, got {seg_type!r}")
    if not segments:
        raise DicomInputError("bad_request", "at least one segment is needed")
    numbers = segment_numbers(label.array, segments)
    vol = _hd_volume(numbers, label, geometry.frame_of_reference_uid)
    try:
        matched = vol.match_geometry(source_geometry(geometry), tol=1e-4)
    except RuntimeError as e:
        raise DicomInputError("geometry_mismatch", f"the label map does not lie on the source grid ({e})") from None
    version = algorithm.software_version or cfrseg.__version__
    equipment = hd.ContributingEquipment(
        manufacturer="cfrseg", purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=algorithm.network or "cfrseg", software_versions=f"cfrseg {version}",
        device_serial_number=algorithm.model_sha256[:16] or algorithm.version[:16],
        contribution_description=f"automatic segmentation, model {algorithm.version}"[:64])
    try:
        seg = hd.seg.Segmentation(
            source_images=list(metas), pixel_array=matched, segmentation_type=seg_type,
            segment_descriptions=_descriptions(segments, algorithm), series_instance_uid=series_uid or hd.UID(),
            series_number=int(series_number), sop_instance_uid=sop_uid or hd.UID(), instance_number=1,
            manufacturer="cfrseg", manufacturer_model_name=(algorithm.network or "cfrseg")[:64],
            software_versions=f"cfrseg {version} model {algorithm.version}"[:64],
            device_serial_number=(algorithm.model_sha256[:16] or algorithm.version[:16]),
            omit_empty_frames=omit_empty_frames, content_label="CFRSEG",
            content_description=f"{algorithm.name} {algorithm.version}"[:64], contributing_equipment=[equipment])
    except (ValueError, TypeError) as e:
        raise DicomInputError("seg_encode_failed", str(e)) from None
    seg.SeriesDescription = series_description[:64]
    return seg


def to_bytes(ds: Any) -> bytes:
    """The Part-10 file bytes of a dataset (preamble and file meta)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _as_dataset(seg: Any) -> Any:
    import pydicom

    if isinstance(seg, (bytes, bytearray)):
        return pydicom.dcmread(io.BytesIO(seg))
    return seg


def _fail(detail: str) -> DicomInputError:
    return DicomInputError("seg_check_failed", detail)


def check_seg(seg: Any, metas: Sequence[Any], geometry: Geometry, expected: np.ndarray | None = None,
              segments: Sequence[SegmentSpec] | None = None) -> dict[str, Any]:
    """Check a written SEG (bytes or Dataset) against its source: identifiers copied, one referenced series with
    every source instance, each frame's source instance, position, orientation and pixel spacing equal to the
    source's, and (when ``expected``, class values on the source grid ``[x, y, z]``, and ``segments`` are given)
    the decoded content equal to it in physical space. Returns a summary (frames, segments); raises
    DicomInputError ``seg_check_failed`` naming the first difference."""
    ds = _as_dataset(seg)
    if str(ds.get("SOPClassUID", "")) not in (BINARY_SEG, LABELMAP_SEG):
        raise _fail(f"not a segmentation (SOP class {ds.get('SOPClassUID')})")
    src0 = metas[0]
    for name in COPIED:
        if str(ds.get(name, "")) != str(src0.get(name, "")):
            raise _fail(f"{name} is not the source's")
    by_uid = {str(m.SOPInstanceUID): m for m in metas}
    refs = ds.get("ReferencedSeriesSequence") or []
    if len(refs) != 1 or str(refs[0].SeriesInstanceUID) != str(src0.SeriesInstanceUID):
        raise _fail("ReferencedSeriesSequence does not name the source series")
    ref_uids = {str(r.ReferencedSOPInstanceUID) for r in refs[0].ReferencedInstanceSequence}
    if ref_uids != set(by_uid):
        raise _fail(f"ReferencedSeriesSequence names {len(ref_uids)} instances, the source has {len(by_uid)}")
    shared = ds.SharedFunctionalGroupsSequence[0]
    frames = ds.PerFrameFunctionalGroupsSequence
    if len(frames) != int(ds.NumberOfFrames):
        raise _fail("NumberOfFrames != number of per-frame items")
    for i, fr in enumerate(frames):
        try:
            src_uid = str(fr.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        except (AttributeError, IndexError):
            raise _fail(f"frame {i + 1} has no SourceImageSequence") from None
        src = by_uid.get(src_uid)
        if src is None:
            raise _fail(f"frame {i + 1} references an instance outside the source series")
        pos = np.array([float(v) for v in fr.PlanePositionSequence[0].ImagePositionPatient])
        if np.abs(pos - np.array([float(v) for v in src.ImagePositionPatient])).max() > POS_TOL_MM:
            raise _fail(f"frame {i + 1}: position differs from its source instance's")
        grp = fr if "PlaneOrientationSequence" in fr else shared
        iop = np.array([float(v) for v in grp.PlaneOrientationSequence[0].ImageOrientationPatient])
        if np.abs(iop - np.array([float(v) for v in src.ImageOrientationPatient])).max() > 1e-4:
            raise _fail(f"frame {i + 1}: orientation differs from the source's")
        grp = fr if "PixelMeasuresSequence" in fr else shared
        ps = np.array([float(v) for v in grp.PixelMeasuresSequence[0].PixelSpacing])
        if np.abs(ps - np.array([float(v) for v in src.PixelSpacing])).max() > 1e-6:
            raise _fail(f"frame {i + 1}: pixel spacing differs from the source's")
    out = {"frames": int(ds.NumberOfFrames), "segments": len(ds.SegmentSequence),
           "seg_type": str(ds.get("SegmentationType", "")), "sop_instance_uid": str(ds.SOPInstanceUID),
           "series_instance_uid": str(ds.SeriesInstanceUID)}
    if expected is not None:
        got = seg_to_label(ds, geometry)
        want = segment_numbers(expected, segments) if segments is not None else np.asarray(expected)
        if got.shape != want.shape or not np.array_equal(got, want):
            diff = int(np.count_nonzero(got != want)) if got.shape == want.shape else -1
            raise _fail(f"content differs from the label map ({diff} voxels)")
    return out


def seg_to_label(seg: Any, geometry: Geometry) -> np.ndarray:
    """The segment numbers of a SEG (bytes or Dataset) on the source grid, array ``[x, y, z]`` of
    ``geometry.shape`` (frames omitted as empty read as 0)."""
    import highdicom as hd

    ds = _as_dataset(seg)
    if str(ds.get("FrameOfReferenceUID", "")) != geometry.frame_of_reference_uid:
        raise _fail("frame of reference differs from the source's")  # match_geometry does not compare it
    empty = np.zeros(geometry.shape, np.uint8)
    target = _hd_volume(empty, geometry.volume_of(empty), geometry.frame_of_reference_uid)
    try:
        s = hd.seg.Segmentation.from_dataset(ds, copy=False)
        vol = s.get_volume(combine_segments=True, dtype=np.uint16)
        return np.asarray(vol.match_geometry(target, tol=1e-4).array)
    except (RuntimeError, ValueError, AttributeError) as e:
        raise _fail(f"cannot read the SEG back as a volume ({e})") from None
