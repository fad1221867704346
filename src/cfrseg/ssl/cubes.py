"""MagicNet's magic-cube operations on a batch of training patches (magicnet.md sec. 3.4-3.6).

A patch (X, Y, Z) is cut into a grid (nx, ny, nz) of cubes of (X/nx, Y/ny, Z/nz) voxels. Cube ``p`` is the one at
grid position (x, y, z) with

    p = x + nx * y + nx * ny * z        (the official location label x + Wy + WHz)

and the SAME numbering is used to cut (:func:`partition`), to put back (:func:`recover`) and as the location
target (:func:`location_targets`), so recovery is the exact inverse of partition for any patch and grid (the
official within-image recovery enumerated cubes as 9x + 3y + z but read them back as x + 3y + 9z, which swaps x
and z of the cube grid; ``transposed=True`` reproduces that for comparison, on grids with nx == nz).

Cross-image mixing keeps every cube at its position and only changes which sample it comes from: for each cube
position p a permutation pi_p of the batch, ``mixed[b, p] = x[pi_p(b), p]``; :func:`unmix` applies the inverse
permutations, ``out[b, p] = y[pi_p^-1(b), p]``, so ``unmix(mix(x, perms), perms) == x`` exactly.

Tensors are (B, C, X, Y, Z); cube batches are (B * n, C, cx, cy, cz), sample-major (sample b's cubes are rows
b * n .. b * n + n - 1, in cube order p).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cfrseg.errors import ConfigError

Triple = tuple[int, int, int]
TARGET_CUBE = 32   # the official cube side (96 / 3); auto grids pick the cube side closest to it


def auto_grid(patch: Sequence[int], divisor: int = 16, target: int = TARGET_CUBE) -> Triple:
    """Cubes per axis for ``patch``: per side, the number of cubes n >= 2 (1 only for a side of ``divisor``)
    whose cube side p / n is a multiple of ``divisor`` and closest to ``target`` voxels (ties: more cubes).
    96 -> 3 (cubes of 32, as the official 96^3 / 3x3x3), 64 -> 2, 32 -> 2 (16), 48 -> 3 (16), 80 -> 5 (16),
    112 -> 7 (16), 128 -> 4, 16 -> 1."""
    out = []
    for p in patch:
        cands = [n for n in range(1, p // divisor + 1) if p % n == 0 and (p // n) % divisor == 0]
        if not cands:
            raise ConfigError(f"MagicNet: patch side {p} is not a multiple of {divisor}")
        split = [n for n in cands if n >= 2] or cands
        out.append(min(split, key=lambda n: (abs(p // n - target), -n)))
    return tuple(out)  # type: ignore[return-value]


def _split(x: torch.Tensor, grid: Sequence[int]) -> tuple[torch.Tensor, Triple]:
    b, c, sx, sy, sz = x.shape
    nx, ny, nz = grid
    if sx % nx or sy % ny or sz % nz:
        raise ValueError(f"patch {(sx, sy, sz)} is not divisible by the cube grid {tuple(grid)}")
    cube = (sx // nx, sy // ny, sz // nz)
    # (B, C, nx, cx, ny, cy, nz, cz) -> (B, nz, ny, nx, C, cx, cy, cz): cube index p = x + nx*y + nx*ny*z
    v = x.reshape(b, c, nx, cube[0], ny, cube[1], nz, cube[2]).permute(0, 6, 4, 2, 1, 3, 5, 7)
    return v, cube


def partition(x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Cut every patch of ``x`` (B, C, X, Y, Z) into its cubes: (B * n, C, cx, cy, cz), sample-major, cube order p."""
    v, cube = _split(x, grid)
    return v.reshape(-1, x.shape[1], *cube)


def recover(cubes: torch.Tensor, grid: Sequence[int], transposed: bool = False) -> torch.Tensor:
    """Put cubes (B * n, C, cx, cy, cz) (as :func:`partition` returns them) back into patches (B, C, X, Y, Z).

    ``transposed=True`` reproduces the official code's within-image recovery (quirk Q1): the cube numbered p for
    grid position (x, y, z) is put at position (z, y, x). It needs nx == nz and cx == cz.
    """
    nx, ny, nz = grid
    n = nx * ny * nz
    if cubes.shape[0] % n:
        raise ValueError(f"{cubes.shape[0]} cubes are not a whole number of {tuple(grid)} grids")
    b, c, (cx, cy, cz) = cubes.shape[0] // n, cubes.shape[1], cubes.shape[2:]
    v = cubes.reshape(b, nz, ny, nx, c, cx, cy, cz)
    if transposed:
        if nx != nz or cx != cz:
            raise ConfigError(f"the transposed (official) recovery needs nx == nz and equal cube sides in x and z, "
                              f"got grid {tuple(grid)} and cubes {(cx, cy, cz)}")
        v = v.transpose(1, 3)   # the cube at (x, y, z) goes to (z, y, x)
    return v.permute(0, 4, 3, 5, 2, 6, 1, 7).reshape(b, c, nx * cx, ny * cy, nz * cz)


def location_targets(batch: int, grid: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Location class of every row of :func:`partition`'s output: (B * n,) int64, p = x + nx*y + nx*ny*z."""
    n = grid[0] * grid[1] * grid[2]
    return torch.arange(n, device=device).repeat(batch)


def random_perms(batch: int, grid: Sequence[int], generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """(n, B) int64: one random permutation of the batch per cube position (argsort of uniform draws, as the
    official ``argsort(rand(B, 3, 3, 3), dim=0)``)."""
    n = grid[0] * grid[1] * grid[2]
    r = torch.rand(n, batch, generator=generator)
    return torch.argsort(r, dim=1).to(device)


def _by_position(x: torch.Tensor, grid: Sequence[int]) -> tuple[torch.Tensor, Triple]:
    v, cube = _split(x, grid)                                       # (B, nz, ny, nx, C, cx, cy, cz)
    b, c = x.shape[:2]
    return v.reshape(b, -1, c, *cube), cube                         # (B, n, C, cx, cy, cz)


def _gather(x: torch.Tensor, index: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """out[b, p] = x[index[p, b], p] for (B, C, X, Y, Z) patches."""
    v, cube = _by_position(x, grid)
    b, n = v.shape[:2]
    p = torch.arange(n, device=x.device)
    out = v[index.t().to(x.device), p[None, :]]                      # (B, n, C, cx, cy, cz)
    return recover(out.reshape(b * n, x.shape[1], *cube), grid)


def mix(x: torch.Tensor, perms: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Cross-image partition: ``mixed[b, cube p] = x[perms[p, b], cube p]`` (cubes stay at their position)."""
    return _gather(x, perms, grid)


def unmix(y: torch.Tensor, perms: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Cross-image recovery, the exact inverse of :func:`mix`: ``out[b, p] = y[perms_p^-1(b), p]``."""
    return _gather(y, torch.argsort(perms, dim=1), grid)
