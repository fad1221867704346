"""DICOM source fixtures written with pydicom (not with cfrseg): single-frame MR images with the full MR Image
module (patient, study, series, frame of reference, equipment, image plane, image pixel, MR image, SOP common),
an oblique orientation by default, and knobs for the bad inputs of docs/pacs.md (missing slice, duplicate
position, mixed orientation, wrong SpacingBetweenSlices, compressed transfer syntaxes, SR/localizer objects).

``mr_series(folder, ...)`` returns an :class:`MRSeries` with the files, the ground-truth array ``[x, y, z]`` and
the geometry used to write them.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def uid() -> str:
    from pydicom.uid import generate_uid

    return generate_uid()


def rotation(deg_z: float, deg_x: float) -> np.ndarray:
    """Rotation matrix: about z by deg_z, then about x by deg_x (columns are the rotated axes)."""
    a, b = np.deg2rad(deg_z), np.deg2rad(deg_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rx @ rz


@dataclass
class MRSeries:
    files: list[Path]
    array: np.ndarray                   # [x, y, z] ground truth, int16
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray               # 3x3, columns = axes
    study_uid: str
    series_uid: str
    frame_uid: str
    sop_uids: list[str]                 # in slice order (as written, before any skip)

    @property
    def folder(self) -> Path:
        return self.files[0].parent


def phantom(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """An int16 [x, y, z] image: noise plus a bright ellipsoid (the 'atrium') off centre."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    blob = ((x - 0.15) / 0.45) ** 2 + ((y + 0.1) / 0.35) ** 2 + (z / 0.6) ** 2 < 1
    return (200 + 40 * rng.standard_normal(shape) + 600 * blob).astype(np.int16)


def mr_series(folder: str | Path, shape: tuple[int, int, int] = (20, 16, 8), *,
              spacing: tuple[float, float, float] = (0.7, 0.8, 2.5), rot: tuple[float, float] = (20.0, 15.0),
              origin: tuple[float, float, float] = (-40.0, -30.0, 20.0), seed: int = 0,
              study_uid: str | None = None, patient_name: str = "Doe^Jane", patient_id: str = "PID-0042",
              accession: str = "ACC-7", series_description: str = "LGE atrium 3D", series_number: int = 5,
              image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "OTHER"), skip: tuple[int, ...] = (),
              duplicate: tuple[int, ...] = (), tilt_slice: int | None = None, spacing_between: float | None = None,
              transfer_syntax: str = "", shuffle_names: bool = True, sop_class: str = MR_STORAGE,
              number_of_frames: int | None = None) -> MRSeries:
    """Write a single-frame MR series into ``folder`` (file names in shuffled order by default).

    ``skip``: slice indices not written (a gap); ``duplicate``: slices written twice at the same position (new
    SOP UID); ``tilt_slice``: that slice gets a different orientation; ``spacing_between``: the
    SpacingBetweenSlices value (default: the true step); ``transfer_syntax``: "" (Explicit VR LE), "RLE" or
    "JPEGLS" (lossless).
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, RLELossless

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arr = phantom(shape, seed)
    d = rotation(*rot)
    study_uid = study_uid or uid()
    series_uid, frame_uid = uid(), uid()
    sop_uids = [uid() for _ in range(shape[2])]
    now = datetime.datetime(2024, 5, 17, 10, 30, 0)
    rng = np.random.default_rng(seed + 1)
    files: list[Path] = []
    jobs = [(k, sop_uids[k]) for k in range(shape[2]) if k not in skip] + [(k, uid()) for k in duplicate]
    for n, (k, sop) in enumerate(jobs):
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = list(image_type)
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.AccessionNumber = accession
        ds.Modality = "MR"
        ds.Manufacturer = "ACME Imaging"
        ds.ReferringPhysicianName = "Ref^Doc"
        ds.SeriesDescription = series_description
        ds.Laterality = ""
        ds.PatientPosition = "HFS"
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "F"
        ds.ScanningSequence = ["GR", "IR"]
        ds.SequenceVariant = ["SP", "MP"]
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D"
        ds.SliceThickness = f"{spacing[2]:.6g}"
        ds.RepetitionTime = "4.5"
        ds.EchoTime = "2.1"
        ds.InversionTime = "300"
        ds.EchoTrainLength = "1"
        ds.MagneticFieldStrength = "1.5"
        ds.SpacingBetweenSlices = f"{(spacing_between if spacing_between is not None else spacing[2]):.6g}"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = series_number
        ds.InstanceNumber = n + 1
        rd = d if k != tilt_slice else rotation(rot[0] + 10, rot[1])
        pos = np.asarray(origin) + d[:, 2] * spacing[2] * k
        ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*rd[:, 0], *rd[:, 1])]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{float(pos @ d[:, 2]):.6f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = shape[1], shape[0]
        ds.PixelSpacing = [f"{spacing[1]:.6g}", f"{spacing[0]:.6g}"]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        if number_of_frames:
            ds.NumberOfFrames = number_of_frames
        ds.PixelData = np.ascontiguousarray(arr[:, :, k].T).astype("<i2").tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        if transfer_syntax == "RLE":
            ds.compress(RLELossless)
        elif transfer_syntax == "JPEGLS":
            ds.compress(JPEGLSLossless)
        name = f"{int(rng.integers(1 << 30)):010d}.dcm" if shuffle_names else f"slice_{n:04d}.dcm"
        f = folder / name
        pydicom.dcmwrite(f, ds, enforce_file_format=True)
        files.append(f)
    return MRSeries(files, arr, spacing, tuple(origin), d, study_uid, series_uid, frame_uid, sop_uids)


def text_sr(folder: str | Path, study_uid: str, patient_id: str = "PID-0042") -> Path:
    """A Basic Text SR in the study (something a PACS routes with the images; must be ignored)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, uid()
    ds.Modality = "SR"
    ds.PatientName, ds.PatientID = "Doe^Jane", patient_id
    ds.StudyDate, ds.StudyTime, ds.ContentDate, ds.ContentTime = "20240517", "103000", "20240517", "103000"
    ds.SeriesNumber, ds.InstanceNumber = 99, 1
    ds.ValueType = "CONTAINER"
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    f = Path(folder) / "sr.dcm"
    Path(folder).mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(f, ds, enforce_file_format=True)
    return f


def presentation_state(path: Path, study_uid: str) -> Path:
    """A (minimal) Grayscale Softcopy Presentation State in the study: routed with the images, must be ignored."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.11.1", uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study_uid, uid(), "PR"
    ds.PatientName, ds.PatientID, ds.SeriesNumber, ds.InstanceNumber = "Doe^Jane", "PID-0042", 98, 1
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path
