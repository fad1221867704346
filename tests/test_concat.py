"""Concatenate module: layout, exact round trips, validity mask, scaling, patch tiling, augmentations."""

from __future__ import annotations

import pytest
import torch

from cfrseg.errors import InputError
from cfrseg.sam.concat import (
    apply_curves,
    bezier_curves,
    from_mosaic,
    grid_starts,
    normalize01,
    plan_mosaic,
    random_bezier,
    rot_flip,
    sample_rot_flip,
    tile_starts,
    to_mosaic,
    undo_rot_flip,
    validity_mask,
)


def _labels(shape, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, k, shape, generator=g, dtype=torch.uint8)


@pytest.mark.parametrize(
    "shape,canvas,pad",
    [((112, 112, 80), 1024, 0), ((112, 112, 80), 1026, 1), ((96, 96, 96), 1024, 2),
     ((112, 112, 88), 1120, 0), ((64, 64, 100), 1024, 1), ((120, 96, 40), 1024, 3), ((5, 7, 1), 16, 0)],
)
def test_label_round_trip_bit_exact(shape, canvas, pad):
    lo = plan_mosaic(shape, canvas, pad=pad)
    assert not lo.scaled and lo.slots >= shape[2]
    vol = _labels(shape)
    m = to_mosaic(vol, lo)
    assert m.shape == (canvas, canvas) and m.dtype == torch.uint8
    assert torch.equal(from_mosaic(m, lo), vol)
    mask = validity_mask(lo)
    assert int(mask.sum()) == vol.numel()
    assert int(m[~mask].sum()) == 0          # fill everywhere else


def test_layout_row_major_no_transpose():
    x, y, d = 4, 3, 5
    vol = torch.arange(x * y * d).reshape(x, y, d)
    lo = plan_mosaic((x, y, d), 18, pad=1)
    assert (lo.n_rows, lo.n_cols, lo.front) == (3, 3, 0)
    m = to_mosaic(vol, lo)
    for z in range(d):
        r, c = lo.slot_of(z)
        assert (r, c) == divmod(z, 3)
        r0, c0 = r * lo.pitch_h + 1, c * lo.pitch_w + 1
        assert torch.equal(m[r0 : r0 + x, c0 : c0 + y], vol[:, :, z])


def test_split_empty_and_given_grid():
    lo = plan_mosaic((96, 96, 96), 1024, n_rows=10, n_cols=10, pad=3, empty="split")
    assert lo.front == 2 and lo.pitch_h == 102
    vol = _labels((96, 96, 96))
    assert torch.equal(from_mosaic(to_mosaic(vol, lo), lo), vol)
    assert plan_mosaic((8, 8, 10), 64, n_rows=2).n_cols == 5
    with pytest.raises(InputError):
        plan_mosaic((8, 8, 10), 64, n_rows=3, n_cols=3)   # would drop a slice


def test_batched_probabilities_inverse():
    shape = (2, 3, 20, 16, 10)                              # (B, K, X, Y, D)
    p = torch.softmax(torch.randn(shape), dim=1)
    lo = plan_mosaic(shape, 88, pad=1)
    m = to_mosaic(p, lo)
    assert not lo.scaled and m.shape == (2, 3, 88, 88)
    assert torch.equal(from_mosaic(m, lo), p)


def test_scaled_round_trip_nearly_exact():
    # smooth blobs: label = distance bands from a centre
    x, y, d = 40, 40, 30
    g = torch.stack(torch.meshgrid(torch.arange(x), torch.arange(y), torch.arange(d), indexing="ij")).float()
    r = ((g - torch.tensor([20.0, 18.0, 15.0])[:, None, None, None]) ** 2).sum(0).sqrt()
    lab = (r < 8).to(torch.uint8) + (r < 4).to(torch.uint8)
    for canvas, upscale in ((256, True), (160, False)):      # 240 -> 256 (up), 240 -> 160 (down)
        lo = plan_mosaic((x, y, d), canvas, upscale=upscale)
        assert lo.scaled and lo.inner == canvas
        back = from_mosaic(to_mosaic(lab, lo), lo)
        agree = (back == lab).float().mean().item()
        assert agree > (0.995 if upscale else 0.97), agree
        mask = validity_mask(lo)
        assert abs(int(mask.sum()) - lab.numel() * lo.scale**2) / (lab.numel() * lo.scale**2) < 0.05


