"""The LA evaluation protocol (docs/protocol.md): fixed validation / test / training-pool splits by case id.

The 80 ids of ``train.list`` (in the file's order, which is alphabetical by random case id) are cut by
position, once and for all:

- ``val``  = ids[64:80] (16 cases): every tuning decision is taken here. These are the cases that the earlier
  lite choices were reported on, so moving them to validation turns that past use into what it should be.
- ``test`` = ids[48:64] (16 cases): reported in docs/results.md, never used for a decision.
- ``pool`` = ids[0:48] (48 cases): training. With L labeled, ids[0:L] are labeled (the same first cases as
  before, so L=1, 4, 16 keep their labeled volumes) and ids[L:48] unlabeled. The ceiling labels all 48.

Unlabeled cases are built **without** a label path, so no stage (nor the pipeline's pseudo-label quality
report) can read their ground truth. Validation and test cases are not in the training manifest at all,
except as role "test" for the split being evaluated.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

N_CASES = 80
SPLITS = {"pool": (0, 48), "test": (48, 64), "val": (64, 80)}
EVAL_SPLITS = ("val", "test")


def read_ids(root: str | Path) -> tuple[list[str], str]:
    """The ids of ``<root>/train.list`` and the file's sha256; ValueError unless it holds 80 unique ids."""
    from cfrseg.data.la import read_list

    path = Path(root) / "train.list"
    ids = read_list(path)
    if len(ids) != N_CASES:
        raise ValueError(f"{path}: the protocol needs the standard 80-case train.list, found {len(ids)} ids")
    return ids, hashlib.sha256(path.read_bytes()).hexdigest()


def split_ids(ids: list[str]) -> dict[str, list[str]]:
    """{"pool": [...48], "test": [...16], "val": [...16]} from the 80 ids (see the module docstring)."""
    if len(ids) != N_CASES or len(set(ids)) != N_CASES:
        raise ValueError(f"expected {N_CASES} unique ids, got {len(ids)} ({len(set(ids))} unique)")
    out = {name: ids[a:b] for name, (a, b) in SPLITS.items()}
    check_disjoint(out.values())
    return out


def check_disjoint(groups: Iterable[Iterable[str]]) -> None:
    """ValueError when a case id appears in two of ``groups``."""
    seen: dict[str, int] = {}
    for i, g in enumerate(groups):
        for cid in g:
            if cid in seen and seen[cid] != i:
                raise ValueError(f"case {cid} is in two splits ({seen[cid]} and {i})")
            seen[cid] = i


def resolve_labeled(value: str | int, pool_size: int) -> int:
    """An L given as an int or "all" (the ceiling: the whole pool labeled); ValueError outside 1..pool_size."""
    n = pool_size if str(value) == "all" else int(value)
    if not 1 <= n <= pool_size:
        raise ValueError(f"labeled must be in 1..{pool_size} or 'all', got {value!r}")
    return n


def roles(ids: list[str], labeled: int, eval_splits: Iterable[str]) -> dict[str, list[str]]:
    """Case ids by role for ``labeled`` labeled cases, evaluated on ``eval_splits`` (names in EVAL_SPLITS)."""
    sp = split_ids(ids)
    n = resolve_labeled(labeled, len(sp["pool"]))
    ev = list(eval_splits)
    bad = [s for s in ev if s not in EVAL_SPLITS]
    if bad or not ev:
        raise ValueError(f"evaluation splits must be a non-empty subset of {EVAL_SPLITS}, got {ev}")
    out = {"labeled": sp["pool"][:n], "unlabeled": sp["pool"][n:],
           "test": [c for s in EVAL_SPLITS if s in ev for c in sp[s]]}
    check_disjoint(out.values())
    return out


def manifest(root: str | Path, labeled: int, eval_splits: Iterable[str]):
    """The training + evaluation :class:`cfrseg.data.manifest.Manifest` of the protocol (LA, 2 classes)."""
    from cfrseg.data.io import LA_SPACING
    from cfrseg.data.la import LA_FILE, LA_NAME
    from cfrseg.data.manifest import Case, Manifest

    root = Path(root)
    ids, _ = read_ids(root)
    r = roles(ids, labeled, eval_splits)
    cases = []
    for role, members in r.items():
        for cid in members:
            f = str(root / cid / LA_FILE)
            cases.append(Case(cid, f, None if role == "unlabeled" else f, role))  # type: ignore[arg-type]
    return Manifest(LA_NAME, 2, tuple(cases), tuple(float(s) for s in LA_SPACING))  # type: ignore[arg-type]
