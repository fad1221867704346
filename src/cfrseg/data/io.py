"""Reading and writing 3D volumes: NIfTI, NRRD, MetaImage, DICOM series folders and the LA ``mri_norm2.h5`` files.

Every reader returns a :class:`cfrseg.data.volume.Volume` whose array is indexed ``[x, y, z]`` (SimpleITK's
``[z, y, x]`` arrays are transposed here, on read and on write). Only scalar 3D volumes are accepted: 2D, 4D and
vector (multi-component) images raise :class:`cfrseg.errors.InputError` with the shape in the message, as do
missing, unreadable or truncated files (the message names the file).
"""

from __future__ import annotations

import contextlib
import gzip
import locale
import os
import struct
import tempfile
import uuid
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from cfrseg.data.volume import Volume
from cfrseg.errors import InputError

#: Single-file formats ``read_volume``/``write_volume`` handle (longest suffix first, matched case-insensitively).
VOLUME_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".h5", ".hdf5", ".dcm")
_WRITE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
_COMPRESSED = (".nii.gz", ".nrrd", ".mha", ".mhd")

#: The voxel size the LA 2018 challenge documents (the UA-MT h5 files store none), in mm, (x, y, z).
LA_SPACING: tuple[float, float, float] = (0.625, 0.625, 0.625)


def volume_suffix(path: str | Path) -> str:
    """The recognised format suffix of ``path`` (e.g. ``".nii.gz"``), or ``""`` when it has none."""
    name = Path(path).name.lower()
    for s in VOLUME_SUFFIXES:
        if name.endswith(s):
            return s
    return ""


def strip_suffix(path: str | Path) -> str:
    """The file name without its volume suffix: ``/a/case_01.nii.gz`` -> ``case_01``."""
    name = Path(path).name
    return name[: len(name) - len(volume_suffix(name))] if volume_suffix(name) else Path(name).stem


def new_uid() -> str:
    """A fresh DICOM UID (``2.25.<uuid as integer>``, at most 44 characters)."""
    return f"2.25.{uuid.uuid4().int}"


# ----------------------------------------------------------------------------------------------------- reading