def test_image_scaling_is_bilinear_and_bounded():
    img = torch.rand(1, 1, 50, 50, 20)
    lo = plan_mosaic(img.shape, 128)
    assert lo.scaled
    m = to_mosaic(img, lo)
    assert m.dtype == torch.float32 and m.min() >= 0 and m.max() <= 1
    back = from_mosaic(m, lo)
    assert back.shape == img.shape


def test_device_follows_input():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    vol = _labels((2, 1, 12, 12, 9)).to(dev)
    lo = plan_mosaic(vol.shape, 42, pad=1)
    m = to_mosaic(vol, lo)
    assert m.device == vol.device
    assert torch.equal(from_mosaic(m, lo), vol)
    assert validity_mask(lo, device=dev).device == vol.device


def test_bad_shapes():
    lo = plan_mosaic((8, 8, 4), 16)
    with pytest.raises(InputError):
        to_mosaic(torch.zeros(8, 8, 5), lo)
    with pytest.raises(InputError):
        from_mosaic(torch.zeros(15, 15), lo)


def test_tile_starts_cover_with_overlap():
    assert tile_starts(100, 200) == [0]
    s = tile_starts(300, 112, 0.25)
    assert s[0] == 0 and s[-1] == 300 - 112
    assert all(b - a <= 112 * 0.75 for a, b in zip(s, s[1:]))
    assert len(grid_starts((300, 200), (112, 112))) == len(s) * len(tile_starts(200, 112))


def test_bezier_monotone_identity_and_batched():
    g = torch.Generator().manual_seed(0)
    xs, ys = bezier_curves(16, generator=g)
    assert torch.all(xs.diff(dim=1) >= -1e-7) and torch.all(ys.diff(dim=1) >= -1e-7)
    v = torch.rand(16, 1, 8, 8, 4)
    out = apply_curves(v, xs, ys)
    order = v.reshape(16, -1).argsort(1)
    assert torch.all(out.reshape(16, -1).gather(1, order).diff(dim=1) >= -1e-6)   # monotone
    ident = torch.linspace(0, 1, 50).expand(2, -1)
    assert torch.allclose(apply_curves(v[:2], ident, ident), v[:2], atol=1e-6)
    same = random_bezier(v, p=0.0, generator=g)
    assert torch.allclose(same, v, atol=1e-6)
    changed = random_bezier(v, p=1.0, generator=g)
    assert changed.shape == v.shape and changed.min() >= 0 and changed.max() <= 1
    n = normalize01(torch.randn(2, 1, 4, 4, 4) * 5 + 3)
    assert torch.allclose(n.amin(dim=(-3, -2, -1)), torch.zeros(2, 1))
    assert torch.allclose(n.amax(dim=(-3, -2, -1)), torch.ones(2, 1))


def test_rot_flip_family_and_inverse():
    vol = torch.arange(4 * 3 * 2).reshape(4, 3, 2)
    g = torch.Generator().manual_seed(1)
    seen = {sample_rot_flip(g) for _ in range(200)}
    assert len(seen) == 8 and (0, False) in seen
    outs = set()
    for k in range(4):
        for f in (False, True):
            t = rot_flip(vol, k, f)
            assert torch.equal(undo_rot_flip(t, k, f), vol)
            outs.add(tuple(t.flatten().tolist()) + t.shape)
    assert len(outs) == 8           # all 8 in-plane orientations distinct
