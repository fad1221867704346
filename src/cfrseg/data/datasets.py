"""Dataset manifests for the supported layouts, and the validating case loader.

Layouts (:func:`detect_layout` picks one for ``cfrseg ... --data DIR``):

- ``la``: the UA-MT LA 2018 folder (``train.list`` + ``<id>/mri_norm2.h5``), see :mod:`cfrseg.data.la`;
- ``nnunet``: an MSD / nnU-Net dataset (``dataset.json``, ``imagesTr``, ``labelsTr``, optional ``imagesTs``);
- ``folders``: ``images/`` (+ optional ``labels/``) volume folders, or a flat folder of volumes (all unlabeled);
- ``manifest``: a manifest JSON file written by :meth:`cfrseg.data.manifest.Manifest.save`.

:func:`load_case` reads a case and checks it (3D image with finite values, label geometry equal to the image's,
integer label values in ``[0, num_classes)``, foreground present in labeled cases).
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from cfrseg.data.io import label_dtype, read_la_h5, read_volume, strip_suffix, volume_suffix
from cfrseg.data.la import (
    LA_BASE_URL,
    fetch_la2018,
    is_la_dir,
    manifest_from_la,
    manifest_from_la_test,
    validate_la_h5,
)
from cfrseg.data.manifest import MODALITIES, Case, Manifest, modality_of
from cfrseg.data.volume import Volume
from cfrseg.errors import InputError

__all__ = [
    "LA_BASE_URL", "Layout", "build_manifest", "class_presence_error", "detect_layout", "fetch_la2018", "load_case", "load_pseudo_label",
    "manifest_from_folders", "manifest_from_la", "manifest_from_la_test", "manifest_from_nnunet",
    "validate_la_h5",
]

Layout = Literal["la", "nnunet", "folders", "manifest"]
Labeled = int | Sequence[str] | None
CHANNEL_SUFFIX = "_0000"


# ----------------------------------------------------------------------------------------------- folder scans


def _scan(folder: Path, what: str, channels: bool = True) -> dict[str, str]:
    """Case id -> path of every volume file (or DICOM series sub-folder) in ``folder``.

    The case id is the file name without its extension. With ``channels`` (image folders), an nnU-Net
    ``_0000`` channel suffix is stripped, and a case that also has ``_0001``... files is multi-channel, which
    cfrseg does not support. Hidden files are ignored.
    """
    if not folder.is_dir():
        raise InputError(f"{folder}: {what} folder not found")
    found: dict[str, list[str]] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not (p.is_dir() or volume_suffix(p)):
            continue
        cid = strip_suffix(p) if p.is_file() else p.name
        found.setdefault(cid, []).append(str(p))
    if channels:
        stripped: dict[str, list[str]] = {}
        for cid, files in found.items():
            stripped.setdefault(cid[: -len(CHANNEL_SUFFIX)] if cid.endswith(CHANNEL_SUFFIX) else cid,
                                []).extend(files)
        multi = sorted(c[:-5] for c in found if _is_channel(c) and not c.endswith(CHANNEL_SUFFIX)
                       and f"{c[:-5]}{CHANNEL_SUFFIX}" in found)
        if multi:
            raise InputError(f"{folder}: case(s) {multi[:5]} have several channels (_0000, _0001, ...); "
                             f"cfrseg supports single-channel images only")
        found = stripped
    dup = {c: [Path(f).name for f in fs] for c, fs in found.items() if len(fs) > 1}
    if dup:
        raise InputError(f"{folder}: duplicate case ids (several files per id): {dup}")
    return {c: fs[0] for c, fs in found.items()}


def _is_channel(cid: str) -> bool:
    return len(cid) > 5 and cid[-5] == "_" and cid[-4:].isdigit()


def _match_labels(images: dict[str, str], labels: dict[str, str], where: Path, image_dir: Path) -> dict[str, str]:
    """Labels keyed by image case id (a label named like its image, ``<id>_0000``, also matches)."""
    out: dict[str, str] = {}
    for cid, path in labels.items():
        key = cid if cid in images else (cid[: -len(CHANNEL_SUFFIX)] if cid.endswith(CHANNEL_SUFFIX) else cid)
        if key in out:
            raise InputError(f"{where}: duplicate labels for case {key!r}: {Path(out[key]).name}, {Path(path).name}")
        out[key] = path
    orphans = sorted(set(out) - set(images))
    if orphans:
        raise InputError(f"{where}: label(s) without a matching image in {image_dir}: {orphans[:10]}")
    return out


def subject_of(case_id: str, pattern: str | None, where: str = "") -> str:
    """The subject (patient) a case belongs to: the first group of ``pattern`` (a regular expression searched in
    the case id; the whole match when it has no group), or the case id itself when ``pattern`` is None.
    E.g. ``patient\\d+`` puts ACDC's ``acdc_patient001_frame01`` and ``..._frame02`` in subject ``patient001``."""
    if pattern is None:
        return case_id
    try:
        m = re.search(pattern, case_id)
    except re.error as e:
        raise InputError(f"{where}: subject pattern {pattern!r} is not a valid regular expression: {e}") from None
    if m is None:
        raise InputError(f"{where}: case id {case_id!r} does not match the subject pattern {pattern!r}")
    return m.group(1) if m.re.groups else m.group(0)


