"""One DICOM series: metadata scan, geometry pre-checks, and loading as a Volume (docs/pacs.md, "Geometry").

Everything up to :func:`load_series` reads metadata only (``stop_before_pixels``). The geometry is taken from
the DICOM headers in double precision (ImagePositionPatient, ImageOrientationPatient, PixelSpacing), never from
the file order: slices are sorted by their position along the slice normal, and a gap, a duplicate position,
a tilted stack, mixed orientations, sizes or frames of reference are refused with reason ``irregular_geometry``
and a detail that names the slice (``gap of 5 mm after slice 3 (expected 2.5 mm)``). SimpleITK decodes the
pixels (uncompressed, RLE, JPEG, JPEG-LS, JPEG 2000 through GDCM); its geometry is cross-checked against the
headers and the headers' geometry is kept.

Volume convention (:mod:`cfrseg.data.volume`): array ``[x, y, z]`` = ``[column, row, slice]``; spacing
``(PixelSpacing[1], PixelSpacing[0], slice step)`` in mm; direction columns = (row direction cosine, column
direction cosine, slice normal); origin = ImagePositionPatient of the first slice along the normal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cfrseg.data.volume import Volume
from cfrseg.dicom import DicomInputError

ORIENTATION_TOL = 1e-4     # direction cosines
POSITION_ATOL_MM = 1e-3    # absolute tolerance on positions and steps
STEP_RTOL = 0.01           # a slice step may differ from the median step by 1 %
MULTIFRAME_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.3": "Enhanced MR Color Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image Storage",
}
SEG_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")


def read_metadata(files: Sequence[str | Path]) -> list[Any]:
    """The datasets of ``files`` without pixel data (pydicom ``stop_before_pixels``), in the given order.
    An unreadable file raises DicomInputError ``not_dicom`` naming it (by position, not by path)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    out = []
    for i, f in enumerate(files):
        try:
            out.append(pydicom.dcmread(str(f), stop_before_pixels=True))
        except (InvalidDicomError, OSError, ValueError, EOFError) as e:
            raise DicomInputError("not_dicom", f"instance {i + 1} is not a readable DICOM file ({e})") from None
    return out


@dataclass(frozen=True)
class SeriesInfo:
    """What a series is, from metadata only (no pixel data). UIDs only: no patient data."""

    study_uid: str
    series_uid: str
    modality: str
    sop_class_uids: tuple[str, ...]
    transfer_syntaxes: tuple[str, ...]
    image_types: tuple[tuple[str, ...], ...]
    num_instances: int
    num_bytes: int
    frame_of_reference_uids: tuple[str, ...]
    max_frames: int
    manufacturer: str
    series_description: str

    @property
    def is_own_output(self) -> bool:
        """A cfrseg SEG (or any SEG) routed back to us: never processed again (reason ``own_output``)."""
        return self.modality == "SEG" or any(c in SEG_CLASSES for c in self.sop_class_uids) \
            or self.manufacturer.strip().lower() == "cfrseg"


def _str(ds: Any, name: str) -> str:
    v = ds.get(name, "")
    return "" if v is None else str(v)


def scan_series(metas: Sequence[Any], sizes: Sequence[int] | None = None) -> SeriesInfo:
    """Summarise the datasets of one series (``sizes``: their file sizes in bytes, if known)."""
    if not metas:
        raise DicomInputError("empty_series", "no instances")
    first = metas[0]
    tsyn = []
    for ds in metas:
        meta = getattr(ds, "file_meta", None)
        ts = str(getattr(meta, "TransferSyntaxUID", "")) if meta is not None else ""
        if ts and ts not in tsyn:
            tsyn.append(ts)
    frames = [int(ds.get("NumberOfFrames", 1) or 1) for ds in metas]
    return SeriesInfo(
        study_uid=_str(first, "StudyInstanceUID"), series_uid=_str(first, "SeriesInstanceUID"),
        modality=_str(first, "Modality").upper(),
        sop_class_uids=tuple(sorted({_str(ds, "SOPClassUID") for ds in metas})),
        transfer_syntaxes=tuple(tsyn),
        image_types=tuple(sorted({tuple(str(v).upper() for v in (ds.get("ImageType") or ())) for ds in metas})),
        num_instances=len(metas), num_bytes=int(sum(sizes)) if sizes is not None else 0,
        frame_of_reference_uids=tuple(sorted({_str(ds, "FrameOfReferenceUID") for ds in metas})),
        max_frames=max(frames), manufacturer=_str(first, "Manufacturer"),
        series_description=_str(first, "SeriesDescription"))


