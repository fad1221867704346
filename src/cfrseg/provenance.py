"""Provenance of stage results: what data, settings and code made them, and the rule for reusing them.

Every stage records in its store (``provenance.json``, and inside its checkpoint and artifact) digests of

- the **manifest**: every case's id, role and the sha256 of its image, label and pseudo-label files (file
  contents, not paths: a service's local copies digest like the originals), plus num_classes, class names,
  modality and the spacing override (the dataset's name does not count);
- the **resolved configuration**: the stage's training fields (operational ones such as ``device``,
  ``resume`` or ``checkpoint_interval_s`` excluded);
- the **code**: ``cfrseg.__version__`` and a sha256 over the package's Python sources;
- the **plan** (:mod:`cfrseg.data.plan`) and the stage's **inputs** (e.g. the fine-tuned ``finetune.pt``).

:func:`guard` is the reuse rule: a store that already holds a run of the stage is reused (finished stage
returned, checkpoint continued) only with ``resume`` **and** equal digests; otherwise a clear error says
what differs, or that a fresh output folder (or ``--resume``) is needed. :func:`check_disjoint` is the
test-set guard (no test case may share an id or an image sha256 with a training case).
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from cfrseg.data.manifest import Case, Manifest
from cfrseg.errors import ConfigError, InputError
from cfrseg.store import Store, get_json, put_json

PROVENANCE = "provenance.json"
_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def digest(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys, tuples as lists)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def normalize(obj: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-normalised copy (tuples -> lists) so that a loaded record compares equal to a fresh one."""
    return json.loads(json.dumps(dict(obj), sort_keys=True, default=str))


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's contents (a folder, e.g. a DICOM series: of its sorted relative names and file
    digests). Cached per (path, size, mtime) for the life of the process."""
    p = Path(path)
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")):
            h.update(f.relative_to(p).as_posix().encode() + b"\0" + file_sha256(f).encode())
        return h.hexdigest()
    try:
        st = p.stat()
    except OSError:
        raise InputError(f"{p}: file not found") from None
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def case_record(c: Case) -> dict[str, Any]:
    return {"role": c.role, "image": file_sha256(c.image), "label": file_sha256(c.label) if c.label else None,
            "pseudo_label": file_sha256(c.pseudo_label) if c.pseudo_label else None}


def manifest_record(m: Manifest, cases: Iterable[Case] | None = None) -> dict[str, Any]:
    """What a stage's result depends on in a manifest (see the module docstring); ``cases`` limits it."""
    return {"num_classes": m.num_classes, "class_names": list(m.names), "modality": m.modality,
            "spacing": list(m.spacing) if m.spacing else None,
            "cases": {c.case_id: case_record(c) for c in (m.cases if cases is None else cases)}}


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, str]:
    """``{"version": cfrseg.__version__, "sha256": digest of the package's .py sources}``."""
    import cfrseg

    root = Path(cfrseg.__file__).parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return {"version": cfrseg.__version__, "sha256": h.hexdigest()}


