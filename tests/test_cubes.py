"""MagicNet's cube operations (exact inverses for any patch and grid) and the VNetMagic network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cfrseg.errors import ConfigError
from cfrseg.models import VNet, VNetMagic, build_network
from cfrseg.models.magic import backbone_state, cube_shape
from cfrseg.ssl.cubes import auto_grid, location_targets, mix, partition, random_perms, recover, unmix

CASES = [((96, 96, 96), (3, 3, 3)), ((64, 64, 32), (4, 4, 2)), ((64, 32, 48), (2, 2, 3)),
         ((48, 80, 32), (3, 5, 1)), ((32, 32, 16), (2, 2, 1))]


def _coded(b: int, patch) -> torch.Tensor:
    """A batch whose every voxel holds a distinct number (so any misplaced voxel shows)."""
    return torch.arange(b * 2 * int(np.prod(patch)), dtype=torch.float64).reshape(b, 2, *patch)


@pytest.mark.parametrize("patch, grid", CASES)
def test_partition_recover_is_exact_inverse_and_numbers_cubes_x_fastest(patch, grid):
    x = _coded(3, patch)
    cubes = partition(x, grid)
    n = grid[0] * grid[1] * grid[2]
    c = cube_shape(patch, grid)
    assert cubes.shape == (3 * n, 2, *c)
    assert torch.equal(recover(cubes, grid), x)
    # row b * n + p holds the cube at grid position (x, y, z) with p = x + nx*y + nx*ny*z
    targets = location_targets(3, grid)
    assert targets.shape == (3 * n,) and torch.equal(targets[:n], torch.arange(n))
    for row in (0, n - 1, n + 1, 3 * n - 2):
        b, p = divmod(row, n)
        gx, gy, gz = p % grid[0], (p // grid[0]) % grid[1], p // (grid[0] * grid[1])
        want = x[b, :, gx * c[0]:(gx + 1) * c[0], gy * c[1]:(gy + 1) * c[1], gz * c[2]:(gz + 1) * c[2]]
        assert torch.equal(cubes[row], want)
        assert int(targets[row]) == p


@pytest.mark.parametrize("patch, grid", CASES)
def test_mix_unmix_exact_inverse_and_cubes_keep_their_position(patch, grid):
    torch.manual_seed(0)
    b = 4
    x = _coded(b, patch)
    perms = random_perms(b, grid)
    n = grid[0] * grid[1] * grid[2]
    assert perms.shape == (n, b) and all(sorted(p.tolist()) == list(range(b)) for p in perms)
    mixed = mix(x, perms, grid)
    assert torch.equal(unmix(mixed, perms, grid), x)
    assert not torch.equal(mixed, x)                              # something moved (4! ^ n: never identity here)
    px, mx = partition(x, grid).view(b, n, -1), partition(mixed, grid).view(b, n, -1)
    # mixed sample i, position p = original sample perms[p, i], same position p
    assert torch.equal(mx, px[perms.t(), torch.arange(n)[None, :]])
    assert torch.equal(mx[1, n - 1], px[int(perms[n - 1, 1]), n - 1])
    # unmix of any tensor with other channels: the inverse permutation per position
    y = torch.randn(b, 3, *patch)
    assert torch.equal(mix(unmix(y, perms, grid), perms, grid), y)


def test_official_transposed_recovery_puts_only_the_diagonal_back():
    patch, grid = (96, 96, 96), (3, 3, 3)
    x = _coded(1, patch)
    cubes = partition(x, grid)
    wrong = recover(cubes, grid, transposed=True)
    back = partition(wrong, grid)
    in_place = sum(torch.equal(back[p], cubes[p]) for p in range(27))
    assert in_place == 9                                         # magicnet.md Q1: 9 of 27 cubes
    assert torch.equal(recover(cubes.view(1, 3, 3, 3, 2, 32, 32, 32).transpose(1, 3).reshape(27, 2, 32, 32, 32),
                               grid), wrong)                     # = the grid with x and z swapped
    with pytest.raises(ConfigError, match="transposed"):
        recover(partition(_coded(1, (64, 32, 32)), (2, 2, 1)), (2, 2, 1), transposed=True)


@pytest.mark.parametrize("patch, grid", [((96, 96, 96), (3, 3, 3)), ((64, 64, 48), (2, 2, 3)),
                                         ((32, 32, 16), (2, 2, 1)), ((112, 112, 80), (7, 7, 5)),
                                         ((128, 64, 16), (4, 2, 1))])
def test_auto_grid(patch, grid):
    assert auto_grid(patch) == grid


def test_bad_grids():
    with pytest.raises(ConfigError, match="multiples of 16"):
        cube_shape((80, 96, 96), (2, 3, 3))                       # 80 / 2 = 40 is not a multiple of 16
    with pytest.raises(ConfigError, match="multiples of 16"):
        cube_shape((64, 64, 48), (2, 2, 2))                       # 24 is not a multiple of 16
    with pytest.raises(ConfigError, match="at least 2"):
        VNetMagic(n_filters=2, patch=(32, 32, 16), grid=(1, 1, 1))
    with pytest.raises(ConfigError, match="unknown option"):
        build_network("vnet", 1, 2, grid=(2, 2, 2))


def test_vnet_magic_is_a_vnet_with_a_location_head():
    torch.manual_seed(0)
    m = VNetMagic(num_classes=14)                                 # official: n_filters 16, 96^3, 3x3x3
    assert sum(p.numel() for p in m.location.parameters()) == 8_511_515
    assert sum(p.numel() for p in m.parameters()) == 17_954_985   # spec: ~17.9 M
    net = build_network("vnet_magic", 1, 4, n_filters=2, patch=(32, 32, 32), grid=(2, 2, 2), fc_hidden=8,
                        normalization="batchnorm", has_dropout=True).eval()
    x = torch.randn(2, 1, 32, 32, 32)
    feats = net.encode(x)
    assert [f.shape[1] for f in feats] == [2, 4, 8, 16, 32] and feats[-1].shape[2:] == (2, 2, 2)
    logits, emb = net.decode(feats)
    assert logits.shape == (2, 4, 32, 32, 32) and emb.shape == (2, 2, 32, 32, 32)
    assert torch.equal(net.head(emb), logits) and torch.equal(net(x), logits)
    cubes = net.encode(partition(x, (2, 2, 2)))[-1]
    assert cubes.shape == (16, 32, 1, 1, 1) and net.locate(cubes).shape == (16, 8)
    plain = VNet(num_classes=4, n_filters=2, normalization="batchnorm", has_dropout=True).eval()
    plain.load_state_dict(backbone_state(net.state_dict()))      # strict: same names, head dropped
    assert torch.equal(plain(x), logits)
