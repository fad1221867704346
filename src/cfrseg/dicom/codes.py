"""Coded concepts for DICOM SEG segment descriptions.

A code is written ``SCHEME:VALUE:Meaning`` (``SCT:82471001:Left atrium``); SNOMED CT uses the scheme ``SCT``
(the retired ``SRT`` is refused, as DICOM deprecated it). :data:`DEFAULT_TYPES` maps common class names to
SNOMED CT codes, so a model whose classes are named (``class_names`` in model.pt) gets a coded segment without a
hand-written route; unknown names fall back to category "Anatomical Structure" / type "Tissue" only when a route
asks for defaults (``segments: "auto"``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cfrseg.errors import ConfigError

_CODE = re.compile(r"^(?P<scheme>[A-Za-z0-9_.-]{1,16}):(?P<value>[^:\s]{1,64}):(?P<meaning>[^\\]{1,64})$")
ANATOMICAL_STRUCTURE = "SCT:91723000:Anatomical Structure"
TISSUE = "SCT:85756007:Tissue"

#: Lower-cased class name -> SNOMED CT segmented property type (all in pydicom's ``codes.SCT``).
DEFAULT_TYPES: dict[str, str] = {
    "left atrium": "SCT:82471001:Left atrium",
    "la": "SCT:82471001:Left atrium",
    "left ventricle": "SCT:87878005:Left ventricle",
    "lv": "SCT:87878005:Left ventricle",
    "right ventricle": "SCT:53085002:Right ventricle",
    "rv": "SCT:53085002:Right ventricle",
    "myocardium": "SCT:49848007:Left Ventricle Myocardium",
    "left ventricle myocardium": "SCT:49848007:Left Ventricle Myocardium",
    "myo": "SCT:49848007:Left Ventricle Myocardium",
    "heart": "SCT:80891009:Heart",
}


@dataclass(frozen=True)
class CodeSpec:
    """One coded concept (scheme designator, code value, code meaning)."""

    scheme: str
    value: str
    meaning: str

    def __post_init__(self) -> None:
        if self.scheme.upper() == "SRT":
            raise ConfigError(f"code {self}: the SRT scheme is retired; use SCT (SNOMED CT) codes")
        if not (self.scheme and self.value and self.meaning):
            raise ConfigError(f"code {self!r}: scheme, value and meaning are all required")

    @classmethod
    def parse(cls, text: str) -> CodeSpec:
        """``"SCT:82471001:Left atrium"`` -> CodeSpec; ConfigError naming the text when malformed."""
        m = _CODE.match(str(text).strip()) if isinstance(text, str) else None
        if m is None:
            raise ConfigError(f"code {text!r}: expected SCHEME:VALUE:Meaning, e.g. 'SCT:82471001:Left atrium'")
        return cls(m["scheme"], m["value"], m["meaning"].strip())

    def __str__(self) -> str:
        return f"{self.scheme}:{self.value}:{self.meaning}"

    def to_code(self) -> Any:
        """A ``pydicom.sr.coding.Code`` (pydicom imported here)."""
        from pydicom.sr.coding import Code

        return Code(self.value, self.scheme, self.meaning)


@dataclass(frozen=True)
class SegmentSpec:
    """What one class value of a label map is, for the SEG: label, category and type codes, display colour."""

    value: int
    label: str
    category: CodeSpec
    type: CodeSpec
    rgb: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.value, int) or not 1 <= self.value <= 65535:
            raise ConfigError(f"segment value {self.value!r} must be an integer in 1..65535 (0 is background)")
        if not self.label or len(self.label) > 64:
            raise ConfigError(f"segment {self.value}: label must be 1..64 characters, got {self.label!r}")
        if self.rgb is not None and (len(self.rgb) != 3 or not all(isinstance(c, int) and 0 <= c <= 255
                                                                   for c in self.rgb)):
            raise ConfigError(f"segment {self.value}: rgb must be three integers in 0..255, got {self.rgb!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SegmentSpec:
        if not isinstance(d, Mapping):
            raise ConfigError(f"segment must be an object with value/label/category/type, got {d!r}")
        unknown = sorted(set(d) - {"value", "label", "category", "type", "rgb"})
        if unknown:
            raise ConfigError(f"segment {d.get('value')!r}: unknown key(s) {unknown}")
        try:
            value = d["value"]
            label = str(d["label"])
        except KeyError as e:
            raise ConfigError(f"segment {dict(d)!r}: missing {e.args[0]!r}") from None
        typ = d.get("type") or DEFAULT_TYPES.get(label.lower())
        if not typ:
            raise ConfigError(f"segment {value!r} ({label!r}): give its 'type' code (e.g. "
                              f"'SCT:82471001:Left atrium'); no default code for this label")
        rgb = d.get("rgb")
        return cls(value=value, label=label, category=CodeSpec.parse(d.get("category") or ANATOMICAL_STRUCTURE),
                   type=CodeSpec.parse(typ), rgb=tuple(rgb) if rgb is not None else None)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"value": self.value, "label": self.label, "category": str(self.category),
                             "type": str(self.type)}
        if self.rgb is not None:
            d["rgb"] = list(self.rgb)
        return d


def default_segments(class_names: Sequence[str]) -> list[SegmentSpec]:
    """Segments for a model's foreground classes (``class_names[i]`` is class value ``i + 1``): a known name
    gets its SNOMED CT type; an unknown one gets type "Tissue" and keeps its name as the segment label."""
    out = []
    for i, name in enumerate(class_names, start=1):
        typ = DEFAULT_TYPES.get(name.strip().lower(), TISSUE)
        out.append(SegmentSpec(value=i, label=name[:64] or f"class_{i}", category=CodeSpec.parse(ANATOMICAL_STRUCTURE),
                               type=CodeSpec.parse(typ)))
    return out


def code_for(name: str) -> str:
    """The default SNOMED CT type code of a class name (``""`` when none is known)."""
    return DEFAULT_TYPES.get(name.strip().lower(), "")
