"""Augmentations, crops and the two-stream sampler."""

from __future__ import annotations

import numpy as np

from cfrseg.ssl.augment import Aug, apply_aug, sample_aug, source_patch
from cfrseg.ssl.sampling import TwoStreamSampler, crop, crop_aug, foreground_voxels


def test_identity_reachable_and_all_transforms_drawn():
    rng = np.random.default_rng(0)
    seen = {sample_aug(rng) for _ in range(400)}
    assert Aug() in seen                                     # identity (k = 0, no flip)
    assert {a.k for a in seen} == {0, 1, 2, 3}
    assert {a.flip_axis for a in seen} == {None, 0, 1}
    assert all(not sample_aug(rng, rotate=False, flip=False).k for _ in range(10))


def test_same_transform_on_image_label_pseudolabel():
    rng = np.random.default_rng(1)
    img = rng.normal(size=(20, 12, 8)).astype(np.float32)
    lab = (img > 0.5).astype(np.uint8)
    pl = (img > 0.0).astype(np.uint8)
    for _ in range(20):
        aug = sample_aug(rng)
        a, b, c = apply_aug(img, aug), apply_aug(lab, aug), apply_aug(pl, aug)
        assert np.array_equal(b, (a > 0.5).astype(np.uint8)) and np.array_equal(c, (a > 0).astype(np.uint8))
    assert np.array_equal(apply_aug(img, Aug()), img)


def test_crop_then_rotate_equals_rotate_then_crop():
    rng = np.random.default_rng(2)
    vol = rng.normal(size=(30, 22, 10))
    patch = (16, 8, 4)
    for k in range(4):
        for flip in (None, 0, 1):
            aug = Aug(k, flip)
            src = source_patch(patch, aug)
            start = (3, 5, 2)
            got = crop_aug(vol, aug, start, patch)
            assert got.shape == patch
            full = apply_aug(crop(vol, start, src), aug)
            assert np.array_equal(got, full)


def test_crop_pads_small_volumes():
    vol = np.ones((4, 4, 4), np.float32)
    out = crop(vol, (-2, 0, -1), (8, 4, 6))
    assert out.shape == (8, 4, 6) and out.sum() == 64 and out[0].sum() == 0
    s = TwoStreamSampler(1, 0, 1, 0, seed=0)
    _, start = s.draw_crop((4, 20, 20), (8, 8, 8), augment=False)
    assert start[0] == -2 and 0 <= start[1] <= 12


def test_sampler_l1_and_repeats():
    s = TwoStreamSampler(1, 3, batch_labeled=2, batch_unlabeled=2, seed=0)
    for _ in range(5):
        lab, unl = s.next()
        assert lab == [0, 0] and len(unl) == 2 and all(0 <= u < 3 for u in unl)


def test_sampler_covers_each_epoch_and_resumes_exactly():
    a = TwoStreamSampler(4, 6, 2, 3, seed=3)
    first = [a.next() for _ in range(2)]
    assert sorted(first[0][0] + first[1][0]) == [0, 1, 2, 3]      # one labeled epoch = each case once
    state = a.state_dict()
    crops = a.draw_crop((50, 50, 30), (16, 16, 16), True)
    rest = [a.next() for _ in range(7)]
    b = TwoStreamSampler(4, 6, 2, 3, seed=99)
    b.load_state_dict(state)
    assert b.draw_crop((50, 50, 30), (16, 16, 16), True) == crops
    assert [b.next() for _ in range(7)] == rest


def test_foreground_oversampling_places_crops_on_the_label():
    label = np.zeros((60, 50, 12), np.uint8)
    label[40:44, 5:8, 3:5] = 2                                  # a small structure far from the centre
    fg = foreground_voxels(label)
    assert fg.shape == (4 * 3 * 2, 3) and (label[tuple(fg.T)] == 2).all()
    assert len(foreground_voxels(np.ones((50, 50, 50), np.uint8), limit=1000)) == 1000   # capped subsample
    patch = (16, 16, 8)

    def hits(prob: float, n: int = 400) -> int:
        s = TwoStreamSampler(1, 0, 1, 0, seed=3)
        count = 0
        for _ in range(n):
            aug, start = s.draw_crop(label.shape, patch, True, 0.5, fg, prob)
            count += int(crop_aug(label, aug, start, patch, 0).any())
        return count
    assert hits(1.0) == 400                                     # every crop holds foreground
    assert hits(0.0) < 80                                       # uniform crops rarely do (about 10 %)
    assert 120 < hits(0.33) < 220                               # a third plus the uniform share: ~160
    # probability 0 draws exactly what the sampler drew before the option existed
    a, b = TwoStreamSampler(1, 0, 1, 0, seed=5), TwoStreamSampler(1, 0, 1, 0, seed=5)
    assert [a.draw_crop(label.shape, patch, True, 0.5) for _ in range(20)] == \
           [b.draw_crop(label.shape, patch, True, 0.5, fg, 0.0) for _ in range(20)]
