"""DICOM for cfrseg (the ``dicom`` extra: pydicom, highdicom): series scanning, geometry pre-checks, loading a
series as a :class:`cfrseg.data.volume.Volume`, and DICOM Segmentation (SEG) writing, checking and reading.

- :mod:`cfrseg.dicom.codes`: coded concepts (``SCT:82471001:Left atrium``), segment specs, default codes for
  common class names.
- :mod:`cfrseg.dicom.series`: ``read_metadata``, ``scan_series``, ``check_series`` (reason codes),
  ``load_series``.
- :mod:`cfrseg.dicom.seg`: ``write_seg``, ``check_seg``, ``seg_to_label``.

Importing this package is cheap: pydicom and highdicom are imported by the submodules that need them, so
``import cfrseg`` works without the extra (tests/test_core_imports.py). Design: docs/pacs.md.
"""

from __future__ import annotations

from cfrseg.errors import InputError


class DicomInputError(InputError):
    """A DICOM input that cfrseg refuses, with a stable reason ``code`` (docs/pacs.md, "Reason codes"):
    ``irregular_geometry``, ``too_few_slices``, ``multiframe_unsupported``, ``no_pixel_data``,
    ``mixed_series``, ``decode_error``, ``seg_check_failed``..."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


def require_extra() -> None:
    """Raise an ImportError naming the extra when pydicom/highdicom are missing."""
    try:
        import highdicom  # noqa: F401
        import pydicom  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"cfrseg DICOM support needs the 'dicom' extra: pip install 'cfrseg[dicom]' ({e})") from e
