"""Exponential moving average (mean-teacher) update.

``alpha = min(1 - 1/(step + 1), decay)``: at step 0 the teacher becomes an exact copy of the student, then it
averages ("true average until the exponential average is more correct", Tarvainen & Valpola 2017).

BatchNorm buffers (our choice, see docs/retrain.md): the teacher runs in eval mode, so it *uses* its running
statistics. They are averaged with the same ``alpha`` as the weights (floating-point buffers: running_mean,
running_var), so that the teacher's statistics belong to the same averaged network as its weights; integer
buffers (num_batches_tracked) are copied. The reference (teacher in train mode) never needed them.
"""

from __future__ import annotations

import torch
from torch import nn


def ema_alpha(step: int, decay: float) -> float:
    """The averaging weight of the teacher at global step ``step`` (0-based)."""
    return min(1.0 - 1.0 / (step + 1), decay)


@torch.no_grad()
def update_ema(teacher: nn.Module, student: nn.Module, step: int, decay: float) -> float:
    """teacher <- alpha * teacher + (1 - alpha) * student for parameters and float buffers; returns alpha."""
    alpha = ema_alpha(step, decay)
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.mul_(alpha).add_(s.detach(), alpha=1.0 - alpha)
    for t, s in zip(teacher.buffers(), student.buffers(), strict=True):
        if t.dtype.is_floating_point:
            t.mul_(alpha).add_(s.detach(), alpha=1.0 - alpha)
        else:
            t.copy_(s)
    return alpha