def _itk_message(e: Exception) -> str:
    """The useful last line of a SimpleITK/ITK exception text."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def _from_sitk(img: sitk.Image, where: str) -> Volume:
    """Turn a SimpleITK image into a Volume (array [x, y, z]); reject anything that is not a scalar 3D image."""
    size = tuple(img.GetSize())
    ncomp = img.GetNumberOfComponentsPerPixel()
    if ncomp != 1:
        raise InputError(f"{where}: vector image with {ncomp} components per voxel (size {size}); "
                         f"cfrseg needs a scalar 3D volume")
    if img.GetDimension() == 4 and size[3] == 1:  # a 3D volume saved as 4D with one time point
        img = sitk.Extract(img, (*size[:3], 0), (0, 0, 0, 0), sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX)
        size = tuple(img.GetSize())
    if img.GetDimension() != 3:
        raise InputError(f"{where}: {img.GetDimension()}D image of shape {size}; cfrseg needs a 3D volume")
    if min(size) < 2:
        raise InputError(f"{where}: image of shape {size} is a single slice (2D); cfrseg needs a 3D volume")
    array = np.ascontiguousarray(sitk.GetArrayFromImage(img).transpose(2, 1, 0))
    return Volume(
        array,
        tuple(float(v) for v in img.GetSpacing()),  # type: ignore[arg-type]
        tuple(float(v) for v in img.GetOrigin()),  # type: ignore[arg-type]
        tuple(float(v) for v in img.GetDirection()),
    )


def list_dicom_series(folder: str | Path) -> list[str]:
    """The SeriesInstanceUIDs of the DICOM series found directly in ``folder`` (empty list when none)."""
    return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def read_dicom_series(folder: str | Path, series_uid: str | None = None) -> Volume:
    """Read one DICOM series from a folder into a Volume (slices ordered along the slice normal).

    With several series in the folder, ``series_uid`` picks one; without it an InputError lists them.
    """
    folder = Path(folder)
    ids = list_dicom_series(folder)
    if not ids:
        raise InputError(f"{folder}: no DICOM series found in this folder")
    if series_uid is None:
        if len(ids) > 1:
            raise InputError(f"{folder}: {len(ids)} DICOM series in this folder, choose one with series_uid: "
                             f"{sorted(ids)}")
        series_uid = ids[0]
    elif series_uid not in ids:
        raise InputError(f"{folder}: no DICOM series {series_uid!r}; found {sorted(ids)}")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        img = reader.Execute()
    except RuntimeError as e:
        raise InputError(f"{folder}: cannot read DICOM series {series_uid}: {_itk_message(e)}") from None
    if len(files) > 1:
        problem = _slice_spacing_problem(reader, len(files))
        if problem:
            raise InputError(f"{folder}: DICOM series {series_uid}: {problem}; refusing to read it with a wrong "
                             f"slice spacing (is a slice missing?)")
    return _from_sitk(img, f"{folder} (DICOM series {series_uid})")


def _slice_spacing_problem(reader: sitk.ImageSeriesReader, n: int, rtol: float = 0.01) -> str:
    """A description of the first gap, duplicate or irregular step between the slices of a series read by
    ``reader`` (positions from ImagePositionPatient projected on the slice normal), or "" when regular.

    ITK only warns about such series (and sets ``ITK_non_uniform_sampling_deviation``, which it also sets on
    regular oblique series) and returns a volume whose slice spacing is the mean step: wrong for every slice.
    """
    try:
        ipp = np.array([[float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")] for i in range(n)])
        iop = np.array([float(v) for v in reader.GetMetaData(0, "0020|0037").split("\\")])
    except (RuntimeError, ValueError):
        return ""  # no positions to check (ITK then stacks the files as given)
    if ipp.shape != (n, 3) or iop.shape != (6,):
        return ""
    normal = np.cross(iop[:3], iop[3:])
    d = np.sort(ipp @ normal)
    steps = np.diff(d)
    for k, st in enumerate(steps):
        if st <= 1e-3:
            return f"duplicate slice position {d[k]:.3f} mm (slices {k + 1} and {k + 2})"
    step = float(np.median(steps))
    for k, st in enumerate(steps):
        if abs(st - step) > max(rtol * step, 1e-3):
            kind = "gap" if st > step else "irregular step"
            return f"{kind} of {st:.4g} mm after slice {k + 1} of {n} (expected {step:.4g} mm)"
    return ""


def read_volume(path: str | Path, series_uid: str | None = None) -> Volume:
    """Read a 3D volume: a NIfTI/NRRD/MetaImage file, a DICOM series folder, or an LA h5 (key ``image``).

    Returns a Volume with array ``[x, y, z]`` in the file's own dtype and spacing/origin/direction from the file.
    ``series_uid`` selects a series when a DICOM folder holds several.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: file not found")
    if p.is_dir():
        return read_dicom_series(p, series_uid)
    suffix = volume_suffix(p)
    if suffix in (".h5", ".hdf5"):
        return read_la_h5(p, "image")
    if not suffix:
        raise InputError(f"{p}: unsupported file type; expected one of {list(VOLUME_SUFFIXES)} "
                         f"or a DICOM series folder")
    try:
        img = sitk.ReadImage(str(p))
    except RuntimeError as e:
        raise InputError(f"{p}: cannot read volume (missing, truncated or not a {suffix} file): "
                         f"{_itk_message(e)}") from None
    if suffix in (".nii", ".nii.gz"):
        _check_nifti_complete(p)
    return _from_sitk(img, str(p))


