"""Sliding-window inference, whole-volume segmentation and the model.pt artifact."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from cfrseg.data.volume import Volume
from cfrseg.errors import ConfigError, InputError, NotFoundError
from cfrseg.models import build_network
from cfrseg.stages.infer import (
    InferConfig,
    largest_component,
    load_model,
    save_model,
    segment_volume,
    sliding_window,
    window_grid,
)


def tiny(k: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_network("tiny", 1, k).eval()


def reference_loop(net: nn.Module, image: np.ndarray, patch, stride, k: int) -> np.ndarray:
    """The reference test_single_case, reduced: pad, per-window loop, numpy sums of softmax and counts."""
    pads = [(max(p - s, 0) // 2, max(p - s, 0) - max(p - s, 0) // 2) for s, p in zip(image.shape, patch)]
    img = np.pad(image, pads)
    score = np.zeros((k, *img.shape), np.float32)
    cnt = np.zeros(img.shape, np.float32)
    n = [math.ceil((s - p) / st) + 1 for s, p, st in zip(img.shape, patch, stride)]
    for i in range(n[0]):
        x = min(stride[0] * i, img.shape[0] - patch[0])
        for j in range(n[1]):
            y = min(stride[1] * j, img.shape[1] - patch[1])
            for k_ in range(n[2]):
                z = min(stride[2] * k_, img.shape[2] - patch[2])
                t = torch.from_numpy(
                    img[None, None, x : x + patch[0], y : y + patch[1], z : z + patch[2]].copy()
                )
                p = torch.softmax(net(t), dim=1).detach().numpy()[0]
                score[:, x : x + patch[0], y : y + patch[1], z : z + patch[2]] += p
                cnt[x : x + patch[0], y : y + patch[1], z : z + patch[2]] += 1
    score /= cnt
    sx, sy, sz = image.shape
    return score[:, pads[0][0] : pads[0][0] + sx, pads[1][0] : pads[1][0] + sy, pads[2][0] : pads[2][0] + sz]


def test_window_grid_matches_reference_count_and_covers() -> None:
    corners = window_grid((140, 140, 88), (112, 112, 80), (18, 18, 4))
    assert len(corners) == 27  # the reference's example
    assert sorted({c[0] for c in corners}) == [0, 18, 28] and sorted({c[2] for c in corners}) == [0, 4, 8]
    cover = np.zeros((41, 37, 23), int)
    for x, y, z in window_grid(cover.shape, (16, 16, 16), (7, 5, 16)):
        cover[x : x + 16, y : y + 16, z : z + 16] += 1
    assert cover.min() >= 1
    assert window_grid((16, 16, 16), (16, 16, 16), (4, 4, 4)) == [(0, 0, 0)]


@pytest.mark.parametrize("gaussian", [False, True])
def test_one_patch_equals_single_forward(gaussian: bool) -> None:
    net = tiny(3)
    x = torch.randn(1, 16, 32, 16)
    with torch.no_grad():
        expected = torch.softmax(net(x[None]), 1)[0]
    got = sliding_window(net, x, (16, 32, 16), (8, 8, 8), 3, gaussian=gaussian)
    assert got.shape == (3, 16, 32, 16)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_smaller_than_patch_is_padded_symmetrically_and_cropped() -> None:
    net = tiny()
    x = np.random.default_rng(0).standard_normal((11, 30, 16)).astype(np.float32)
    padded = np.pad(x, [(2, 3), (1, 1), (0, 0)])  # symmetric: extra voxel after
    with torch.no_grad():
        full = torch.softmax(net(torch.from_numpy(padded)[None, None]), 1)[0]
    got = sliding_window(net, x, (16, 32, 16), (16, 16, 16), 2)
    assert got.shape == (2, 11, 30, 16)
    torch.testing.assert_close(got, full[:, 2:13, 1:31, :], atol=1e-6, rtol=1e-5)


def test_matches_reference_loop_with_overlaps_and_padding() -> None:
    net = tiny()
    x = np.random.default_rng(1).standard_normal((37, 21, 30)).astype(np.float32)
    patch, stride = (16, 32, 16), (7, 9, 5)
    ref = reference_loop(net, x, patch, stride, 2)
    got = sliding_window(net, x, patch, stride, 2, batch_size=3)
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-5)


def test_batched_equals_unbatched_and_restores_mode() -> None:
    net = tiny()
    net.train()
    x = torch.randn(1, 40, 36, 24)
    a = sliding_window(net, x, (16, 16, 16), (8, 8, 8), 2, batch_size=1)
    b = sliding_window(net, x, (16, 16, 16), (8, 8, 8), 2, batch_size=5)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert net.training  # mode restored
    g = sliding_window(net, x, (16, 16, 16), (8, 8, 8), 2, gaussian=True)
    torch.testing.assert_close(g.sum(0), torch.ones(40, 36, 24))


def test_bad_window_arguments() -> None:
    with pytest.raises(InputError, match="stride"):
        sliding_window(tiny(), torch.zeros(1, 16, 16, 16), (16, 16, 16), (17, 8, 8), 2)
    with pytest.raises(InputError, match="shape"):
        sliding_window(tiny(), torch.zeros(2, 1, 16, 16, 16), (16, 16, 16), (8, 8, 8), 2)
    with pytest.raises(ConfigError, match="stride"):
        InferConfig(patch=(16, 16, 16), stride=(32, 8, 8))


class Threshold(nn.Module):
    """Foreground where the intensity exceeds ``level``: logits (0, x - level)."""

    num_classes = 2

    def __init__(self, level: float) -> None:
        super().__init__()
        self.level = nn.Parameter(torch.tensor(level))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x), x - self.level], dim=1)


def sphere_volume(shape=(48, 44, 30)) -> tuple[Volume, np.ndarray]:
    g = np.indices(shape).astype(np.float32)
    c = np.array(shape, np.float32)[:, None, None, None] / 2
    inside = (((g - c) / np.array([14, 12, 9], np.float32)[:, None, None, None]) ** 2).sum(0) <= 1
    img = np.where(inside, 300.0, 10.0).astype(np.float32)
    vol = Volume(
        img, spacing=(0.7, 0.8, 2.5), origin=(-5.0, 3.0, 10.0), direction=(0, 1, 0, 1, 0, 0, 0, 0, -1)
    )
    return vol, inside


@pytest.mark.parametrize(
    "zoom, normalize, level, min_dice",
    [(None, "zscore", 0.0, 1.0), (None, "none", 155.0, 1.0), ((0.5, 0.5, 0.75), "none", 155.0, 0.95)],
)
def test_segment_volume_keeps_geometry(zoom, normalize, level, min_dice) -> None:
    vol, truth = sphere_volume()  # intensities 300 inside, 10 outside: z-scored, 0 separates them
    cfg = InferConfig(patch=(16, 16, 16), stride=(8, 8, 8), batch_size=4, device="cpu")
    seg = segment_volume(Threshold(level), vol, cfg, {"zoom": zoom, "normalize": normalize})
    assert seg.same_geometry(vol) and seg.array.dtype == np.uint8
    dice = 2 * (seg.array.astype(bool) & truth).sum() / (seg.array.sum() + truth.sum())
    assert dice >= min_dice


def test_segment_volume_with_network_and_lcc() -> None:
    vol, _ = sphere_volume((20, 18, 17))
    cfg = InferConfig(patch=(16, 16, 16), stride=(16, 16, 16), largest_component=True, device="cpu")
    seg = segment_volume(tiny(3), vol, cfg, {"zoom": (0.5, 0.5, 0.5)})
    assert seg.shape == vol.shape and set(np.unique(seg.array)) <= {0, 1, 2}
    with pytest.raises(ConfigError, match="unknown key"):
        segment_volume(tiny(), vol, cfg, {"zoom": None, "resample": 1})


def test_largest_component_per_class() -> None:
    lab = np.zeros((10, 10, 10), np.uint8)
    lab[0:3, 0:3, 0:3] = 1
    lab[6:8, 6:8, 6:8] = 1  # smaller blob of class 1
    lab[0:2, 6:9, 6:9] = 2
    lab[9, 9, 9] = 2
    out = largest_component(lab, 3)
    assert (out == 1).sum() == 27 and (out == 2).sum() == 18 and out[9, 9, 9] == 0 and lab[9, 9, 9] == 2


def test_save_load_round_trip(tmp_path) -> None:
    student, teacher = tiny(seed=1), tiny(seed=2)
    cfg = InferConfig(patch=(16, 16, 16), stride=(8, 8, 8))
    pre = {"zoom": (0.5, 0.5, 0.5), "normalize": "zscore"}
    save_model(
        tmp_path / "model.pt",
        network="tiny",
        network_kwargs={"n_filters": 2},
        num_classes=2,
        student=student,
        teacher=teacher,
        evaluate="teacher",
        preprocess=pre,
        infer=cfg,
    )
    x = torch.randn(1, 1, 16, 16, 16)
    for source in (tmp_path, tmp_path / "model.pt", (tmp_path / "model.pt").read_bytes()):
        model, meta = load_model(source, "cpu")
        assert not model.training
        torch.testing.assert_close(model(x), teacher(x))
        assert meta["network"] == "tiny" and meta["evaluate"] == "teacher" and meta["num_classes"] == 2
        assert InferConfig.from_dict(meta["infer"]) == cfg and tuple(meta["preprocess"]["zoom"]) == (
            0.5,
            0.5,
            0.5,
        )
        assert "student" not in meta
    buf = io.BytesIO()
    save_model(buf, network="tiny", num_classes=2, student=student)  # no teacher: evaluates the student
    model, meta = load_model(buf.getvalue(), "cpu")
    assert meta["evaluate"] == "student"
    torch.testing.assert_close(model(x), student(x))


def test_load_errors(tmp_path) -> None:
    with pytest.raises(NotFoundError, match="not found"):
        load_model(tmp_path)
    (tmp_path / "model.pt").write_bytes(b"garbage")
    with pytest.raises(InputError, match="not a readable"):
        load_model(tmp_path)
    torch.save({"network": "tiny"}, tmp_path / "model.pt")
    with pytest.raises(InputError, match="missing"):
        load_model(tmp_path)
    save_model(tmp_path / "model.pt", network="tiny", num_classes=3, student=tiny(2))  # wrong class count
    with pytest.raises(InputError, match="do not fit"):
        load_model(tmp_path)
    with pytest.raises(ConfigError, match="teacher"):
        save_model(tmp_path / "x.pt", network="tiny", num_classes=2, student=tiny(), evaluate="teacher")


def test_bf16_precision_runs_and_stays_close():
    torch.manual_seed(0)
    net = build_network("vnet", 1, 2, n_filters=4).eval()
    img = torch.randn(1, 40, 36, 20)
    ref = sliding_window(net, img, (32, 32, 16), (16, 16, 8), 2)
    bf = sliding_window(net, img, (32, 32, 16), (16, 16, 8), 2, precision="bf16")
    assert bf.dtype == torch.float32 and bf.shape == ref.shape
    assert float((bf - ref).abs().max()) < 0.05
    assert not torch.equal(bf, ref)      # bf16 really ran
    with pytest.raises(InputError, match="precision"):
        sliding_window(net, img, (32, 32, 16), (16, 16, 8), 2, precision="fp8")
    with pytest.raises(ConfigError, match="precision"):
        InferConfig(precision="half")
