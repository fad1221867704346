"""The UA-MT/DTC 3D V-Net used by CFR's re-training stage (reference-implementation.md, sec. 4.1).

Plain (non-residual) conv blocks, five encoder stages of 1, 2, 3, 3, 3 convolutions at ``n_filters * (1, 2,
4, 8, 16)`` channels, strided-conv downsampling, transposed-conv upsampling with *additive* skip connections,
decoder stages of 3, 3, 2, 1 convolutions, and a 1x1x1 classifier. The reference's "hierarchical" auxiliary
heads are left out: they are never used for training or testing. With ``n_filters=16`` and 2 classes the
network has exactly 9,448,866 parameters.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cfrseg.errors import ConfigError

NORMALIZATIONS = ("batchnorm", "instancenorm", "groupnorm", "none")
ENCODER_CONVS = (1, 2, 3, 3, 3)
DECODER_CONVS = (3, 3, 2, 1)
DIVISOR = 16  # four stride-2 downsamplings


def _norm(kind: str, channels: int) -> nn.Module:
    """The normalisation layer after every convolution (``Identity`` for ``"none"``).

    ``groupnorm`` uses ``gcd(16, channels)`` groups, i.e. UA-MT's 16 whenever ``channels`` allows.
    """
    if kind == "batchnorm":
        return nn.BatchNorm3d(channels)
    if kind == "instancenorm":
        return nn.InstanceNorm3d(channels)
    if kind == "groupnorm":
        return nn.GroupNorm(math.gcd(16, channels), channels)
    return nn.Identity()


def _unit(conv: nn.Module, out_channels: int, norm: str) -> list[nn.Module]:
    return [conv, _norm(norm, out_channels), nn.ReLU(inplace=True)]


def conv_stage(n_convs: int, in_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    """``n_convs`` times (Conv3d 3x3x3 pad 1 -> norm -> ReLU); the first conv maps in -> out channels."""
    layers: list[nn.Module] = []
    for i in range(n_convs):
        c_in = in_channels if i == 0 else out_channels
        layers += _unit(nn.Conv3d(c_in, out_channels, kernel_size=3, padding=1), out_channels, norm)
    return nn.Sequential(*layers)


def down(in_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    """Halve every spatial size: Conv3d kernel 2 stride 2 -> norm -> ReLU."""
    return nn.Sequential(
        *_unit(nn.Conv3d(in_channels, out_channels, kernel_size=2, stride=2), out_channels, norm)
    )


def up(in_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    """Double every spatial size: ConvTranspose3d kernel 2 stride 2 -> norm -> ReLU."""
    conv = nn.ConvTranspose3d(in_channels, out_channels, kernel_size=2, stride=2)
    return nn.Sequential(*_unit(conv, out_channels, norm))


class VNet(nn.Module):
    """3D V-Net (UA-MT/DTC flavour): images (B, in_channels, X, Y, Z) -> logits (B, num_classes, X, Y, Z).

    X, Y and Z must each be divisible by 16. ``num_classes`` counts the background. With ``has_dropout``,
    Dropout3d(0.5) is applied to the bottleneck features and to the last decoder features (train mode only).
    """

    # every BatchNorm directly follows its convolution inside an nn.Sequential, so inference may fold it
    # (cfrseg.models.fuse.fold_batchnorm)
    bn_foldable = True

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        n_filters: int = 16,
        normalization: str = "batchnorm",
        has_dropout: bool = False,
    ) -> None:
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ConfigError(
                f"VNet: unknown normalization {normalization!r}; choose one of {list(NORMALIZATIONS)}"
            )
        for name, v in (("in_channels", in_channels), ("num_classes", num_classes), ("n_filters", n_filters)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"VNet: {name} must be a positive integer, got {v!r}")
        if num_classes < 2:
            raise ConfigError(f"VNet: num_classes counts the background and must be >= 2, got {num_classes}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.n_filters = n_filters
        self.normalization = normalization
        self.has_dropout = has_dropout

        widths = [n_filters * 2**i for i in range(len(ENCODER_CONVS))]  # 16, 32, 64, 128, 256
        self.encoder = nn.ModuleList()
        self.downs = nn.ModuleList()
        for i, (n, w) in enumerate(zip(ENCODER_CONVS, widths)):
            # stage i sees the input (i == 0) or the downsampled map, which already has w channels
            self.encoder.append(conv_stage(n, in_channels if i == 0 else w, w, normalization))
            if i < len(widths) - 1:
                self.downs.append(down(w, widths[i + 1], normalization))
        self.ups = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for n, w_hi, w_lo in zip(DECODER_CONVS, widths[:0:-1], widths[-2::-1]):
            self.ups.append(up(w_hi, w_lo, normalization))
            self.decoder.append(conv_stage(n, w_lo, w_lo, normalization))
        self.classifier = nn.Conv3d(widths[0], num_classes, kernel_size=1)
        self.dropout = nn.Dropout3d(p=0.5) if has_dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes, X, Y, Z) for an input batch (B, in_channels, X, Y, Z)."""
        check_input(x, self.in_channels)
        skips: list[torch.Tensor] = []
        for i, stage in enumerate(self.encoder):
            x = stage(x)
            if i < len(self.downs):
                skips.append(x)
                x = self.downs[i](x)
        x = self.dropout(x)
        for upsample, stage, skip in zip(self.ups, self.decoder, reversed(skips)):
            x = stage(upsample(x) + skip)
        return self.classifier(self.dropout(x))


def check_input(x: torch.Tensor, in_channels: int) -> None:
    """Raise ValueError unless ``x`` is (B, in_channels, X, Y, Z) with X, Y, Z divisible by 16."""
    if x.dim() != 5:
        raise ValueError(f"VNet expects a 5D input (batch, channels, x, y, z), got shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"VNet expects {in_channels} input channel(s), got shape {tuple(x.shape)}")
    bad = [s for s in x.shape[2:] if s % DIVISOR]
    if bad:
        raise ValueError(
            f"VNet input spatial size {tuple(x.shape[2:])} must be divisible by {DIVISOR} in every axis "
            f"(pad the volume or choose a patch such as 112x112x80)"
        )