def _nifti_expected_size(header: bytes) -> int | None:
    """vox_offset + voxel bytes from a NIfTI-1/2 header (None if the header is not recognised)."""
    for end in "<>":
        if len(header) >= 348 and struct.unpack(end + "i", header[:4])[0] == 348:
            dims = struct.unpack(end + "8h", header[40:56])
            bitpix = struct.unpack(end + "h", header[72:74])[0]
            offset = int(struct.unpack(end + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(end + "i", header[:4])[0] == 540:
            bitpix = struct.unpack(end + "h", header[14:16])[0]
            dims = struct.unpack(end + "8q", header[16:80])
            offset = struct.unpack(end + "q", header[168:176])[0]
            break
    else:
        return None
    n = int(np.prod([max(int(d), 1) for d in dims[1 : 1 + max(0, min(int(dims[0]), 7))]]))
    return max(offset, 348) + n * max(int(bitpix), 8) // 8


def _check_nifti_complete(p: Path) -> None:
    """ITK reads truncated NIfTI files without complaint (missing voxels become garbage): check the size."""
    if p.name.lower().endswith(".gz"):
        total, d = 0, zlib.decompressobj(wbits=31)
        header = b""
        try:
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    while chunk:
                        out = d.decompress(chunk)
                        if len(header) < 540:
                            header += out[: 540 - len(header)]
                        total += len(out)
                        chunk = d.unused_data if d.eof else b""
                        if d.eof and chunk:  # multi-member gzip
                            d = zlib.decompressobj(wbits=31)
            complete = d.eof
        except (zlib.error, gzip.BadGzipFile) as e:
            raise InputError(f"{p}: corrupt gzip data: {e}") from None
        if not complete:
            raise InputError(f"{p}: truncated file (the gzip stream ends early)")
    else:
        with open(p, "rb") as f:
            header = f.read(540)
        total = p.stat().st_size
    expected = _nifti_expected_size(header)
    if expected is not None and total < expected:
        raise InputError(f"{p}: truncated file ({total} bytes of data, the header needs {expected})")


def read_la_h5(path: str | Path, key: str = "image",
               spacing: tuple[float, float, float] = LA_SPACING) -> Volume:
    """Read one array of an LA ``mri_norm2.h5`` file (``image``: float32, ``label``: uint8 {0,1}).

    The arrays are stored ``[x, y, z]`` (shape (X, Y, 88) for LA) with no geometry: the volume gets ``spacing``
    (default 0.625 mm isotropic, as documented by the challenge), origin 0 and the identity direction.
    """
    import h5py  # local: h5py is only needed for this format

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: file not found")
    try:
        with h5py.File(p, "r") as f:
            if key not in f:
                raise InputError(f"{p}: no dataset {key!r} in this h5 file (has {sorted(f.keys())})")
            ds = f[key]
            if not isinstance(ds, h5py.Dataset):
                raise InputError(f"{p}: {key!r} is a group, not an array")
            array = np.asarray(ds[()])
    except InputError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise InputError(f"{p}: cannot read h5 file (missing, truncated or not HDF5): {e}") from None
    if array.ndim != 3:
        raise InputError(f"{p}: {key!r} has shape {array.shape} ({array.ndim}D); cfrseg needs a 3D volume")
    return Volume(np.ascontiguousarray(array), tuple(float(s) for s in spacing))  # type: ignore[arg-type]


def read_geometry(path: str | Path) -> Volume:
    """The geometry of a volume file without reading its voxels where the format allows (NIfTI, NRRD,
    MetaImage headers; LA h5 dataset shape): a Volume whose ``array`` is an empty placeholder of the right
    shape (``np.broadcast_to``, no memory). DICOM folders and other cases fall back to :func:`read_volume`."""
    p = Path(path)
    suffix = volume_suffix(p) if p.is_file() else ""
    if suffix in (".h5", ".hdf5"):
        import h5py

        try:
            with h5py.File(p, "r") as f:
                shape = tuple(f["image"].shape)
        except (OSError, KeyError, ValueError) as e:
            raise InputError(f"{p}: cannot read h5 file (missing, truncated or not HDF5): {e}") from None
        if len(shape) != 3:
            raise InputError(f"{p}: 'image' has shape {shape}; cfrseg needs a 3D volume")
        return Volume(np.broadcast_to(np.float32(0), shape), LA_SPACING)
    if suffix in (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd"):
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(p))
        try:
            reader.ReadImageInformation()
        except RuntimeError as e:
            raise InputError(f"{p}: cannot read volume header: {_itk_message(e)}") from None
        size = tuple(int(s) for s in reader.GetSize())
        if reader.GetDimension() == 3 and reader.GetNumberOfComponents() == 1 and min(size) >= 2:
            return Volume(np.broadcast_to(np.float32(0), size), tuple(float(v) for v in reader.GetSpacing()),
                          tuple(float(v) for v in reader.GetOrigin()),
                          tuple(float(v) for v in reader.GetDirection()))
    v = read_volume(p)   # DICOM folders, 4D-with-one-frame and anything unusual: the full reader decides
    return Volume(np.broadcast_to(np.float32(0), v.shape), v.spacing, v.origin, v.direction)


# ----------------------------------------------------------------------------------------------------- writing


def label_dtype(max_value: int) -> type[np.unsignedinteger]:
    """The dtype labels are written as: uint8 up to 255, uint16 up to 65535."""
    if max_value <= 255:
        return np.uint8
    if max_value <= 65535:
        return np.uint16
    raise InputError(f"label value {max_value} does not fit uint16")


def _prepare_array(volume: Volume, label: bool | None, where: str) -> np.ndarray:
    """The array to write, [x, y, z]: labels as uint8/uint16, float16 as float32, everything else unchanged."""
    a = np.asarray(volume.array)
    if a.ndim != 3:
        raise InputError(f"{where}: cannot write a volume of shape {a.shape}; it must be 3D")
    if a.dtype == np.bool_:
        return a.astype(np.uint8)
    if label:
        if not np.issubdtype(a.dtype, np.integer):
            if not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
                raise InputError(f"{where}: label volume has non-integer values")
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if lo < 0:
            raise InputError(f"{where}: label volume has negative values (min {lo:g})")
        return a.astype(label_dtype(int(hi)))
    if label is None and np.issubdtype(a.dtype, np.integer) and a.dtype.itemsize == 8 and a.size:
        # 64-bit integer maps (numpy/torch argmax output) that fit are written compactly (lossless)
        lo, hi = int(a.min()), int(a.max())
        if lo >= 0 and hi <= 65535:
            return a.astype(label_dtype(hi))
    if a.dtype == np.float16:
        return a.astype(np.float32)
    return a


def to_sitk(volume: Volume, array: np.ndarray | None = None) -> sitk.Image:
    """A SimpleITK image with the volume's geometry (``array`` [x, y, z] defaults to the volume's own)."""
    a = volume.array if array is None else array
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(a).transpose(2, 1, 0)))
    img.SetSpacing(tuple(float(s) for s in volume.spacing))
    img.SetOrigin(tuple(float(o) for o in volume.origin))
    img.SetDirection(tuple(float(d) for d in volume.direction))
    return img


