"""Which registry weights a stage needs, and whether the weights folder (``CFRSEG_CACHE``) has them.

The services never download weights: the operator fills the folder (``cfrseg weights fetch lite_medsam --dest
./weights``; ``sam_vit_b_01ec64.pth`` is operator-provided) and compose mounts it read-only at ``/weights``.

"Needs" (docs/services.md, "Weights and devices"):
- a **job** needs the weight of its SAM model (:data:`cfrseg.sam.weights.MODEL_WEIGHTS`: ``lite_medsam`` ->
  ``lite_medsam``, ``vit_b`` -> ``sam_vit_b``) unless its config names a ``checkpoint``; fine-tune reads the model
  from its config, pseudo-label from the fine-tune stage's ``config.json``; re-train needs none. A job whose
  weight is missing or wrong fails at ``Start`` with FAILED_PRECONDITION naming the file and the command.
- a **service** is SERVING when the weights of ``CFRSEG_REQUIRED_WEIGHTS`` are present and match their sha256:
  ``auto`` (default) = what the default profile (``CFRSEG_DEFAULT_PROFILE``, ``lite``) needs for this stage;
  ``none``; or a comma-separated list of registry names. Other profiles' weights are optional: the service
  stays SERVING without them and only the jobs that need them fail fast.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cfrseg.errors import ConfigError, NotFoundError
from cfrseg.sam.weights import WEIGHTS, how_to_get, sha256_file, weight_for_model

log = logging.getLogger("cfrseg.services.weights")
SAM_STAGES = ("finetune", "pseudolabel")
#: where the operator's weights folder is, as written in messages (compose mounts ./weights at /weights)
HOST_DEST = "./weights"


class WeightsDir:
    """A weights folder with a sha256 cache (a file is hashed again only when its size, mtime or inode change)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._hashes: dict[str, tuple[tuple[int, int, int], str]] = {}
        self._lock = threading.Lock()

    def file(self, name: str) -> Path:
        return self.path / WEIGHTS[name].filename

    def problem(self, name: str) -> str | None:
        """None when weight ``name`` is present with the right size and sha256, else the reason and the fix."""
        if name not in WEIGHTS:
            return f"unknown weight {name!r} (known: {sorted(WEIGHTS)})"
        spec = WEIGHTS[name]
        p = self.file(name)
        fix = f"fill the weights folder (mounted at {self.path}): {how_to_get(name, HOST_DEST)}"
        try:
            st = p.stat()
        except OSError:
            return f"{name}: {p} is missing; {fix}"
        if st.st_size != spec.size:
            return f"{name}: {p} has {st.st_size} bytes, expected {spec.size}; {fix}"
        stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
        with self._lock:
            hit = self._hashes.get(name)
        if hit is not None and hit[0] == stamp:
            digest = hit[1]
        else:
            try:
                digest = sha256_file(p)
            except OSError as e:
                return f"{name}: cannot read {p} ({e.strerror}); {fix}"
            with self._lock:
                self._hashes[name] = (stamp, digest)
        if digest != spec.sha256:
            return f"{name}: {p} has sha256 {digest}, expected {spec.sha256} (corrupted or another file); {fix}"
        return None

    def problems(self, names: list[str]) -> str | None:
        bad = [r for r in (self.problem(n) for n in names) if r]
        return "; ".join(bad) if bad else None


def model_needs(model: str | None, checkpoint: str | None = None) -> list[str]:
    """The registry weight a SAM ``model`` needs when no explicit ``checkpoint`` is configured."""
    if checkpoint:
        return []
    w = weight_for_model(model)
    return [w] if w else []


def profile_needs(stage: str, profile: str) -> list[str]:
    """What the named profile needs on ``stage``'s service (the SAM base for fine-tune and pseudo-label)."""
    if stage not in SAM_STAGES:
        return []
    from cfrseg.config import load_profile

    ft = load_profile(profile).get("finetune", {})
    return model_needs(ft.get("model"), ft.get("checkpoint"))


def required(stage: str, spec: str, default_profile: str) -> list[str]:
    """``CFRSEG_REQUIRED_WEIGHTS`` (auto | none | a,b) -> the weight names this service must have to serve."""
    s = spec.strip().lower()
    if s in ("", "auto"):
        try:
            return profile_needs(stage, default_profile)
        except (ConfigError, NotFoundError, OSError, ValueError) as e:
            raise ConfigError(f"CFRSEG_DEFAULT_PROFILE={default_profile!r}: {e}") from None
    if s == "none":
        return []
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in WEIGHTS]
    if unknown:
        raise ConfigError(f"CFRSEG_REQUIRED_WEIGHTS: unknown weight(s) {unknown}; known: {sorted(WEIGHTS)}")
    return names


def job_needs(stage: str, config: Mapping[str, Any], inputs: Mapping[str, Any]) -> list[str]:
    """The weights one job needs (see the module docstring). ``inputs``: the request's input stores."""
    if stage == "finetune":
        return model_needs(config.get("model"), config.get("checkpoint"))
    if stage == "pseudolabel":
        if config.get("checkpoint") or "finetuned" not in inputs:
            return []
        try:
            ft = json.loads(inputs["finetuned"].get_bytes("config.json"))
        except NotFoundError:
            return []  # no fine-tune config to read (the core reports a missing fine-tune itself)
        return model_needs(ft.get("model"), None)
    return []
