"""Run records of the quality benchmark: what identifies a run, its cache key, and refusal of stale results.

A run is identified by its **spec**: profile name and the fully resolved profile (after ``--set`` overrides and
the seed), the overrides as given, seed, L, method, evaluated split and its case ids, the training case ids
(labeled, unlabeled), the data list's sha256, the code version (git commit, dirty flag and a digest of the
uncommitted changes) and the torch thread count. Its key is the sha256 of the spec's canonical JSON. One JSON
record per run, ``<method>_L<L>_seed<seed>_<split>_<key16>.json``, holds the spec, per-case metrics per model,
and wall time, CPU time, peak RSS and threads. A record is only reused when its stored spec equals the one
asked for, field by field; anything else is refused with the differing fields named.
"""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from _common import _clean  # bench/ is on sys.path for every caller (benchmarks and tests)

REPO = Path(__file__).resolve().parents[1]
#: spec fields that do not change what is trained (the trained model can be shared across them);
#: ``evaluated_with``: the code that scored a run trained by another bench commit (quality_la.adopt_trained)
EVAL_ONLY = ("split", "split_ids", "threads", "evaluated_with")


class StaleRecord(RuntimeError):
    """A stored record whose spec differs from the one asked for."""


def canonical(obj: Any) -> str:
    """Canonical JSON (sorted keys, tuples as lists, no whitespace) used for keys and comparisons."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=list)


def key_of(spec: Mapping[str, Any], drop: tuple[str, ...] = ()) -> str:
    """sha256 hex digest of the spec without the ``drop`` fields."""
    return hashlib.sha256(canonical({k: v for k, v in spec.items() if k not in drop}).encode()).hexdigest()


def train_key(spec: Mapping[str, Any]) -> str:
    """The key of what is trained (the spec without :data:`EVAL_ONLY`): runs sharing it share a model."""
    return key_of(spec, EVAL_ONLY)


def _key_without(spec: Mapping[str, Any], sections: tuple[str, ...]) -> str:
    """sha256 of the spec without method, overrides, the bench's code version and the resolved ``sections``."""
    s = {k: v for k, v in spec.items() if k not in ("method", "overrides", "code")}
    s["resolved"] = {k: v for k, v in spec["resolved"].items() if k not in sections}
    return hashlib.sha256(canonical(s).encode()).hexdigest()


def teacher_key(spec: Mapping[str, Any]) -> str:
    """The key of what a CFR run's teacher (fine-tuned SAM and its pseudo-labels) depends on: the spec without
    the re-train side (method, overrides, the resolved ``retrain`` section) and without the bench's code version
    (the core's own provenance check compares the code when the stages are reused). Runs sharing it can share
    the teacher; only the re-train stage differs."""
    return _key_without(spec, ("retrain",))


def finetune_key(spec: Mapping[str, Any]) -> str:
    """As :func:`teacher_key` without the ``pseudolabel`` section too: runs sharing it can share the fine-tuned
    SAM and differ in how it pseudo-labels (TTA, calibration...) and in the re-train side."""
    return _key_without(spec, ("retrain", "pseudolabel"))


def code_version(repo: Path = REPO) -> dict[str, Any]:
    """{"commit", "dirty", "diff_sha256"}: HEAD, whether tracked or untracked (not ignored) files differ from
    it, and a digest of those differences (so two different dirty trees never share a key)."""
    def git(*a: str) -> bytes:
        return subprocess.run(["git", *a], cwd=repo, capture_output=True, check=True, timeout=60).stdout

    try:
        commit = git("rev-parse", "HEAD").decode().strip()
        status = git("status", "--porcelain", "--untracked-files=all")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None, "diff_sha256": None}
    if not status.strip():
        return {"commit": commit, "dirty": False, "diff_sha256": None}
    h = hashlib.sha256(git("diff", "HEAD", "--binary"))
    for name in sorted(git("ls-files", "--others", "--exclude-standard", "-z").split(b"\0")):
        if name:
            h.update(name + b"\0")
            p = repo / name.decode()
            if p.is_file():
                h.update(hashlib.sha256(p.read_bytes()).digest())
    return {"commit": commit, "dirty": True, "diff_sha256": h.hexdigest()}


