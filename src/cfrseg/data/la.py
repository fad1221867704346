"""The LA 2018 dataset (left atrium, LGE-MRI) in the UA-MT layout: manifests and a validating downloader.

Layout: ``<root>/<CASE_ID>/mri_norm2.h5`` plus ``train.list`` (80 ids, standard order) and, when present,
``test.list``. Each h5 holds ``image`` (float32, shape (X, Y, 88), [x, y, z]) and ``label`` (uint8 {0, 1}, same
shape); no spacing is stored, the challenge documents 0.625 mm isotropic voxels (``LA_SPACING``).
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

from cfrseg.data.io import LA_SPACING
from cfrseg.data.manifest import Case, Manifest
from cfrseg.errors import InputError

LA_FILE = "mri_norm2.h5"
LA_NAME = "la2018"
LA_CLASSES = ("background", "left_atrium")
#: The UA-MT repository's data folder (train.list, test.list, "2018LA_Seg_Training Set/<id>/mri_norm2.h5").
LA_BASE_URL = "https://github.com/yulequan/UA-MT/raw/master/data"
LA_REMOTE_DIR = "2018LA_Seg_Training Set"


def read_list(path: str | Path) -> list[str]:
    """The case ids of a ``*.list`` file, one per line (blank lines ignored); duplicate ids are an error."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: list file not found")
    ids = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
    if not ids:
        raise InputError(f"{p}: list file is empty")
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise InputError(f"{p}: duplicate case ids {dup}")
    return ids


def is_la_dir(path: str | Path) -> bool:
    """True when ``path`` looks like an LA folder: a list file whose first id has ``<id>/mri_norm2.h5``."""
    root = Path(path)
    for name in ("train.list", "test.list"):
        lst = root / name
        if lst.is_file():
            first = next((ln.strip() for ln in lst.read_text().splitlines() if ln.strip()), None)
            if first and (root / first / LA_FILE).is_file():
                return True
    return False


def _la_cases(root: Path, ids: list[str], list_file: Path) -> list[Path]:
    files = [root / i / LA_FILE for i in ids]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise InputError(f"{list_file}: {len(missing)} listed case(s) have no {LA_FILE}: {missing[:5]}{more}")
    return files


def manifest_from_la(
    root: str | Path,
    labeled: int,
    list_file: str = "train.list",
    holdout: int = 0,
    limit: int | None = None,
    spacing: tuple[float, float, float] = LA_SPACING,
) -> Manifest:
    """The standard LA semi-supervised split: the first ``labeled`` ids of ``list_file`` are labeled, the last
    ``holdout`` ids are role "test", the rest unlabeled.

    ``limit`` keeps only the first ``limit`` ids of the list (before the holdout is taken). Every case keeps its
    label (the same h5 file, key ``label``) so evaluation can use it; the role decides how training uses it.
    """
    root = Path(root)
    lst = root / list_file
    ids = read_list(lst)
    if limit is not None:
        if limit < 1:
            raise InputError(f"limit must be >= 1, got {limit}")
        ids = ids[:limit]
    n = len(ids)
    if holdout < 0 or holdout >= n:
        raise InputError(f"{lst}: holdout must be in [0, {n - 1}] for {n} cases, got {holdout}")
    if labeled < 0 or labeled > n - holdout:
        raise InputError(f"{lst}: labeled must be in [0, {n - holdout}] ({n} cases, holdout {holdout}), "
                         f"got {labeled}")
    files = _la_cases(root, ids, lst)
    cases = []
    for k, (cid, f) in enumerate(zip(ids, files)):
        role = "labeled" if k < labeled else ("test" if k >= n - holdout else "unlabeled")
        cases.append(Case(cid, str(f), str(f), role))  # type: ignore[arg-type]
    return Manifest(LA_NAME, 2, tuple(cases), tuple(float(s) for s in spacing),  # type: ignore[arg-type]
                    class_names=LA_CLASSES)


def manifest_from_la_test(root: str | Path, list_file: str | None = None,
                          spacing: tuple[float, float, float] = LA_SPACING) -> Manifest:
    """Every case of ``test.list`` (or of ``list_file``) as role "test".

    There is no fallback to ``train.list``: a folder without ``test.list`` is an error, because the training
    list's cases are what a model is trained on and scoring them would report training cases as test results.
    """
    root = Path(root)
    name = list_file or "test.list"
    lst = root / name
    if not lst.is_file():
        raise InputError(f"{root}: no {name} here; an LA test set needs its own list (train.list holds the "
                         f"training cases and is never used as a test set)")
    if name == "train.list":
        raise InputError(f"{lst}: train.list holds the training cases; it cannot be a test list")
    ids = read_list(lst)
    files = _la_cases(root, ids, lst)
    cases = tuple(Case(cid, str(f), str(f), "test") for cid, f in zip(ids, files))
    return Manifest(f"{LA_NAME}-test", 2, cases, tuple(float(s) for s in spacing),  # type: ignore[arg-type]
                    class_names=LA_CLASSES)


