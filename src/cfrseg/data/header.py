"""Read a volume file's header without reading (or decompressing) its voxels.

A few megabytes of ``.nii.gz`` can claim, and decompress to, billions of voxels; a server checks the header
first (:func:`read_header`), and only then hands the file to the full reader. Supported: NIfTI-1/2 (``.nii``,
``.nii.gz``: only the first 540 bytes of the gzip stream are inflated), NRRD and MetaImage (``.nrrd``, ``.mha``:
the text header, at most 64 KiB). Detached data files (NRRD ``data file:``, MetaImage ``ElementDataFile`` other
than ``LOCAL``) are refused: a single uploaded file must not make a reader open other paths.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from cfrseg.errors import InputError

MAX_TEXT_HEADER = 64 * 1024
NRRD_TYPES = {"signed char": 1, "int8": 1, "int8_t": 1, "uchar": 1, "unsigned char": 1, "uint8": 1, "uint8_t": 1,
              "short": 2, "short int": 2, "signed short": 2, "signed short int": 2, "int16": 2, "int16_t": 2,
              "ushort": 2, "unsigned short": 2, "unsigned short int": 2, "uint16": 2, "uint16_t": 2,
              "int": 4, "signed int": 4, "int32": 4, "int32_t": 4, "uint": 4, "unsigned int": 4, "uint32": 4,
              "uint32_t": 4, "longlong": 8, "long long": 8, "long long int": 8, "signed long long": 8,
              "signed long long int": 8, "int64": 8, "int64_t": 8, "ulonglong": 8, "unsigned long long": 8,
              "unsigned long long int": 8, "uint64": 8, "uint64_t": 8, "float": 4, "double": 8, "block": 1}
MET_TYPES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
             "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
             "MET_DOUBLE": 8}


@dataclass(frozen=True)
class Header:
    """What a header claims. ``shape``: every axis (spatial, then time/components); ``voxels``: their product
    (components included); ``bytes_per_voxel``: bytes of one scalar element."""

    format: str
    shape: tuple[int, ...]
    voxels: int
    bytes_per_voxel: int

    @property
    def nbytes(self) -> int:
        """Bytes of the decoded voxel data."""
        return self.voxels * self.bytes_per_voxel


def read_header(path: str | Path, name: str | None = None) -> Header:
    """Parse the header of a ``.nii``/``.nii.gz``/``.nrrd``/``.mha`` file (``name``: how messages call the file,
    default its path). InputError when it is not one of those, malformed, or names a detached data file."""
    p = Path(path)
    where = name or str(p)
    low = p.name.lower()
    if low.endswith((".nii", ".nii.gz")):
        return _nifti(p, where)
    if low.endswith(".nrrd"):
        return _nrrd(_text_header(p, where, b"NRRD"), where)
    if low.endswith(".mha"):
        return _mha(_text_header(p, where, None), where)
    raise InputError(f"{where}: cannot read the header of this file type (expected .nii, .nii.gz, .nrrd, .mha)")


def _count(shape: tuple[int, ...], where: str) -> int:
    if not shape or any(int(s) < 1 for s in shape):
        raise InputError(f"{where}: the header gives invalid dimensions {list(shape)}")
    return math.prod(int(s) for s in shape)


def _nifti(p: Path, where: str) -> Header:
    try:
        if p.name.lower().endswith(".gz"):
            with gzip.open(p, "rb") as f:   # inflates only what read() asks for
                hdr = f.read(540)
        else:
            with open(p, "rb") as f:
                hdr = f.read(540)
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(f"{where}: cannot read the NIfTI header ({e})") from None
    for end in "<>":
        if len(hdr) >= 348 and struct.unpack(end + "i", hdr[:4])[0] == 348:
            dims = struct.unpack(end + "8h", hdr[40:56])
            bitpix = struct.unpack(end + "h", hdr[72:74])[0]
            fmt = "nifti1"
            break
        if len(hdr) >= 540 and struct.unpack(end + "i", hdr[:4])[0] == 540:
            bitpix = struct.unpack(end + "h", hdr[14:16])[0]
            dims = struct.unpack(end + "8q", hdr[16:80])
            fmt = "nifti2"
            break
    else:
        raise InputError(f"{where}: not a NIfTI file (no valid header size field)")
    ndim = int(dims[0])
    if not 1 <= ndim <= 7:
        raise InputError(f"{where}: the NIfTI header gives {ndim} dimensions (expected 1-7)")
    shape = tuple(int(d) for d in dims[1:1 + ndim])
    return Header(fmt, shape, _count(shape, where), max(1, int(bitpix) // 8))


def _text_header(p: Path, where: str, magic: bytes | None) -> list[tuple[str, str]]:
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_TEXT_HEADER)
    except OSError as e:
        raise InputError(f"{where}: cannot read the header ({e.strerror})") from None
    if magic is not None and not raw.startswith(magic):
        raise InputError(f"{where}: not a NRRD file (it must start with 'NRRD000x')")
    lines: list[tuple[str, str]] = []
    pos = 0
    while True:
        nl = raw.find(b"\n", pos)
        if nl < 0:
            raise InputError(f"{where}: no end of header within the first {MAX_TEXT_HEADER // 1024} KiB")
        line = raw[pos:nl].rstrip(b"\r").decode("latin-1")
        pos = nl + 1
        if magic is not None:                 # NRRD: the header ends at the first empty line
            if not line:
                return lines
            if line.startswith(("#", "NRRD")):
                continue
            key, sep, val = line.partition(":=") if ":=" in line else line.partition(":")
        else:                                 # MetaImage: "Key = Value" up to ElementDataFile
            key, sep, val = line.partition("=")
        if not sep:
            raise InputError(f"{where}: malformed header line {line[:80]!r}")
        lines.append((key.strip().lower(), val.strip()))
        if magic is None and key.strip().lower() == "elementdatafile":
            return lines


def _ints(text: str, where: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split())
    except ValueError:
        raise InputError(f"{where}: the header's {what} {text!r} are not integers") from None


def _nrrd(fields: list[tuple[str, str]], where: str) -> Header:
    d = dict(fields)
    for k in ("data file", "datafile"):
        if k in d:
            raise InputError(f"{where}: detached NRRD data files ('{k}: {d[k]}') are not accepted; "
                             f"save the volume as a single attached .nrrd or .nii.gz")
    if "sizes" not in d:
        raise InputError(f"{where}: the NRRD header has no 'sizes' field")
    shape = _ints(d["sizes"], where, "sizes")
    return Header("nrrd", shape, _count(shape, where), NRRD_TYPES.get(d.get("type", "").lower(), 1))


def _mha(fields: list[tuple[str, str]], where: str) -> Header:
    d = dict(fields)
    data_file = d.get("elementdatafile", "")
    if data_file.upper() != "LOCAL":
        raise InputError(f"{where}: a .mha file must hold its voxels (ElementDataFile = LOCAL), got "
                         f"{data_file!r}; save the volume as a single .mha or .nii.gz")
    if "dimsize" not in d:
        raise InputError(f"{where}: the MetaImage header has no DimSize")
    shape = _ints(d["dimsize"], where, "DimSize")
    channels = _ints(d.get("elementnumberofchannels", "1"), where, "ElementNumberOfChannels")
    full = shape + tuple(c for c in channels if c != 1)
    return Header("mha", full, _count(full, where), MET_TYPES.get(d.get("elementtype", "").upper(), 1))
