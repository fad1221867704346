"""Inference-time folding of BatchNorm into the preceding convolution (exact up to float rounding).

In eval mode ``BatchNorm(conv(x))`` is an affine map per output channel, so it can be folded into the
convolution's weight and bias; the normalisation layer becomes ``Identity``. This saves one full pass over
every feature map (the V-Net has 29 of them), which matters on CPU where 3D inference is bound
by memory traffic as much as by arithmetic.
"""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int]:
    """An eval-mode copy of ``model`` where every BatchNorm that directly follows a convolution inside an
    ``nn.Sequential`` is folded into it. Returns ``(copy, number of folded pairs)``; ``model`` is untouched.
    BatchNorm layers without running statistics (``track_running_stats=False``) are left as they are."""
    out = copy.deepcopy(model).eval()
    folded = 0
    for seq in out.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if (isinstance(conv, CONVS) and isinstance(bn, NORMS) and bn.running_mean is not None
                    and bn.num_features == conv.out_channels):
                seq._modules[a] = fuse_conv_bn_eval(conv, bn, transpose=isinstance(conv, nn.modules.conv._ConvTransposeNd))
                seq._modules[b] = nn.Identity()
                folded += 1
    return out, folded
