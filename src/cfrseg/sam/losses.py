"""The fine-tuning loss on mosaics: 0.5 * (cross-entropy + soft Dice), counted over VALID pixels only.

Mosaics contain pixels that belong to no slice (tile padding, empty grid slots, canvas margins). The reference
ignores them in CE but counts them in the Dice denominator (its quirk Q1). Here both terms see only the pixels
where ``valid`` is true: the logits of invalid pixels are replaced by a constant before anything else, so
whatever they hold (even inf/NaN) changes neither the loss nor any gradient, and their gradient is exactly 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cfrseg.errors import InputError
from cfrseg.ssl.losses import dice_loss


def _valid_mask(valid: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``valid`` as a bool tensor of shape (B, S, S), broadcasting an (S, S) mask over the batch."""
    b, _, h, w = logits.shape
    v = valid.to(device=logits.device, dtype=torch.bool)
    if v.dim() == 2:
        v = v.unsqueeze(0)
    if v.dim() == 4 and v.shape[1] == 1:
        v = v[:, 0]
    if v.dim() != 3 or v.shape[-2:] != (h, w):
        raise InputError(f"validity mask of shape {tuple(valid.shape)} does not fit logits {tuple(logits.shape)}")
    return v.expand(b, h, w)


def masked_ce_dice(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
    *,
    include_background: bool = True,
    smooth: float = 1e-5,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss ``0.5 * (CE + Dice)`` over valid pixels.

    Args:
        logits: class scores, shape (batch, classes, height, width), background = class 0.
        target: integer labels, shape (batch, height, width); values in invalid pixels are ignored.
        valid: bool, shape (height, width) or (batch, height, width); True where a real voxel lies.
        include_background: average the Dice over all classes (the reference's choice) or foreground only.
        smooth: added to numerator and denominator of each class's Dice; a class that is absent from the
            target and predicted nowhere scores Dice ~1 (loss ~0) instead of 0/0.

    Returns:
        (loss scalar tensor, {"ce": float, "dice": float}). The Dice term is
        :func:`cfrseg.ssl.losses.dice_loss`, the same soft Dice as the 3D losses (squared denominators,
        per class over the whole batch and the valid pixels, then averaged over classes).
    """
    if logits.dim() != 4:
        raise InputError(f"logits must be (B, K, H, W), got {tuple(logits.shape)}")
    b, k, h, w = logits.shape
    if target.shape != (b, h, w):
        raise InputError(f"target must be {(b, h, w)}, got {tuple(target.shape)}")
    v = _valid_mask(valid, logits)
    vf = v.unsqueeze(1).to(logits.dtype)                                   # (B,1,H,W)
    safe_logits = torch.where(v.unsqueeze(1), logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
    tgt = torch.where(v, target.long(), torch.zeros((), dtype=torch.long, device=target.device))
    if int(tgt.max()) >= k or int(tgt.min()) < 0:
        raise InputError(f"target labels must lie in [0, {k - 1}] inside valid pixels")
    n_valid = vf.sum().clamp_min(1.0)

    ce_map = F.cross_entropy(safe_logits, tgt, reduction="none")          # (B,H,W)
    ce = (ce_map * vf[:, 0]).sum() / n_valid

    prob = torch.softmax(safe_logits, dim=1)                                # (B,K,H,W)
    dice = dice_loss(prob, tgt, v, include_background=include_background, smooth=smooth)

    loss = 0.5 * (ce + dice)
    return loss, {"ce": float(ce.detach()), "dice": float(dice.detach())}
