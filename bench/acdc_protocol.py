"""The ACDC evaluation protocol (docs/protocol.md): validation and training pool by **patient**, from the train list.

The shared ACDC folder (nnU-Net layout, 4 classes) has ``splits.json`` with the source repository's ``train``
(70 patients, 140 frames) and ``val`` (10 patients) lists. This protocol uses ``train`` only:

- ``val``  = the last 10 patients of ``train`` (in the file's order; 20 frames): every tuning decision is taken
  here, and only here.
- ``pool`` = the first 60 patients of ``train``: with L labeled patients, the first L patients (both frames) are
  labeled and the remaining pool patients unlabeled (built without a label path: no stage can read their
  ground truth). L = 3 and L = 14 are about 5 % and 20 % of the 70 training patients (SSL4MIS's settings).
- ``test`` = ``splits.json``'s ``val`` list (10 other patients, 20 frames), read only when the test split is
  asked for (``--split test``): no tuning decision reads it; it scores the settings decided on ``val`` (the
  source repository's own test list is not in the shared folder).

Both frames (ED, ES) of a patient are always on the same side. ``max_pool`` / ``max_val`` keep only the first
patients of the pool / evaluated split (smoke runs); they are part of every run's spec.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

N_VAL = 10
SPLITS = ("val", "test")
PATIENT = re.compile(r"^(acdc_patient\d+)_frame\d+$")


def read_train(root: str | Path) -> tuple[list[str], str]:
    """The frame ids of ``splits.json``'s ``train`` list (file order) and the file's sha256."""
    path = Path(root) / "splits.json"
    if not path.is_file():
        raise ValueError(f"{path}: missing (the ACDC folder needs splits.json with a 'train' list)")
    raw = path.read_bytes()
    ids = json.loads(raw).get("train")
    if not isinstance(ids, list) or not ids or len(set(ids)) != len(ids):
        raise ValueError(f"{path}: 'train' must be a non-empty list of unique frame ids")
    return [str(i) for i in ids], hashlib.sha256(raw).hexdigest()


def read_test(root: str | Path) -> list[str]:
    """The frame ids of ``splits.json``'s ``val`` list, the protocol's test split (read only for ``--split
    test``); ValueError when it is missing, empty or shares a patient with the ``train`` list."""
    path = Path(root) / "splits.json"
    ids = json.loads(path.read_bytes()).get("val") if path.is_file() else None
    if not isinstance(ids, list) or not ids or len(set(ids)) != len(ids):
        raise ValueError(f"{path}: the test split needs a non-empty 'val' list of unique frame ids")
    ids = [str(i) for i in ids]
    shared = set(patients(ids)) & set(patients(read_train(root)[0]))
    if shared:
        raise ValueError(f"{path}: 'val' and 'train' share patients {sorted(shared)}")
    return ids


def patients(ids: list[str]) -> dict[str, list[str]]:
    """{patient: [frame ids]} in order of first appearance; ValueError on an id that names no patient."""
    out: dict[str, list[str]] = {}
    for cid in ids:
        m = PATIENT.match(cid)
        if not m:
            raise ValueError(f"frame id {cid!r} is not acdc_patientNNN_frameFF")
        out.setdefault(m.group(1), []).append(cid)
    return out


def split_patients(ids: list[str], max_pool: int | None = None, max_val: int | None = None
                   ) -> dict[str, list[str]]:
    """{"pool": [patients], "val": [patients]}: the last :data:`N_VAL` patients are validation, the rest the
    pool; ``max_pool`` / ``max_val`` keep the first ones of each (smoke runs)."""
    pats = list(patients(ids))
    if len(pats) <= N_VAL + 1:
        raise ValueError(f"the protocol needs more than {N_VAL + 1} patients in the train list, got {len(pats)}")
    pool, val = pats[:-N_VAL], pats[-N_VAL:]
    for name, n, full in (("max_pool", max_pool, pool), ("max_val", max_val, val)):
        if n is not None and not 1 <= n <= len(full):
            raise ValueError(f"{name} must be in 1..{len(full)}, got {n}")
    return {"pool": pool[:max_pool] if max_pool else pool, "val": val[:max_val] if max_val else val}


def roles(ids: list[str], labeled: int, max_pool: int | None = None, max_val: int | None = None,
          test_ids: list[str] | None = None) -> dict[str, list[str]]:
    """Frame ids by role: ``labeled`` (the first L pool patients), ``unlabeled`` (the other pool patients) and
    ``test`` (the evaluated frames: the validation patients, or the patients of ``test_ids`` when given, the
    first ``max_val`` of either). ValueError unless 1 <= L <= pool size."""
    sp = split_patients(ids, max_pool, max_val)
    if not 1 <= labeled <= len(sp["pool"]):
        raise ValueError(f"labeled patients must be in 1..{len(sp['pool'])}, got {labeled}")
    frames = patients(ids)
    if test_ids is None:
        evaluated = [f for p in sp["val"] for f in frames[p]]
    else:
        tp = patients(test_ids)
        evaluated = [f for p in list(tp)[:max_val] for f in tp[p]]
    out = {"labeled": [f for p in sp["pool"][:labeled] for f in frames[p]],
           "unlabeled": [f for p in sp["pool"][labeled:] for f in frames[p]],
           "test": evaluated}
    seen = [f for v in out.values() for f in v]
    if len(seen) != len(set(seen)):
        raise ValueError("a frame is in two roles")
    return out


def manifest(root: str | Path, labeled: int, max_pool: int | None = None, max_val: int | None = None,
             split: str = "val"):
    """The training + evaluated-split :class:`cfrseg.data.manifest.Manifest` (4 classes, names from
    dataset.json); ``split`` "val" or "test" (:func:`read_test`)."""
    from cfrseg.data.datasets import manifest_from_nnunet
    from cfrseg.data.manifest import Case, Manifest

    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    root = Path(root)
    ids, _ = read_train(root)
    base = manifest_from_nnunet(root)                       # reads dataset.json, pairs the files
    full = {c.case_id: c for c in base.cases}
    r = roles(ids, labeled, max_pool, max_val, read_test(root) if split == "test" else None)
    cases = []
    for role, members in r.items():
        for cid in members:
            if cid not in full:
                raise ValueError(f"{cid}: listed in splits.json but not in imagesTr/labelsTr")
            c = full[cid]
            cases.append(Case(cid, c.image, None if role == "unlabeled" else c.label, role))  # type: ignore[arg-type]
    return Manifest(base.name, base.num_classes, tuple(cases), None, base.modality, base.class_names)