@dataclass(frozen=True)
class Geometry:
    """The checked geometry of a series. ``order[k]`` is the index (in the input list) of the k-th slice along
    the normal; positions in mm along the normal; spacing (x, y, z) = (column, row, slice step) in mm."""

    rows: int
    columns: int
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    row_cosine: tuple[float, float, float]
    column_cosine: tuple[float, float, float]
    normal: tuple[float, float, float]
    order: tuple[int, ...]
    positions: tuple[float, ...]
    frame_of_reference_uid: str
    sop_instance_uids: tuple[str, ...]     # in slice order

    @property
    def num_slices(self) -> int:
        return len(self.order)

    @property
    def direction(self) -> tuple[float, ...]:
        """ITK's row-major 3x3 direction matrix: columns = row cosine, column cosine, normal."""
        m = np.stack([self.row_cosine, self.column_cosine, self.normal], axis=1)
        return tuple(float(v) for v in m.reshape(-1))

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.columns, self.rows, self.num_slices)

    def volume_of(self, array: np.ndarray) -> Volume:
        """A Volume with this geometry around ``array`` ([x, y, z], shape :attr:`shape`)."""
        if tuple(array.shape) != self.shape:
            raise DicomInputError("irregular_geometry", f"array shape {array.shape} != series shape {self.shape}")
        return Volume(array, self.spacing, self.origin, self.direction)


def _floats(ds: Any, name: str, n: int, where: str) -> np.ndarray:
    v = ds.get(name)
    if v is None or len(v) != n:
        raise DicomInputError("irregular_geometry", f"{where}: no valid {name}")
    try:
        return np.array([float(x) for x in v], dtype=np.float64)
    except (TypeError, ValueError):
        raise DicomInputError("irregular_geometry", f"{where}: {name} is not numeric") from None