def _assign_roles(pairs: dict[str, tuple[str, str | None]], labeled: Labeled, holdout: int,
                  where: str, subject: str | None = None) -> list[Case]:
    """Cases with roles, sorted by id. ``labeled``: None = every case with a label; int L = the cases with a
    label of the first L subjects (by id) that have one; a list = exactly those ids. The cases of the last
    ``holdout`` subjects become "test"; the other cases are "unlabeled" (their label, if any, is kept in the
    Case). A subject is one case unless ``subject`` (see :func:`subject_of`) groups cases by patient, so that
    no patient is split between labeled, unlabeled and test."""
    ids = sorted(pairs)
    subj = {i: subject_of(i, subject, where) for i in ids}
    subjects = list(dict.fromkeys(subj[i] for i in ids))
    unit = "cases" if subject is None else "subjects"
    if holdout < 0 or holdout >= max(len(subjects), 1):
        raise InputError(f"{where}: holdout must be in [0, {len(subjects) - 1}] for {len(subjects)} {unit}, "
                         f"got {holdout}")
    test_subjects = set(subjects[len(subjects) - holdout:]) if holdout else set()
    test = {i for i in ids if subj[i] in test_subjects}
    with_label = [i for i in ids if pairs[i][1] and i not in test]
    if labeled is None:
        chosen = set(with_label)
    elif isinstance(labeled, int):
        labeled_subjects = list(dict.fromkeys(subj[i] for i in with_label))
        if labeled < 0 or labeled > len(labeled_subjects):
            raise InputError(f"{where}: asked for {labeled} labeled {unit} but only {len(labeled_subjects)} "
                             f"(non-test) {unit} have a label")
        first = set(labeled_subjects[:labeled])
        chosen = {i for i in with_label if subj[i] in first}
    else:
        chosen = set(labeled)
        unknown = sorted(chosen - set(ids))
        if unknown:
            raise InputError(f"{where}: labeled case id(s) {unknown} not found")
        no_label = sorted(i for i in chosen if not pairs[i][1])
        if no_label:
            raise InputError(f"{where}: case(s) {no_label} are asked to be labeled but have no label file")
        held = sorted(chosen & test)
        if held:
            raise InputError(f"{where}: case(s) {held} are both labeled and held out for test")
    cases = []
    for i in ids:
        role = "test" if i in test else ("labeled" if i in chosen else "unlabeled")
        cases.append(Case(i, pairs[i][0], pairs[i][1], role))  # type: ignore[arg-type]
    return cases


def class_presence_error(counts: Sequence[int], names: Sequence[str], where: str) -> InputError | None:
    """The error to raise when some class has no voxel in the labeled cases (``counts``: voxels per class,
    background first, summed over the labeled label maps), else None. A class nobody labeled cannot be
    learnt, and a label set like {0, 7} declared as 8 classes is almost always a mistake."""
    missing = [k for k in range(1, len(counts)) if int(counts[k]) == 0]
    if not missing:
        return None
    shown = ", ".join(f"{k} ({names[k]})" for k in missing[:20])
    return InputError(f"{where}: class(es) {shown} have no voxel in any labeled case; every declared class "
                      f"needs labeled voxels (check num_classes / dataset.json 'labels', or label a case that "
                      f"shows them)")


