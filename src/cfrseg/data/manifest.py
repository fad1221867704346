"""Dataset manifests: which cases are labeled, unlabeled and test, and where their files are.

A manifest is plain data (JSON round trip). Builders for the supported layouts and the validating loader live
in :mod:`cfrseg.data.datasets`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from cfrseg.errors import InputError

Role = Literal["labeled", "unlabeled", "test"]
ROLES: tuple[str, ...] = ("labeled", "unlabeled", "test")
#: modalities with their own intensity normalisation (cfrseg.data.plan): CT (HU, dataset statistics) or MR
MODALITIES: tuple[str, ...] = ("MR", "CT")


def default_class_names(num_classes: int) -> tuple[str, ...]:
    """``("background", "class_1", ..., "class_{K-1}")``."""
    return ("background",) + tuple(f"class_{k}" for k in range(1, num_classes))


def modality_of(name: str) -> str:
    """The normalisation family of a channel/modality name: "CT" for CT (any case), "MR" for everything else
    (MRI, T1, T2, FLAIR, ADC, ...: per-volume z-score, nnU-Net's default)."""
    return "CT" if str(name).strip().upper() == "CT" else "MR"


@dataclass(frozen=True)
class Case:
    case_id: str
    image: str                       # path of a volume file, DICOM folder, or LA ``mri_norm2.h5``
    label: str | None = None         # label file (LA: the same h5, key "label")
    role: Role = "labeled"
    pseudo_label: str | None = None  # SAM pseudo-label file (unlabeled cases, written by run_pseudolabel)


@dataclass(frozen=True)
class Manifest:
    name: str
    num_classes: int                 # including background: LA = 2
    cases: tuple[Case, ...] = field(default_factory=tuple)
    spacing: tuple[float, float, float] | None = None  # overrides file spacing when the files carry none (LA)
    modality: str = "MR"             # "MR" | "CT": selects the intensity normalisation (cfrseg.data.plan)
    class_names: tuple[str, ...] | None = None   # num_classes names, background first; None = default names

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise InputError(f"num_classes must be >= 2 (background + at least one class), got {self.num_classes}")
        if self.modality not in MODALITIES:
            raise InputError(f"modality must be one of {list(MODALITIES)}, got {self.modality!r}")
        if self.class_names is not None:
            names = tuple(str(n) for n in self.class_names)
            if len(names) != self.num_classes or any(not n.strip() for n in names) or len(set(names)) != len(names):
                raise InputError(f"class_names must be {self.num_classes} distinct non-empty names (background "
                                 f"first), got {list(names)}")
            object.__setattr__(self, "class_names", names)
        ids = [c.case_id for c in self.cases]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise InputError(f"duplicate case ids in manifest {self.name!r}: {dup}")
        for c in self.cases:
            if c.role not in ROLES:
                raise InputError(f"case {c.case_id!r}: role must be one of {ROLES}, got {c.role!r}")
            if c.role == "labeled" and not c.label:
                raise InputError(f"case {c.case_id!r} is 'labeled' but has no label file")

    def by_role(self, role: Role) -> list[Case]:
        return [c for c in self.cases if c.role == role]

    @property
    def labeled(self) -> list[Case]:
        return self.by_role("labeled")

    @property
    def unlabeled(self) -> list[Case]:
        return self.by_role("unlabeled")

    @property
    def test(self) -> list[Case]:
        return self.by_role("test")

    @property
    def training(self) -> list[Case]:
        """The cases training may look at: labeled and unlabeled (never "test")."""
        return [c for c in self.cases if c.role != "test"]

    @property
    def names(self) -> tuple[str, ...]:
        """The class names, background first (the defaults when none were given)."""
        return self.class_names or default_class_names(self.num_classes)

    def case(self, case_id: str) -> Case:
        for c in self.cases:
            if c.case_id == case_id:
                return c
        raise InputError(f"no case {case_id!r} in manifest {self.name!r}")

    def with_pseudo_labels(self, paths: dict[str, str]) -> "Manifest":
        cases = tuple(replace(c, pseudo_label=paths.get(c.case_id, c.pseudo_label)) for c in self.cases)
        return replace(self, cases=cases)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        try:
            cases = tuple(Case(**c) for c in d.get("cases", []))
            sp = d.get("spacing")
            names = d.get("class_names")
            return cls(name=d["name"], num_classes=int(d["num_classes"]), cases=cases,
                       spacing=tuple(sp) if sp else None, modality=d.get("modality", "MR"),
                       class_names=tuple(names) if names else None)
        except (KeyError, TypeError) as e:
            raise InputError(f"malformed manifest: {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except json.JSONDecodeError as e:
            raise InputError(f"manifest {path} is not valid JSON: {e}") from None
