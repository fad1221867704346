"""SSL methods of the re-training stage behind one interface.

Every method computes, from the student's logits on the labeled crops (``out_l``) and on the unlabeled crops
(``out_u``), a dict of named loss tensors whose ``"loss"`` entry is the total to minimise:

    loss = L_sup + w_cons(t) * L_cons + w_pl(t) * L_pl

* ``L_sup`` = 0.5 (CE + Dice) on the labeled crops (paper Eq. 5).
* ``L_cons`` is the method's unsupervised term (Eq. 8-10): none, MT, self-training, UA-MT or ACMT.
* ``L_pl`` = 0.5 (CE + Dice) of the student on the unlabeled crops against the cached SAM pseudo-label crop (Eq. 7),
  present only when the batch carries pseudo-labels. Its weight ``w_pl(t) = pl_weight * ramp`` is separate from
  ``w_cons(t) = consistency * sigmoid_rampup`` so that both the reference code (pl_weight 1, no ramp) and the
  paper's Alg. 1 (lambda on both terms: pl_weight = consistency with the same ramp) can be expressed.

``teacher_fn(x, noise=True, stochastic=False)`` returns the EMA teacher's logits (no grad); ``noise`` adds the
clamped Gaussian input noise, ``stochastic`` turns the teacher's dropout on (UA-MT's T passes).

A method that needs more than the student's logits (MagicNet: extra forward passes on mixed and cut inputs,
:mod:`cfrseg.ssl.magicnet`) sets ``custom_step`` and implements :meth:`SSLMethod.step_loss`, which gets the
student network itself; a method with state across iterations (MagicNet's class distribution) keeps it in
:meth:`SSLMethod.state_dict` so that resumed runs stay exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from cfrseg.errors import ConfigError
from cfrseg.ssl.losses import entropy, masked_mean, seg_loss, softmax_mse
from cfrseg.ssl.ramps import sigmoid_rampup

METHODS = ("none", "mt", "st", "uamt", "acmt", "magicnet")


class TeacherFn(Protocol):
    def __call__(self, x: torch.Tensor, noise: bool = True, stochastic: bool = False) -> torch.Tensor: ...


Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class SSLParams:
    """Hyper-parameters of the methods (filled from :class:`cfrseg.stages.retrain.RetrainConfig`)."""

    iterations: int
    num_classes: int = 2
    consistency: float = 0.1
    consistency_rampup: float = 1.0        # fraction of the run
    consistency_on_labeled: bool = False
    pl_weight: float = 1.0
    pl_ramp: str = "none"                  # "none" | "sigmoid"
    pl_rampup: float = 1.0                 # fraction of the run (pl_ramp = "sigmoid")
    st_threshold: float = 0.9
    uamt_T: int = 8
    uamt_threshold: tuple[float, float] = (0.75, 1.0)   # x ln(C), ramped over the run
    acmt_threshold: tuple[float, float] = (0.75, 0.95)  # normalised entropy, ramped over the run
    # MagicNet (cfrseg.ssl.magicnet)
    magic_grid: tuple[int, int, int] = (3, 3, 3)        # cubes per axis of the training patch
    magic_loc_weight: float = 0.1                        # weight of the cube-location loss
    magic_blend_start: int = 100                         # blend pseudo-labels after this many iterations
    magic_blend_window: int = 20                         # class distribution refreshed every this many iterations
    magic_blend_T: float = 1.0                           # temperature of the class distribution
    magic_transposed_recovery: bool = False              # reproduce the official x<->z recovery quirk (Q1)


class SSLMethod:
    """Base class: supervised loss + pseudo-label loss; subclasses add ``unsup``."""

    name = "none"
    uses_unlabeled = False   # does the method need the unlabeled crops without pseudo-labels?
    uses_teacher = False     # does it call teacher_fn?
    custom_step = False      # does it run the student itself (step_loss) instead of loss()?

    def __init__(self, params: SSLParams) -> None:
        self.p = params

    # --- weights ---------------------------------------------------------------------------------------
    def ramp_progress(self, step: int) -> float:
        """sigmoid_rampup(step, iterations): the threshold schedules of UA-MT / ACMT span the whole run."""
        return sigmoid_rampup(step, self.p.iterations)

    def consistency_weight(self, step: int) -> float:
        return self.p.consistency * sigmoid_rampup(step, self.p.consistency_rampup * self.p.iterations)

    def pl_weight(self, step: int) -> float:
        if self.p.pl_ramp == "sigmoid":
            return self.p.pl_weight * sigmoid_rampup(step, self.p.pl_rampup * self.p.iterations)
        return self.p.pl_weight

    # --- state (checkpointed) ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None

    # --- losses ----------------------------------------------------------------------------------------
    def step_loss(self, student, x: torch.Tensor, n_labeled: int, teacher_fn: TeacherFn, batch: Batch,
                  step: int) -> Batch:
        """For ``custom_step`` methods: named losses from the student network and the batch ``x`` (labeled
        crops first, ``n_labeled`` of them, then the unlabeled ones)."""
        raise NotImplementedError

    def pl_term(self, out_u: torch.Tensor | None, batch: Batch, step: int, d: Batch) -> torch.Tensor | None:
        """The CFR pseudo-label term w_pl(t) * L_pl (Eq. 7) on the unlabeled logits, recorded in ``d``; None
        when the batch has no pseudo-label."""
        pl = batch.get("pl_u")
        if pl is None or out_u is None:
            return None
        sel = batch["pl_mask"]
        if not bool(sel.any()):
            return None
        d["pl"] = seg_loss(out_u[sel], pl[sel])
        w = self.pl_weight(step)
        d["w_pl"] = torch.tensor(w, device=out_u.device)
        return w * d["pl"]

    def unsup(self, out: torch.Tensor, x: torch.Tensor, teacher_fn: TeacherFn, step: int) -> Batch:
        """The method's unsupervised term on logits ``out`` of inputs ``x``: {"cons": tensor, ...diagnostics}."""
        return {}

    def loss(self, out_l: torch.Tensor, out_u: torch.Tensor | None, teacher_fn: TeacherFn,
             batch: Batch, step: int) -> Batch:
        """Named loss tensors; ``"loss"`` is the total."""
        dev = out_l.device
        d: Batch = {"sup": seg_loss(out_l, batch["label_l"])}
        total = d["sup"]
        if self.uses_unlabeled and out_u is not None:
            if self.p.consistency_on_labeled:
                out, x = torch.cat([out_l, out_u]), torch.cat([batch["image_l"], batch["image_u"]])
            else:
                out, x = out_u, batch["image_u"]
            u = self.unsup(out, x, teacher_fn, step)
            w = self.consistency_weight(step)
            d.update(u)
            d["w_cons"] = torch.tensor(w, device=dev)
            total = total + w * u["cons"]
        pl_term = self.pl_term(out_u, batch, step, d)
        if pl_term is not None:
            total = total + pl_term
        d["loss"] = total
        return d