def write_volume(volume: Volume, path: str | Path, *, label: bool | None = None) -> Path:
    """Write a volume, format by extension (.nii.gz, .nii, .nrrd, .mha, .mhd); returns the path.

    ``label=True`` writes a label map as uint8 (uint16 above 255 classes) and rejects negative or non-integer
    values; ``label=None`` (default) keeps the dtype except that bool arrays become uint8 and 64-bit integer
    arrays with values in [0, 65535] become uint8/uint16. Single-file formats are written atomically (temp file + rename).
    """
    p = Path(path)
    suffix = volume_suffix(p)
    if suffix not in _WRITE_SUFFIXES:
        raise InputError(f"{p}: cannot write this file type; use one of {list(_WRITE_SUFFIXES)} "
                         f"(or write_dicom_series for DICOM)")
    img = to_sitk(volume, _prepare_array(volume, label, str(p)))
    p.parent.mkdir(parents=True, exist_ok=True)
    compress = suffix in _COMPRESSED
    if suffix == ".mhd":  # header + data file that names it: no rename
        sitk.WriteImage(img, str(p), compress)
        return p
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        sitk.WriteImage(img, tmp, compress)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def write_dicom_series(
    volume: Volume,
    folder: str | Path,
    *,
    modality: str = "MR",
    series_uid: str | None = None,
    study_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    patient_id: str = "CFRSEG",
    patient_name: str = "Anonymous^",
    series_description: str = "cfrseg",
    series_number: int = 1,
) -> list[Path]:
    """Write a volume as a DICOM series, one file per z slice (``folder/slice_0000.dcm`` ...); returns the files.

    Geometry goes into ImagePositionPatient / ImageOrientationPatient / PixelSpacing, SliceThickness (0018|0050)
    and SpacingBetweenSlices; every slice shares StudyInstanceUID, SeriesInstanceUID and FrameOfReferenceUID
    (0020|0052), so the series can be the source of a DICOM SEG (highdicom). Integer arrays are stored exactly
    (int16/uint16/uint8); float arrays are quantised to int16 with RescaleSlope/RescaleIntercept (error at most
    half a step, (max - min) / 65000 / 2).
    """
    folder = Path(folder)
    a = np.asarray(volume.array)
    if a.ndim != 3:
        raise InputError(f"{folder}: cannot write a volume of shape {a.shape} as DICOM; it must be 3D")
    tags: dict[str, str] = {}
    if a.dtype == np.bool_ or (np.issubdtype(a.dtype, np.integer) and a.size == 0):
        a = a.astype(np.uint8)
    elif np.issubdtype(a.dtype, np.integer):
        lo, hi = int(a.min()), int(a.max())
        if lo >= 0 and hi <= 255:
            a = a.astype(np.uint8)
        elif lo >= 0 and hi <= 65535:
            a = a.astype(np.uint16)
        elif lo >= -32768 and hi <= 32767:
            a = a.astype(np.int16)
        else:
            raise InputError(f"{folder}: integer values {lo}..{hi} do not fit 16-bit DICOM pixels")
    else:
        a = a.astype(np.float64)
        if not np.all(np.isfinite(a)):
            raise InputError(f"{folder}: volume has NaN/inf values; cannot write DICOM")
        lo, hi = float(a.min()), float(a.max())
        slope = float(f"{max(hi - lo, 1e-6) / 65000:.8g}")
        intercept = float(f"{lo + 32768 * slope:.10g}")
        tags.update({"0028|1053": f"{slope:.8g}", "0028|1052": f"{intercept:.10g}", "0028|0100": "16",
                     "0028|0101": "16", "0028|0102": "15", "0028|0103": "1"})
    img = to_sitk(volume, a)
    d = volume.direction
    study_uid = study_uid or new_uid()
    series_uid = series_uid or new_uid()
    frame_uid = frame_of_reference_uid or new_uid()
    sop_class = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}.get(
        modality.upper(), "1.2.840.10008.5.1.4.1.1.7")  # else Secondary Capture
    tags.update({
        "0008|0016": sop_class,
        "0008|0060": modality.upper(),
        "0008|0020": "20240101", "0008|0030": "000000", "0008|0021": "20240101", "0008|0031": "000000",
        "0008|0050": "", "0008|0090": "",
        "0008|103e": series_description,
        "0010|0010": patient_name, "0010|0020": patient_id, "0010|0030": "", "0010|0040": "O",
        "0020|000d": study_uid, "0020|000e": series_uid, "0020|0052": frame_uid,
        "0020|0010": "1", "0020|0011": str(series_number),
        "0018|0050": f"{float(volume.spacing[2]):.6g}", "0018|0088": f"{float(volume.spacing[2]):.6g}",
        "0020|0037": "\\".join(f"{v:.10g}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
    })
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    out: list[Path] = []
    with _keep_locale():
        for k in range(img.GetDepth()):
            out.append(_write_slice(writer, img, k, tags, folder))
    return out


@contextlib.contextmanager
def _keep_locale():
    """GDCM's DICOM writer switches the process's C locale to "C" (LC_CTYPE included), after which Python's
    default text encoding is ASCII for every later ``open()``: put the locale back."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_slice(writer: sitk.ImageFileWriter, img: sitk.Image, k: int, tags: dict[str, str], folder: Path) -> Path:
    # a one-slice 3D image, not a 2D slice: GDCM takes SpacingBetweenSlices from the image's z spacing (a 2D
    # slice has none, and it wrote 1 mm whatever the metadata said)
    sl = img[:, :, k:k + 1]
    for tag, value in tags.items():
        sl.SetMetaData(tag, value)
    pos = img.TransformIndexToPhysicalPoint((0, 0, k))
    sl.SetMetaData("0020|0032", "\\".join(f"{v:.10g}" for v in pos))
    sl.SetMetaData("0020|0013", str(k + 1))
    sl.SetMetaData("0008|0018", new_uid())
    f = folder / f"slice_{k:04d}.dcm"
    writer.SetFileName(str(f))
    writer.Execute(sl)
    return f
