"""Segmentation and consistency losses. Logits are (B, C, X, Y, Z); labels are (B, X, Y, Z) int64.

``seg_loss`` = 0.5 * (CE + Dice) is the paper's Eq. 5/7 loss (L_sup, L_pl). :func:`dice_loss` is THE soft Dice
of cfrseg, used by the 3D losses here and by the 2D fine-tune loss (:mod:`cfrseg.sam.losses`) alike: the
reference code's (SSL4MIS / V-Net) multi-class soft Dice, squared denominators, smooth 1e-5, pooled over the
batch and all spatial positions (optionally only where a mask is true), averaged over all C classes including
background (or the foreground classes only).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SMOOTH = 1e-5


def dice_loss(probs: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, *,
              include_background: bool = True, smooth: float = SMOOTH) -> torch.Tensor:
    """Soft multi-class Dice loss ``mean_c 1 - (2 sum p t + s) / (sum p^2 + sum t^2 + s)``.

    Args:
        probs: softmax probabilities (B, C, *spatial), any number of spatial dims (2D mosaics, 3D crops).
        target: integer labels (B, *spatial).
        mask: optional bool (B, *spatial); only positions where it is true count.
        include_background: average over all C classes (the reference) or over classes 1..C-1.
        smooth: added to numerator and denominator; a class absent from the target and predicted nowhere
            scores loss ~0.
    """
    c = probs.shape[1]
    onehot = F.one_hot(target.clamp_min(0), c).movedim(-1, 1).to(probs.dtype)
    if mask is not None:
        m = mask.unsqueeze(1).to(probs.dtype)
        probs, onehot = probs * m, onehot * m
    dims = (0, *range(2, probs.dim()))
    inter = (probs * onehot).sum(dims)
    denom = (probs * probs).sum(dims) + (onehot * onehot).sum(dims)
    per_class = 1.0 - (2.0 * inter + smooth) / (denom + smooth)
    return per_class.mean() if include_background or c == 1 else per_class[1:].mean()


def ce_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy averaged over all voxels, or over the voxels where ``mask`` is true (0 when none is)."""
    if mask is None:
        return F.cross_entropy(logits, target)
    per = F.cross_entropy(logits, target, reduction="none")
    m = mask.to(per.dtype)
    return (per * m).sum() / m.sum().clamp_min(1.0)


def seg_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """0.5 * (CE + Dice), the supervised / pseudo-label loss of the paper (Eq. 5, 7)."""
    probs = torch.softmax(logits, dim=1)
    return 0.5 * (ce_loss(logits, target, mask) + dice_loss(probs, target, mask))


def softmax_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per-voxel squared error of the softmax maps, averaged over classes: (B, X, Y, Z)."""
    d = torch.softmax(student_logits, dim=1) - torch.softmax(teacher_logits, dim=1)
    return (d * d).mean(dim=1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over voxels where ``mask`` is true; 0 (with a gradient path) when the mask is empty."""
    m = mask.to(values.dtype)
    return (values * m).sum() / (m.sum() + 1e-16)


def entropy(probs: torch.Tensor, normalized: bool = False) -> torch.Tensor:
    """Per-voxel entropy of class probabilities (nats), or divided by ln(C) (in [0, 1]) when ``normalized``."""
    h = -(probs * torch.log(probs + 1e-6)).sum(dim=1)
    return h / math.log(probs.shape[1]) if normalized else h
