"""``VNetMagic``: the V-Net with MagicNet's cube-location head (magicnet.md sec. 3.3, CVPR 2023).

The same layers (and parameter names) as :class:`cfrseg.models.vnet.VNet`, split into the calls MagicNet needs:

- :meth:`VNetMagic.encode` (B, 1, X, Y, Z) -> the five encoder feature maps [x1 .. x5] (x5 at stride 16, with
  the bottleneck dropout when ``has_dropout``);
- :meth:`VNetMagic.decode` features -> (logits (B, K, X, Y, Z), embedding (B, n_filters, X, Y, Z)); the
  embedding is the last decoder map (after its dropout), the "x9" of the official code;
- :meth:`VNetMagic.head` embedding -> logits (the 1x1x1 classifier, the official ``out_conv``);
- :meth:`VNetMagic.locate` x5 of cubes (N, C5, cx/16, cy/16, cz/16) -> (N, nx*ny*nz) location logits: the
  ``fc_layer`` = Linear(C5 * prod(c/16) -> ``fc_hidden``), BatchNorm1d, LeakyReLU(0.2), Linear(-> n cubes).

``forward`` returns the logits only, so inference code treats it as a plain V-Net. The official network is
InstanceNorm without dropout (``normalization="instancenorm", has_dropout=False``); any V-Net option works.
With n_filters 16, a 96^3 patch and a 3x3x3 grid the location head has 8,511,515 parameters (the spec's 8.51 M).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cfrseg.errors import ConfigError
from cfrseg.models.vnet import DIVISOR, VNet, check_input


def cube_shape(patch: Sequence[int], grid: Sequence[int]) -> tuple[int, int, int]:
    """Cube size per axis for a training ``patch`` cut into ``grid`` cubes; ConfigError unless every cube
    side is a whole multiple of 16 (the V-Net's four poolings)."""
    if len(patch) != 3 or len(grid) != 3:
        raise ConfigError(f"MagicNet: patch {tuple(patch)} and grid {tuple(grid)} must have 3 entries each")
    out = []
    for p, n in zip(patch, grid):
        if not (isinstance(n, int) and n >= 1 and p % n == 0 and (p // n) % DIVISOR == 0):
            raise ConfigError(
                f"MagicNet: patch {tuple(patch)} cannot be cut into a {tuple(grid)} grid of cubes whose sides "
                f"are multiples of {DIVISOR}")
        out.append(p // n)
    return tuple(out)  # type: ignore[return-value]


class VNetMagic(VNet):
    """V-Net + cube-location head. Extra options: ``patch`` (training patch, voxels), ``grid`` (cubes per
    axis), ``fc_hidden`` (width of the location MLP, 4096 in the official code)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 2, n_filters: int = 16,
                 normalization: str = "instancenorm", has_dropout: bool = False,
                 patch: Sequence[int] = (96, 96, 96), grid: Sequence[int] = (3, 3, 3), fc_hidden: int = 4096) -> None:
        super().__init__(in_channels, num_classes, n_filters, normalization, has_dropout)
        self.patch = tuple(int(p) for p in patch)
        self.grid = tuple(int(n) for n in grid)
        self.cube = cube_shape(self.patch, self.grid)
        n_cubes = self.grid[0] * self.grid[1] * self.grid[2]
        if n_cubes < 2:
            raise ConfigError(f"MagicNet: the grid {self.grid} must hold at least 2 cubes")
        if not isinstance(fc_hidden, int) or fc_hidden < 1:
            raise ConfigError(f"MagicNet: fc_hidden must be a positive integer, got {fc_hidden!r}")
        c5 = n_filters * 2 ** (len(self.encoder) - 1)
        feat = c5 * (self.cube[0] // DIVISOR) * (self.cube[1] // DIVISOR) * (self.cube[2] // DIVISOR)
        self.location = nn.Sequential(
            nn.Linear(feat, fc_hidden), nn.BatchNorm1d(fc_hidden), nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(fc_hidden, n_cubes))
        self.n_cubes = n_cubes

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder feature maps [x1, x2, x3, x4, x5] of (B, in_channels, X, Y, Z)."""
        check_input(x, self.in_channels)
        feats: list[torch.Tensor] = []
        for i, stage in enumerate(self.encoder):
            x = stage(x)
            if i < len(self.downs):
                feats.append(x)
                x = self.downs[i](x)
        feats.append(self.dropout(x))
        return feats

    def decode(self, feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, K, X, Y, Z), embedding (B, n_filters, X, Y, Z)) from :meth:`encode`'s features."""
        x = feats[-1]
        for upsample, stage, skip in zip(self.ups, self.decoder, reversed(feats[:-1])):
            x = stage(upsample(x) + skip)
        emb = self.dropout(x)
        return self.classifier(emb), emb

    def head(self, emb: torch.Tensor) -> torch.Tensor:
        """The 1x1x1 classifier on an embedding (B, n_filters, X, Y, Z) -> logits (B, K, X, Y, Z)."""
        return self.classifier(emb)

    def locate(self, x5: torch.Tensor) -> torch.Tensor:
        """Location logits (N, n_cubes) of N cubes from their bottleneck features x5."""
        return self.location(torch.flatten(x5, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))[0]


LOCATION_PREFIX = "location."


def backbone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A VNetMagic state dict without the location head: loads into a plain :class:`VNet` of the same options."""
    return {k: v for k, v in state.items() if not k.startswith(LOCATION_PREFIX)}
