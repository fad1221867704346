"""Run overrides from clients (``SubmitRun.config_overrides_json``, ``cfrseg client submit --set``) go through an
allow-list with bounds.

Clients may tune training (iterations, batch sizes, learning rates, crop and patch sizes, SSL weights, ...)
within bounds that keep one run within reason on one GPU. They may never name files (``finetune.checkpoint``,
``pseudolabel.checkpoint``: weights come from the server's profile), choose the device, resume flags or the
network's constructor arguments (``network_kwargs``: unbounded memory), nor set the SSL method here (that is
``ssl_method``). Anything not listed is refused with INVALID_ARGUMENT naming the key; a value out of bounds names
the key and the bound. The core's config classes still validate the combination afterwards.

The bounds are deliberately generous for the paper's settings (6000 iterations, 112x112x80 patches, batch 2+2);
an operator who needs more edits :data:`RULES` (or the server-side profile).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from cfrseg.errors import InputError


@dataclass(frozen=True)
class Rule:
    kind: str                                # int | float | bool | choice | ints | floats
    lo: float | None = None                  # inclusive bounds (int/float and each element of ints/floats)
    hi: float | None = None
    n: int | tuple[int, int] | None = None   # ints/floats: exact length, or (min, max)
    choices: tuple[str, ...] = ()
    nullable: bool = False                   # None allowed (e.g. retrain.zoom)
    words: tuple[str, ...] = ()              # strings also allowed in place of the value (finetune.crop "auto")

    def describe(self) -> str:
        if self.kind == "bool":
            return "true or false"
        if self.kind == "choice":
            return f"one of {list(self.choices)}"
        rng = f"in [{_num(self.lo)}, {_num(self.hi)}]"
        if self.kind in ("int", "float"):
            return f"{'an integer' if self.kind == 'int' else 'a number'} {rng}"
        n = self.n if isinstance(self.n, int) else f"{self.n[0]}-{self.n[1]}"  # type: ignore[index]
        what = "integers" if self.kind == "ints" else "numbers"
        return (f"a list of {n} {what}, each {rng}" + (", or null" if self.nullable else "")
                + "".join(f", or {w!r}" for w in self.words))


def _num(x: float | None) -> str:
    return "-inf" if x is None else (str(int(x)) if float(x).is_integer() else str(x))


def I(lo: int, hi: int) -> Rule:
    return Rule("int", lo, hi)


def F(lo: float, hi: float) -> Rule:
    return Rule("float", lo, hi)


def C(*choices: str) -> Rule:
    return Rule("choice", choices=choices)


B = Rule("bool")
SEED = I(0, 2**31 - 1)
FRACTION = F(0.0, 1.0)
CKPT_S = F(10.0, 86400.0)
INFER = {
    "patch": Rule("ints", 8, 512, 3), "stride": Rule("ints", 1, 512, 3), "batch_size": I(1, 64),
    "gaussian": B, "largest_component": B, "precision": C("fp32", "bf16", "auto"),
}

#: section -> key -> rule. Keys not listed are refused.
RULES: dict[str, dict[str, Rule]] = {
    "finetune": {
        "iterations": I(1, 50_000), "batch_size": I(1, 32), "lr": F(1e-8, 1.0), "weight_decay": F(0.0, 1.0),
        "warmup_iterations": I(0, 10_000), "poly_power": F(0.0, 10.0), "lora_rank": I(0, 64),
        "lora_alpha": F(0.0, 1024.0), "lora_dropout": F(0.0, 0.9), "crop": Rule("ints", 1, 512, 3, words=("auto",)),
        "crop_mm": Rule("floats", 1.0, 2000.0, 3, nullable=True), "patch_side": I(0, 512), "max_shrink": F(1.0, 64.0),
        "grid": I(0, 32), "tile_pad": I(0, 16), "zoom": Rule("floats", 0.01, 4.0, 3),
        "spacing_factor": Rule("floats", 0.05, 20.0, 3),
        "clip_percentiles": Rule("floats", 0.0, 100.0, 2), "head_init": C("pretrained", "negated"),
        "dice_background": B, "embedding_cache": I(0, 512), "encoder_tail": C("none", "neck", "last_stage"),
        "augment_rot90": B, "augment_flip": B,
        "bezier_p": FRACTION, "foreground_prob": FRACTION, "seed": SEED, "checkpoint_interval_s": CKPT_S,
        "precision": C("fp32", "bf16"),
    },
    "pseudolabel": {
        "roles": Rule("choices", n=(1, 3), choices=("labeled", "unlabeled", "test")), "tta": B,
        "tta_count": I(0, 8), "overlap": F(0.0, 0.9), "batch_size": I(1, 64), "merge_lora": B,
        "write_confidence": B, "calibration": C("none", "prior"), "calibration_cases": I(1, 256),
        "calibration_voxels": I(1_000, 10_000_000), "calibration_min_labeled": I(1, 10_000),
        "precision": C("fp32", "bf16", "auto"),
    },
    "retrain": {
        "network": C("vnet", "tiny"), "iterations": I(1, 100_000), "batch_labeled": I(1, 32),
        "batch_unlabeled": I(0, 32), "patch": Rule("ints", 8, 512, 3),
        "zoom": Rule("floats", 0.01, 4.0, 3, nullable=True), "spacing_factor": Rule("floats", 0.05, 20.0, 3),
        "patch_mm": Rule("floats", 1.0, 2000.0, 3, nullable=True),
        "infer_stride_fraction": Rule("floats", 0.01, 1.0, 3, nullable=True),
        "lr": F(1e-8, 1.0), "momentum": F(0.0, 0.999),
        "weight_decay": F(0.0, 1.0), "lr_schedule": C("step", "poly", "constant"),
        "lr_steps": Rule("floats", 0.0, 1.0, (0, 10)), "lr_gamma": F(0.0, 1.0), "lr_poly_power": F(0.0, 10.0),
        "consistency": F(0.0, 1000.0), "consistency_rampup": FRACTION, "consistency_on_labeled": B,
        "ema_decay": F(0.0, 0.99999), "teacher_noise": F(0.0, 10.0), "teacher_noise_clip": F(0.0, 100.0),
        "st_threshold": FRACTION, "uamt_T": I(1, 32), "uamt_threshold": Rule("floats", 0.0, 1.0, 2),
        "acmt_threshold": Rule("floats", 0.0, 1.0, 2), "pl_weight": F(0.0, 1000.0), "pl_ramp": C("none", "sigmoid"),
        "pl_rampup": FRACTION, "augment": B, "flip_p": FRACTION, "foreground_prob": FRACTION,
        "pl_foreground_prob": FRACTION, "seed": SEED, "checkpoint_interval_s": CKPT_S,
        "evaluate": C("teacher", "student"), "num_workers": I(0, 8), "infer": Rule("section"),
        "precision": C("fp32", "bf16", "auto"),
    },
    "infer": INFER,
    "pipeline": {"overlays": I(0, 32), "evaluate_sam": B},
    "data": {},
}
NESTED = {("retrain", "infer"): INFER}


def check_overrides(over: dict[str, Any]) -> None:
    """Raise InputError unless every key of ``{section: {key: value}}`` is allowed and within its bounds."""
    for sec, vals in over.items():
        rules = RULES.get(sec)
        if rules is None:
            raise InputError(f"config override section {sec!r} is not known; known: {sorted(RULES)}")
        for key, value in vals.items():
            _check(f"{sec}.{key}", rules.get(key), value, allowed=sorted(rules), nested=NESTED.get((sec, key)))


def _check(name: str, rule: Rule | None, v: Any, *, allowed: list[str], nested: dict[str, Rule] | None) -> None:
    if rule is None:
        why = ("file paths are not accepted from clients: the server's profile names the weights"
               if name.endswith("checkpoint") or "path" in name or "file" in name else
               "the server decides device, resume and network_kwargs; the SSL method is ssl_method")
        raise InputError(f"config override {name} is not allowed ({why}); allowed keys: "
                         f"{allowed if allowed else 'none in this section'}")
    if rule.kind == "section":
        if not isinstance(v, dict):
            raise InputError(f"config override {name} must be an object of {sorted(nested or {})}")
        for k, x in v.items():
            _check(f"{name}.{k}", (nested or {}).get(k), x, allowed=sorted(nested or {}), nested=None)
        return
    if not _ok(rule, v):
        desc = rule.describe() if rule.kind != "choices" else f"a list of 1-3 of {list(rule.choices)}"
        raise InputError(f"config override {name}={v!r} is out of bounds: it must be {desc}")


def _scalar(rule: Rule, v: Any, kind: str) -> bool:
    if isinstance(v, bool) or not isinstance(v, int if kind == "int" else (int, float)):
        return False
    if not math.isfinite(v):
        return False
    return (rule.lo is None or v >= rule.lo) and (rule.hi is None or v <= rule.hi)


def _ok(rule: Rule, v: Any) -> bool:
    if v is None:
        return rule.nullable
    if isinstance(v, str) and v in rule.words:
        return True
    if rule.kind in ("int", "float"):
        return _scalar(rule, v, rule.kind)
    if rule.kind == "bool":
        return isinstance(v, bool)
    if rule.kind == "choice":
        return isinstance(v, str) and v in rule.choices
    if not isinstance(v, (list, tuple)):
        return False
    lo, hi = (rule.n, rule.n) if isinstance(rule.n, int) else rule.n  # type: ignore[misc]
    if not lo <= len(v) <= hi:
        return False
    if rule.kind == "choices":
        return all(isinstance(x, str) and x in rule.choices for x in v) and len(set(v)) == len(v)
    return all(_scalar(rule, x, "int" if rule.kind == "ints" else "float") for x in v)