def manifest_from_folders(
    images_dir: str | Path,
    labels_dir: str | Path | None = None,
    labeled: Labeled = None,
    num_classes: int | None = None,
    *,
    holdout: int = 0,
    name: str | None = None,
    subject: str | None = None,
) -> Manifest:
    """A manifest from a folder of image volumes and (optionally) a folder of label volumes.

    Images and labels are matched by case id (file name without extension, nnU-Net ``_0000`` suffix stripped);
    images without a label are unlabeled; a label without an image is an error. ``num_classes`` (background
    included) is required: it is never guessed from the labeled cases' values (a small labeled subset may miss
    a class, and labels {0, 7} must not silently become 8 classes).
    """
    images_dir = Path(images_dir)
    images = _scan(images_dir, "images")
    if not images:
        raise InputError(f"{images_dir}: no image volumes found (expected .nii.gz/.nii/.nrrd/.mha/.mhd files "
                         f"or DICOM series folders)")
    labels: dict[str, str] = {}
    if labels_dir is not None:
        labels = _scan(Path(labels_dir), "labels", channels=False)
        if not labels:
            raise InputError(f"{labels_dir}: no label volumes found (empty label set)")
        labels = _match_labels(images, labels, Path(labels_dir), images_dir)
    pairs = {i: (p, labels.get(i)) for i, p in images.items()}
    cases = _assign_roles(pairs, labeled, holdout, str(images_dir), subject)
    if num_classes is None:
        if any(c.label for c in cases):
            raise InputError(f"{images_dir}: the number of classes is not known; pass num_classes "
                             f"(--num-classes K, background included) or use an nnU-Net dataset.json")
        num_classes = 2
    return Manifest(name or images_dir.resolve().parent.name or "dataset", num_classes, tuple(cases))


# ----------------------------------------------------------------------------------------------- nnU-Net / MSD


def _classes_from_labels(labels: object, where: str) -> tuple[int, tuple[str, ...]]:
    """(num_classes, class names) from dataset.json ``labels``: nnU-Net v2 {name: int} or MSD/v1
    {"0": name, ...}. Values must be 0..K-1 (background 0), each once."""
    if not isinstance(labels, dict) or not labels:
        raise InputError(f"{where}: 'labels' must be a non-empty mapping, got {labels!r}")
    if all(str(k).lstrip("-").isdigit() for k in labels):  # MSD / v1: {"0": "background", "1": "liver"}
        pairs = [(v, k) for k, v in labels.items()]
    else:  # v2: {"background": 0, "liver": 1}
        regions = {k: v for k, v in labels.items() if isinstance(v, (list, tuple))}
        if regions:
            raise InputError(f"{where}: region-based labels {regions} are not supported")
        pairs = list(labels.items())
    try:
        by_value = {int(v): str(name) for name, v in pairs}
    except (TypeError, ValueError):
        raise InputError(f"{where}: 'labels' values must be integers: {labels!r}") from None
    values = sorted(by_value)
    if 0 not in by_value or values[0] < 0:
        raise InputError(f"{where}: 'labels' must contain background 0 and no negative values: {labels!r}")
    if len(by_value) != len(pairs):
        raise InputError(f"{where}: 'labels' has repeated values: {labels!r}")
    missing = sorted(set(range(values[-1] + 1)) - set(values))
    if missing:
        raise InputError(f"{where}: 'labels' must be consecutive 0..K-1; values {missing} are not declared "
                         f"(relabel the masks so the classes are 0..{len(values) - 1})")
    return len(values), tuple(by_value[k] for k in range(len(values)))


def _resolve(root: Path, rel: object, where: str) -> str:
    if not isinstance(rel, str) or not rel:
        raise InputError(f"{where}: expected a file path, got {rel!r}")
    p = (root / rel).resolve()
    if not p.exists() and volume_suffix(p) == ".nii.gz":  # MSD lists .nii.gz; some copies are unpacked
        alt = p.with_name(p.name[:-3])
        p = alt if alt.exists() else p
    if not p.exists():
        raise InputError(f"{where}: listed file {rel!r} not found ({p})")
    return str(p)