# ----------------------------------------------------------------------------------------------------- fetch


def validate_la_h5(path: str | Path) -> tuple[int, int, int]:
    """Check an LA h5 file: it opens, has ``image`` and ``label`` of the same 3D shape, label values in {0, 1}.

    Returns the shape (X, Y, Z); raises InputError naming the file and the problem.
    """
    import h5py

    p = Path(path)
    try:
        with h5py.File(p, "r") as f:
            missing = [k for k in ("image", "label") if k not in f]
            if missing:
                raise InputError(f"{p}: missing dataset(s) {missing} (has {sorted(f.keys())})")
            ishape, lshape = tuple(f["image"].shape), tuple(f["label"].shape)
            if len(ishape) != 3:
                raise InputError(f"{p}: image has shape {ishape}; expected 3D")
            if ishape != lshape:
                raise InputError(f"{p}: image shape {ishape} != label shape {lshape}")
            label = f["label"][()]
    except InputError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise InputError(f"{p}: not a readable h5 file (truncated or corrupt?): {e}") from None
    bad = np.setdiff1d(np.unique(label), [0, 1])
    if bad.size:
        raise InputError(f"{p}: label values must be 0/1, found {bad[:10].tolist()}")
    return ishape  # type: ignore[return-value]


def _download(url: str, dest: Path, timeout: float, retries: int) -> None:
    """Download ``url`` to ``dest`` atomically (``.part`` file + rename), retrying transient failures."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part")
    last: Exception | None = None
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
                expected = r.headers.get("Content-Length")
                n = 0
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    n += len(chunk)
            if expected is not None and n != int(expected):
                raise OSError(f"truncated download: got {n} of {expected} bytes")
            os.replace(tmp, dest)
            return
        except urllib.error.HTTPError as e:
            tmp.unlink(missing_ok=True)
            if e.code < 500:  # 404 etc.: retrying will not help
                raise InputError(f"download failed: {url}: HTTP {e.code} {e.reason}") from None
            last = e
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            tmp.unlink(missing_ok=True)
            last = e
        if attempt < retries:
            time.sleep(min(2.0**attempt, 10.0))
    raise InputError(f"download failed after {retries + 1} tries: {url}: {last}")


def fetch_la2018(
    dest: str | Path,
    base_url: str = LA_BASE_URL,
    *,
    lists: tuple[str, ...] = ("train.list", "test.list"),
    limit: int | None = None,
    progress: bool = True,
    timeout: float = 60.0,
    retries: int = 3,
) -> Path:
    """Download the LA 2018 h5 files (UA-MT layout) into ``dest/<id>/mri_norm2.h5``; returns ``dest``.

    Fetches the list files from ``base_url``, then every listed case from
    ``base_url/2018LA_Seg_Training Set/<id>/mri_norm2.h5`` (``limit``: only the first ``limit`` ids per list).
    Files are written atomically; present files that validate are skipped (resume), invalid ones fetched again.
    Every downloaded file is validated (see :func:`validate_la_h5`); any failure raises InputError.
    """
    from tqdm import tqdm

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    base = base_url.rstrip("/")
    ids: list[str] = []
    for name in lists:
        _download(f"{base}/{urllib.parse.quote(name)}", dest / name, timeout, retries)
        listed = read_list(dest / name)
        ids += [i for i in (listed[:limit] if limit else listed) if i not in ids]
    for cid in ids:
        if "/" in cid or "\\" in cid or cid in (".", ".."):
            raise InputError(f"invalid case id {cid!r} in the downloaded list files")
    for cid in tqdm(ids, desc="LA 2018", unit="case", disable=not progress):
        target = dest / cid / LA_FILE
        if target.is_file():
            try:
                validate_la_h5(target)
                continue
            except InputError:
                target.unlink()
        url = f"{base}/{urllib.parse.quote(LA_REMOTE_DIR)}/{urllib.parse.quote(cid)}/{LA_FILE}"
        _download(url, target, timeout, retries)
        try:
            validate_la_h5(target)
        except InputError as e:
            target.unlink(missing_ok=True)
            raise InputError(f"downloaded file from {url} is invalid: {e}") from None
    return dest