@functools.lru_cache(maxsize=None)
def _core_tree(commit: str, repo: Path = REPO) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", f"{commit}:src/cfrseg"], cwd=repo, capture_output=True,
                             check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.decode().strip() or None


def code_tag(code: Mapping[str, Any], repo: Path = REPO) -> str:
    """What the summaries group records by: for a clean commit, the git tree of ``src/cfrseg`` at it (``core
    <tree>``), so commits that differ only outside the core (benchmarks, tests, docs; the spec holds every
    choice the benchmark makes) share a table; a dirty tree, or a commit this clone does not have, keeps its
    own tag (commit, and the digest of its uncommitted changes)."""
    commit = code.get("commit")
    if commit and not code.get("dirty"):
        tree = _core_tree(commit, repo)
        if tree:
            return f"core {tree[:10]}"
    return (commit or "?")[:10] + ("+dirty:" + (code.get("diff_sha256") or "?")[:8] if code.get("dirty") else "")


def commits_of(records: list[Mapping[str, Any]]) -> str:
    """The commits behind a group of records, for a table's header: "a1b2c3d4e5, f6..." (dirty ones marked)."""
    tags = sorted({(r["spec"]["code"].get("commit") or "?")[:10] + (" (dirty)" if r["spec"]["code"].get("dirty")
                                                                    else "") for r in records})
    return ", ".join(tags)


def record_path(results: Path, spec: Mapping[str, Any]) -> Path:
    return Path(results) / (f"{spec['method']}_L{spec['L']}_seed{spec['seed']}_{spec['split']}_"
                            f"{key_of(spec)[:16]}.json")


def diff_fields(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Top-level fields whose canonical JSON differs between two specs."""
    return sorted(k for k in set(a) | set(b) if canonical(a.get(k)) != canonical(b.get(k)))


def load_cached(results: Path, spec: Mapping[str, Any]) -> dict[str, Any] | None:
    """The stored record of ``spec``, None when there is none; :class:`StaleRecord` when the file at its key
    holds a record of another spec (edited, or a key collision): it is never reused."""
    path = record_path(results, spec)
    if not path.is_file():
        return None
    rec = json.loads(path.read_text())
    diff = diff_fields(rec.get("spec", {}), spec)
    if diff or rec.get("key") != key_of(spec):
        raise StaleRecord(f"{path}: stored run differs in {diff or ['key']}; refusing to reuse it "
                          f"(delete the file to run again)")
    return rec


def write_record(results: Path, spec: Mapping[str, Any], models: Mapping[str, Mapping[str, Any]],
                 timing: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> Path:
    """Write the record of ``spec``: ``models`` = {model name: {case id: compute_case(...)}} for the split's
    cases (all of them, no other); ``timing`` = wall_s, cpu_s, peak_rss_mb, threads (and training figures)."""
    ids = set(spec["split_ids"])
    for name, cases in models.items():
        if set(cases) != ids:
            raise ValueError(f"model {name}: cases {sorted(set(cases) ^ ids)} differ from split {spec['split']}")
    path = record_path(results, spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = {"format": "cfrseg-bench-quality/1", "key": key_of(spec), "train_key": train_key(spec),
           "spec": dict(spec), "models": models, "timing": dict(timing), "extra": dict(extra or {})}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_clean(rec), indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def load_records(results: Path) -> list[dict[str, Any]]:
    """Every record under ``results`` (recursively), each checked against its own key."""
    out = []
    for p in sorted(Path(results).rglob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict) or rec.get("format") != "cfrseg-bench-quality/1":
            continue
        if rec.get("key") != key_of(rec["spec"]):
            raise StaleRecord(f"{p}: its key does not match its spec (edited by hand?)")
        out.append(rec)
    return out