def manifest_from_nnunet(dataset_dir: str | Path, labeled: Labeled = None, *, holdout: int = 0,
                         subject: str | None = None) -> Manifest:
    """A manifest from an MSD / nnU-Net dataset folder.

    Reads ``dataset.json`` (``labels`` gives num_classes and the class names, values 0..K-1;
    ``channel_names`` / ``modality`` must name one channel: "CT" selects CT normalisation, anything else MR). Training cases come from the MSD ``training`` list when present, else from ``imagesTr`` +
    ``labelsTr``; ``imagesTs`` (or the MSD ``test`` list) become role "test" (with ``labelsTs`` labels if any).
    """
    root = Path(dataset_dir)
    dj = root / "dataset.json"
    if not dj.is_file():
        raise InputError(f"{root}: no dataset.json (not an nnU-Net/MSD dataset folder)")
    try:
        meta = json.loads(dj.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{dj}: malformed JSON: {e}") from None
    if not isinstance(meta, dict):
        raise InputError(f"{dj}: expected a JSON object at the top level")
    if "labels" not in meta:
        raise InputError(f"{dj}: missing 'labels'")
    num_classes, class_names = _classes_from_labels(meta["labels"], str(dj))
    channels = meta.get("channel_names", meta.get("modality", {"0": "image"}))
    if not isinstance(channels, dict) or len(channels) != 1:
        raise InputError(f"{dj}: cfrseg supports single-channel images; dataset has channels {channels!r}")
    modality = modality_of(next(iter(channels.values())))

    if "training" in meta:
        training = meta["training"]
        if not isinstance(training, list):
            raise InputError(f"{dj}: 'training' must be a list of {{image, label}} entries")
        pairs: dict[str, tuple[str, str | None]] = {}
        for k, e in enumerate(training):
            if not isinstance(e, dict) or "image" not in e:
                raise InputError(f"{dj}: training entry {k} must have an 'image': {e!r}")
            img = _resolve(root, e["image"], f"{dj} training[{k}]")
            lab = _resolve(root, e["label"], f"{dj} training[{k}]") if e.get("label") else None
            cid = strip_suffix(img)
            cid = cid[: -len(CHANNEL_SUFFIX)] if cid.endswith(CHANNEL_SUFFIX) else cid
            if cid in pairs:
                raise InputError(f"{dj}: duplicate case id {cid!r} in 'training'")
            pairs[cid] = (img, lab)
        if not pairs:
            raise InputError(f"{dj}: 'training' is empty")
    else:
        images = _scan(root / "imagesTr", "imagesTr")
        labels = _scan(root / "labelsTr", "labelsTr", channels=False) if (root / "labelsTr").is_dir() else {}
        labels = _match_labels(images, labels, root / "labelsTr", root / "imagesTr")
        if not images:
            raise InputError(f"{root / 'imagesTr'}: no training images")
        pairs = {i: (p, labels.get(i)) for i, p in images.items()}
    cases = _assign_roles(pairs, labeled, holdout, str(root), subject)

    test: dict[str, tuple[str, str | None]] = {}
    if isinstance(meta.get("test"), list) and meta["test"]:
        for k, e in enumerate(meta["test"]):
            rel = e.get("image") if isinstance(e, dict) else e
            img = _resolve(root, rel, f"{dj} test[{k}]")
            cid = strip_suffix(img)
            test[cid[: -len(CHANNEL_SUFFIX)] if cid.endswith(CHANNEL_SUFFIX) else cid] = (img, None)
    elif (root / "imagesTs").is_dir():
        test = {i: (p, None) for i, p in _scan(root / "imagesTs", "imagesTs").items()}
    if test and (root / "labelsTs").is_dir():
        ts_labels = _match_labels(test, _scan(root / "labelsTs", "labelsTs", channels=False),
                                  root / "labelsTs", root / "imagesTs")
        test = {i: (p, ts_labels.get(i)) for i, p in test.items()}
    clash = sorted(set(test) & set(pairs))
    if clash:
        raise InputError(f"{root}: case id(s) {clash[:10]} appear in both training and test")
    cases += [Case(i, p, lab, "test") for i, (p, lab) in sorted(test.items())]
    name = meta.get("name") if isinstance(meta.get("name"), str) else root.name
    return Manifest(name or root.name, num_classes, tuple(cases), modality=modality, class_names=class_names)


# ----------------------------------------------------------------------------------------------- layout


def detect_layout(path: str | Path) -> Layout:
    """Which layout ``path`` is: "la", "nnunet", "folders" or "manifest" (InputError when none fits)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: data path not found")
    if p.is_file():
        if p.suffix.lower() == ".json":
            return "manifest"
        raise InputError(f"{p}: a data path must be a folder (LA, nnU-Net/MSD, images/labels) or a manifest .json")
    if is_la_dir(p):
        return "la"
    if (p / "dataset.json").is_file() or (p / "imagesTr").is_dir():
        return "nnunet"
    if (p / "images").is_dir():
        return "folders"
    if any(volume_suffix(f) and f.is_file() and not f.name.startswith(".") for f in p.iterdir()):
        return "folders"
    entries = sorted(f.name for f in p.iterdir())[:10]
    raise InputError(
        f"{p}: unknown data layout; expected an LA folder (train.list + <id>/mri_norm2.h5), an nnU-Net/MSD dataset "
        f"(dataset.json, imagesTr/, labelsTr/), images/ + labels/ folders, or a folder of volume files; "
        f"found {entries}")


def build_manifest(
    path: str | Path,
    labeled: Labeled = None,
    *,
    test: bool = False,
    holdout: int = 0,
    limit: int | None = None,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    modality: str | None = None,
    subject: str | None = None,
) -> Manifest:
    """The manifest of the data at ``path``, whatever its layout (see :func:`detect_layout`).

    ``labeled`` as in the builders (LA needs an int; None there means 16, the standard "moderate" setting).
    ``test=True`` builds an evaluation manifest: every case gets role "test" (LA: ``test.list`` is required;
    the training list is never used as a test set). ``limit`` keeps the first ``limit`` cases (LA list order,
    else sorted ids). ``num_classes`` (background included) is required for folder layouts; ``class_names``
    (background first) and ``modality`` ("MR" | "CT") override what the dataset declares. ``subject`` (a regular
    expression, :func:`subject_of`) makes ``labeled`` and ``holdout`` count patients instead of cases (nnU-Net
    and folder layouts; LA has one case per patient).
    """
    layout = detect_layout(path)
    p = Path(path)
    if subject is not None and layout in ("la", "manifest"):
        raise InputError(f"{p}: a subject pattern applies to nnU-Net and folder datasets only ({layout} data: LA has "
                         f"one case per patient, a manifest gives every case its role)")
    if layout == "la":
        if test:
            m = manifest_from_la_test(p)
        else:
            n_labeled = 16 if labeled is None else labeled
            if not isinstance(n_labeled, int):
                raise InputError(f"{p}: LA data takes a number of labeled cases, got {labeled!r}")
            return manifest_from_la(p, n_labeled, holdout=holdout, limit=limit)
    elif layout == "manifest":
        m = Manifest.load(p)
    elif layout == "nnunet":
        m = manifest_from_nnunet(p, None if test else labeled, holdout=0 if test else holdout, subject=subject)
    else:
        images, labels = (p / "images", p / "labels") if (p / "images").is_dir() else (p, None)
        if labels is not None and not labels.is_dir():
            labels = None
        m = manifest_from_folders(images, labels, None if test else labeled, num_classes,
                                  holdout=0 if test else holdout, name=p.name, subject=subject)
    if num_classes is not None and m.num_classes != num_classes:
        m = replace(m, num_classes=num_classes, class_names=None)
    if class_names is not None:
        names = tuple(str(n).strip() for n in class_names)
        if len(names) == m.num_classes - 1:
            names = ("background",) + names
        m = replace(m, class_names=names)
    if modality is not None:
        mod = str(modality).strip().upper()
        if mod not in MODALITIES:
            raise InputError(f"modality must be one of {list(MODALITIES)}, got {modality!r}")
        m = replace(m, modality=mod)
    cases = list(m.cases)
    if limit is not None:
        if limit < 1:
            raise InputError(f"limit must be >= 1, got {limit}")
        cases = cases[:limit]
    if test:
        cases = [replace(c, role="test") for c in cases]
    return replace(m, cases=tuple(cases)) if (limit is not None or test) else m


# ----------------------------------------------------------------------------------------------- loading


def _read(path: str, key: str, spacing: tuple[float, float, float] | None = None) -> Volume:
    """Read an image (key "image") or label (key "label") file; LA h5 files hold both."""
    if volume_suffix(path) in (".h5", ".hdf5"):
        return read_la_h5(path, key, spacing) if spacing else read_la_h5(path, key)
    v = read_volume(path)
    return replace(v, spacing=tuple(float(s) for s in spacing)) if spacing else v


def _geometry_text(v: Volume) -> str:
    r = lambda t: tuple(round(float(x), 4) for x in t)  # noqa: E731
    return f"shape {v.shape}, spacing {r(v.spacing)}, origin {r(v.origin)}, direction {r(v.direction)}"


def _check_label(label: Volume, image: Volume, num_classes: int, what: str, where: str) -> Volume:
    """Validate a label map against its image: same geometry, integer values in [0, num_classes). Returns the
    label as uint8 (uint16 above 256 classes)."""
    if not label.same_geometry(image):
        diffs = [n for n, ok in (
            ("shape", label.shape == image.shape),
            ("spacing", np.allclose(label.spacing, image.spacing, rtol=1e-4, atol=1e-4)),
            ("origin", np.allclose(label.origin, image.origin, rtol=1e-4, atol=1e-3)),
            ("direction", np.allclose(label.direction, image.direction, atol=1e-4))) if not ok]
        raise InputError(f"{where}: {what} geometry does not match the image ({', '.join(diffs)} differ): "
                         f"image {_geometry_text(image)}; {what} {_geometry_text(label)}")
    a = label.array
    if not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
        finite = np.isfinite(a)
        if not finite.all() or np.any(a != np.round(a)):
            vals = np.unique(a[~finite | (a != np.round(a))])[:10]
            raise InputError(f"{where}: {what} has non-integer values {vals.tolist()} "
                             f"(labels must be integers in [0, {num_classes}))")
    lo, hi = (a.min(), a.max()) if a.size else (0, 0)
    if lo < 0 or hi >= num_classes:
        vals = np.unique(a)
        bad = vals[(vals < 0) | (vals >= num_classes)]
        shown = [int(v) for v in bad[:20]]
        raise InputError(f"{where}: {what} values {shown} are outside [0, {num_classes}) "
                         f"(num_classes = {num_classes}, background included)")
    return label.with_array(a.astype(label_dtype(num_classes - 1), copy=False))


def _where(case: Case, path: str) -> str:
    return f"case {case.case_id!r} ({path})"


def load_case(case: Case, manifest: Manifest, *, check_pseudo: bool = True) -> tuple[Volume, Volume | None]:
    """Read and validate one case: returns (image as float32 [x, y, z], label as uint8/uint16 or None).

    The label is returned whenever the case has a label file, whatever its role (the caller decides by role).
    Checks: the image is 3D with finite values; the label (and the pseudo-label, if set and ``check_pseudo``)
    has the image's geometry and integer values in [0, num_classes); a "labeled" case has some foreground.
    ``manifest.spacing``, when set, replaces the files' spacing (LA). Raises InputError naming case and file.
    """
    image = _read(case.image, "image", manifest.spacing)
    if np.issubdtype(image.array.dtype, np.floating) and not np.all(np.isfinite(image.array)):
        raise InputError(f"{_where(case, case.image)}: image has NaN or infinite values")
    image = image.with_array(image.array.astype(np.float32, copy=False))
    label = None
    if case.label:
        label = _check_label(_read(case.label, "label", manifest.spacing), image, manifest.num_classes,
                             "label", _where(case, case.label))
        if case.role == "labeled" and not label.array.any():
            raise InputError(f"{_where(case, case.label)}: label has no foreground (every voxel is 0); "
                             f"a labeled case needs at least one labeled voxel")
    if check_pseudo and case.pseudo_label:
        load_pseudo_label(case, manifest, image)
    return image, label


def load_pseudo_label(case: Case, manifest: Manifest, image: Volume | None = None) -> Volume:
    """Read and validate the case's pseudo-label (uint8, same geometry as the image, values in
    [0, num_classes)). Pass ``image`` when already loaded to avoid reading it again."""
    if not case.pseudo_label:
        raise InputError(f"case {case.case_id!r} has no pseudo-label")
    if image is None:
        image = _read(case.image, "image", manifest.spacing)
    return _check_label(_read(case.pseudo_label, "label", manifest.spacing), image, manifest.num_classes,
                        "pseudo-label", _where(case, case.pseudo_label))