def check_series(metas: Sequence[Any], *, min_slices: int = 8) -> Geometry:
    """Pre-check a series on metadata and return its geometry, or raise DicomInputError with a reason code:
    ``multiframe_unsupported``, ``mixed_series`` (several SOP classes or series), ``too_few_slices``,
    ``irregular_geometry`` (missing position/orientation, mixed orientation/size/frame of reference, gap,
    duplicate position, tilted stack, SpacingBetweenSlices not the position step)."""
    if not metas:
        raise DicomInputError("too_few_slices", "no instances")
    classes = {_str(ds, "SOPClassUID") for ds in metas}
    for c in classes:
        if c in MULTIFRAME_CLASSES:
            raise DicomInputError("multiframe_unsupported", f"{MULTIFRAME_CLASSES[c]} objects are not supported "
                                  f"(send the series as single-frame images)")
    frames = max(int(ds.get("NumberOfFrames", 1) or 1) for ds in metas)
    if frames > 1:
        raise DicomInputError("multiframe_unsupported", f"multi-frame instances ({frames} frames) are not supported")
    if len(classes) > 1:
        raise DicomInputError("mixed_series", f"{len(classes)} SOP classes in one series")
    if len({_str(ds, "SeriesInstanceUID") for ds in metas}) > 1:
        raise DicomInputError("mixed_series", "instances of several series")
    n = len(metas)
    if n < min_slices:
        raise DicomInputError("too_few_slices", f"{n} slice(s); at least {min_slices} are needed")
    if "PixelData" not in metas[0] and metas[0].get("Rows") is None:
        raise DicomInputError("no_pixel_data", "the instances carry no image (Rows/Columns missing)")
    iops = np.stack([_floats(ds, "ImageOrientationPatient", 6, f"slice {i + 1}") for i, ds in enumerate(metas)])
    ipps = np.stack([_floats(ds, "ImagePositionPatient", 3, f"slice {i + 1}") for i, ds in enumerate(metas)])
    sps = np.stack([_floats(ds, "PixelSpacing", 2, f"slice {i + 1}") for i, ds in enumerate(metas)])
    bad = np.nonzero(np.abs(iops - iops[0]).max(axis=1) > ORIENTATION_TOL)[0]
    if bad.size:
        raise DicomInputError("irregular_geometry", f"mixed orientations: instance {int(bad[0]) + 1} is not "
                              f"oriented like instance 1")
    sizes = {(int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)) for ds in metas}
    if len(sizes) > 1:
        raise DicomInputError("irregular_geometry", f"mixed image sizes {sorted(sizes)}")
    if np.abs(sps - sps[0]).max() > 1e-6:
        raise DicomInputError("irregular_geometry", "mixed pixel spacings")
    fors = {_str(ds, "FrameOfReferenceUID") for ds in metas}
    if len(fors) > 1 or "" in fors:
        raise DicomInputError("irregular_geometry", "missing or mixed FrameOfReferenceUID")
    row, col = iops[0, :3], iops[0, 3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise DicomInputError("irregular_geometry", "ImageOrientationPatient is not two orthonormal vectors")
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    d = ipps @ normal
    order = np.argsort(d, kind="stable")
    ds_sorted, p_sorted = d[order], ipps[order]
    steps = np.diff(ds_sorted)
    dup = np.nonzero(steps <= POSITION_ATOL_MM)[0]
    if dup.size:
        k = int(dup[0])
        raise DicomInputError("irregular_geometry", f"duplicate slice position {ds_sorted[k]:.3f} mm at slices "
                              f"{k + 1} and {k + 2} (along the normal)")
    step = float(np.median(steps))
    off = np.nonzero(np.abs(steps - step) > max(STEP_RTOL * step, POSITION_ATOL_MM))[0]
    if off.size:
        k = int(off[0])
        kind = "gap" if steps[k] > step else "irregular step"
        raise DicomInputError("irregular_geometry", f"{kind} of {steps[k]:.4g} mm after slice {k + 1} "
                              f"(expected {step:.4g} mm)")
    inplane = (p_sorted - p_sorted[0]) - np.outer(ds_sorted - ds_sorted[0], normal)
    if np.abs(inplane).max() > max(0.05 * step, 0.01):
        raise DicomInputError("irregular_geometry", "slices are not stacked along the slice normal "
                              "(tilted or sheared series)")
    sbs = [float(ds.SpacingBetweenSlices) for ds in metas if ds.get("SpacingBetweenSlices") not in (None, "")]
    if sbs and abs(sbs[0] - step) > STEP_RTOL * step:
        raise DicomInputError("irregular_geometry", f"SpacingBetweenSlices {sbs[0]:.4g} mm differs from the "
                              f"position step {step:.4g} mm")
    r, c = sizes.pop()
    return Geometry(
        rows=r, columns=c, spacing=(float(sps[0, 1]), float(sps[0, 0]), step),
        origin=tuple(float(v) for v in p_sorted[0]),  # type: ignore[arg-type]
        row_cosine=tuple(float(v) for v in row), column_cosine=tuple(float(v) for v in col),  # type: ignore[arg-type]
        normal=tuple(float(v) for v in normal),  # type: ignore[arg-type]
        order=tuple(int(i) for i in order), positions=tuple(float(v) for v in ds_sorted),
        frame_of_reference_uid=fors.pop(),
        sop_instance_uids=tuple(_str(metas[i], "SOPInstanceUID") for i in order))


def load_series(files: Sequence[str | Path], geometry: Geometry, *, max_voxels: int = 512 * 512 * 2000) -> Volume:
    """Decode the series (``files`` in the order ``geometry`` was checked with) into a Volume with the header
    geometry. SimpleITK's own geometry must agree (origin, spacing, direction) or DicomInputError
    ``irregular_geometry`` is raised; a decoding failure is ``decode_error``."""
    import SimpleITK as sitk

    n_vox = geometry.rows * geometry.columns * geometry.num_slices
    if n_vox > max_voxels:
        raise DicomInputError("oversized", f"{n_vox} voxels > limit {max_voxels}")
    names = [str(files[i]) for i in geometry.order]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    try:
        img = reader.Execute()
    except RuntimeError as e:
        last = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise DicomInputError("decode_error", last[-1] if last else "cannot decode the pixel data") from None
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise DicomInputError("decode_error", f"{img.GetNumberOfComponentsPerPixel()} samples per pixel; "
                              f"cfrseg needs grey-level images")
    array = np.ascontiguousarray(sitk.GetArrayFromImage(img).transpose(2, 1, 0))
    vol = geometry.volume_of(array)
    ok = (np.allclose(img.GetOrigin(), vol.origin, atol=1e-2)
          and np.allclose(img.GetSpacing()[:2], vol.spacing[:2], rtol=1e-4)
          and abs(img.GetSpacing()[2] - vol.spacing[2]) <= STEP_RTOL * vol.spacing[2]
          and np.allclose(np.reshape(img.GetDirection(), (3, 3))[:, :2],
                          np.reshape(vol.direction, (3, 3))[:, :2], atol=1e-3))
    if not ok:
        raise DicomInputError("irregular_geometry", "the decoded geometry disagrees with the DICOM positions "
                              f"(origin {np.round(img.GetOrigin(), 3).tolist()} vs {np.round(vol.origin, 3).tolist()})")
    return vol