def stage_provenance(stage: str, manifest: Manifest, config: Mapping[str, Any], *, plan: str | None = None,
                     inputs: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The provenance record of a stage run: manifest record and digest, config fields and digest, code
    version, plan digest, input digests."""
    rec = manifest_record(manifest)
    cfg = normalize(config)
    return {"stage": stage, "manifest": digest(rec), "cases": rec["cases"],
            "dataset": {k: rec[k] for k in ("num_classes", "class_names", "modality", "spacing")},
            "config": digest(cfg), "config_fields": cfg, "code": code_version(), "plan": plan,
            "inputs": dict(inputs or {})}


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two provenance records (empty when the run may be reused)."""
    out: list[str] = []
    if old.get("manifest") != new.get("manifest"):
        oc, nc = old.get("cases", {}), new.get("cases", {})
        added, removed = sorted(set(nc) - set(oc)), sorted(set(oc) - set(nc))
        roles = {k: f"{oc[k]['role']}->{nc[k]['role']}" for k in sorted(set(oc) & set(nc))
                 if oc[k].get("role") != nc[k].get("role")}
        files = sorted(k for k in set(oc) & set(nc)
                       if any(oc[k].get(f) != nc[k].get(f) for f in ("image", "label", "pseudo_label")))
        parts = []
        if added:
            parts.append(f"cases added {_few(added)}")
        if removed:
            parts.append(f"cases removed {_few(removed)}")
        if roles:
            parts.append(f"roles changed {dict(list(roles.items())[:8])}")
        if files:
            parts.append(f"files changed for {_few(files)}")
        od, nd = old.get("dataset", {}), new.get("dataset", {})
        parts += [f"{k} {od.get(k)!r}->{nd.get(k)!r}" for k in sorted(set(od) | set(nd))
                  if od.get(k) != nd.get(k)]
        out.append("data: " + ("; ".join(parts) if parts else "the manifest differs"))
    if old.get("config") != new.get("config"):
        of, nf = old.get("config_fields", {}), new.get("config_fields", {})
        keys = sorted(k for k in set(of) | set(nf) if of.get(k) != nf.get(k))
        out.append("settings: " + ", ".join(f"{k} {of.get(k)!r}->{nf.get(k)!r}" for k in keys[:10]))
    if old.get("code") != new.get("code"):
        o, n = old.get("code") or {}, new.get("code") or {}
        out.append(f"code: cfrseg {o.get('version')} ({str(o.get('sha256'))[:12]}) -> {n.get('version')} "
                   f"({str(n.get('sha256'))[:12]})")
    if old.get("plan") != new.get("plan"):
        out.append(f"plan: {str(old.get('plan'))[:12]} -> {str(new.get('plan'))[:12]} (another dataset "
                   f"fingerprint or planning rule)")
    oi, ni = old.get("inputs", {}), new.get("inputs", {})
    for k in sorted(set(oi) | set(ni)):
        if oi.get(k) != ni.get(k):
            out.append(f"input {k}: {str(oi.get(k))[:12]} -> {str(ni.get(k))[:12]}")
    return out


def _few(ids: Sequence[str], n: int = 8) -> str:
    return str(list(ids[:n]))[:-1] + (f", ... ({len(ids)} in all)]" if len(ids) > n else "]")


def _present(store: Store, markers: Sequence[str]) -> list[str]:
    found = []
    for m in markers:
        if m.endswith("/"):
            if store.list(m):
                found.append(m)
        elif store.exists(m):
            found.append(m)
    return found


def guard(store: Store, stage: str, prov: Mapping[str, Any], resume: bool, markers: Sequence[str]) -> bool:
    """Apply the reuse rule before a stage writes anything. Returns True when the store holds an earlier run
    of this stage that may be continued or reused, False when it holds none (``provenance.json`` is then
    written). Raises ConfigError when the store holds a run and ``resume`` is off, when that run has no
    provenance, or when any digest differs (the message lists the differences)."""
    found = _present(store, [PROVENANCE, *markers])
    if not found:
        put_json(store, PROVENANCE, dict(prov))
        return False
    if not resume:
        raise ConfigError(f"{store!r} already holds a {stage} run ({', '.join(found)}); pass --resume "
                          f"(resume=true) to continue or reuse it, or write to a fresh output folder")
    if not store.exists(PROVENANCE):
        raise ConfigError(f"{store!r} holds a {stage} run without {PROVENANCE} (made by an older cfrseg): "
                          f"its data and settings cannot be checked; write to a fresh output folder")
    diffs = differences(get_json(store, PROVENANCE), normalize(prov))
    if diffs:
        raise ConfigError(f"cannot resume the {stage} run in {store!r}: it was made with other inputs: "
                          + " | ".join(diffs) + ". Write to a fresh output folder, or restore the original "
                          "inputs and settings")
    return True


def training_images(prov: Mapping[str, Any]) -> dict[str, str]:
    """case id -> image sha256 of the training (labeled + unlabeled) cases of a provenance record."""
    return {cid: r["image"] for cid, r in prov.get("cases", {}).items() if r.get("role") != "test"}


def check_disjoint(training: Iterable[Case] | Mapping[str, str], test: Iterable[Case],
                   what: str = "test set") -> None:
    """The test-set guard: InputError when a test case has the id or the image sha256 of a training case.
    ``training``: cases, or case id -> image sha256 (e.g. :func:`training_images` of a model's record)."""
    if isinstance(training, Mapping):
        ids, shas = set(training), {sha: cid for cid, sha in training.items()}
    else:
        train = list(training)
        ids, shas = {c.case_id for c in train}, {file_sha256(c.image): c.case_id for c in train}
    test = list(test)
    same_id = sorted(c.case_id for c in test if c.case_id in ids)
    same_img = sorted(f"{c.case_id}={shas[s]}" for c in test if (s := file_sha256(c.image)) in shas
                      and c.case_id not in ids)
    if same_id or same_img:
        parts = []
        if same_id:
            parts.append(f"same case id as a training case: {_few(same_id)}")
        if same_img:
            parts.append(f"same image file content (sha256) as a training case: {_few(same_img)}")
        raise InputError(f"the {what} overlaps the training data ({'; '.join(parts)}); scoring training "
                         f"cases would overstate the results: use test cases the model never trained on")