class SupervisedOnly(SSLMethod):
    """Lower bound: L_sup only (plus L_pl when pseudo-labels are given: "CFR without SSL")."""

    name = "none"


class MeanTeacher(SSLMethod):
    """Mean teacher: softmax-MSE between the student and the EMA teacher on a noisy copy of the input."""

    name = "mt"
    uses_unlabeled = True
    uses_teacher = True

    def unsup(self, out, x, teacher_fn, step):
        t = teacher_fn(x, noise=True)
        return {"cons": softmax_mse(out, t).mean()}


class SelfTraining(SSLMethod):
    """Online self-training: 0.5 (CE + Dice) against the EMA teacher's argmax on voxels whose teacher
    confidence (max softmax) is at least ``st_threshold`` (no input noise: the teacher labels the same crop)."""

    name = "st"
    uses_unlabeled = True
    uses_teacher = True

    def unsup(self, out, x, teacher_fn, step):
        probs = torch.softmax(teacher_fn(x, noise=False), dim=1)
        conf, hard = probs.max(dim=1)
        mask = conf >= self.p.st_threshold
        return {"cons": seg_loss(out, hard, mask), "mask_frac": mask.float().mean()}


class UAMT(SSLMethod):
    """Uncertainty-aware MT (Yu et al. 2019): T noisy teacher passes with dropout give the predictive entropy;
    the consistency is averaged over voxels with entropy < (0.75 + 0.25 ramp) ln(C) (ln 2 for binary tasks)."""

    name = "uamt"
    uses_unlabeled = True
    uses_teacher = True

    def unsup(self, out, x, teacher_fn, step):
        with torch.no_grad():
            mean = torch.zeros_like(out)
            for _ in range(self.p.uamt_T):
                mean += torch.softmax(teacher_fn(x, noise=True, stochastic=True), dim=1)
            mean /= self.p.uamt_T
            unc = entropy(mean)
            lo, hi = self.p.uamt_threshold
            thr = (lo + (hi - lo) * self.ramp_progress(step)) * math.log(self.p.num_classes)
            mask = unc < thr
        t = teacher_fn(x, noise=True)
        return {"cons": masked_mean(softmax_mse(out, t), mask), "mask_frac": mask.float().mean()}


class ACMT(SSLMethod):
    """Ambiguity-consensus MT (Xu et al. 2023, entropy variant): the consistency is applied only on ambiguous
    voxels, i.e. where the student's normalised entropy is >= a threshold that ramps from 0.75 to 0.95."""

    name = "acmt"
    uses_unlabeled = True
    uses_teacher = True

    def unsup(self, out, x, teacher_fn, step):
        with torch.no_grad():
            ent = entropy(torch.softmax(out.detach(), dim=1), normalized=True)
            lo, hi = self.p.acmt_threshold
            mask = ent >= lo + (hi - lo) * self.ramp_progress(step)
        t = teacher_fn(x, noise=True)
        return {"cons": masked_mean(softmax_mse(out, t), mask), "mask_frac": mask.float().mean()}


_CLASSES: dict[str, Callable[[SSLParams], SSLMethod]] = {
    "none": SupervisedOnly, "mt": MeanTeacher, "st": SelfTraining, "uamt": UAMT, "acmt": ACMT,
}


def build_method(name: str, params: SSLParams) -> SSLMethod:
    """The method called ``name`` (one of :data:`METHODS`)."""
    if name == "magicnet":
        from cfrseg.ssl.magicnet import MagicNet

        return MagicNet(params)
    if name not in _CLASSES:
        raise ConfigError(f"unknown SSL method {name!r}; choose one of {list(METHODS)}")
    return _CLASSES[name](params)
