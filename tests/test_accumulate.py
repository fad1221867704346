"""Streamed accumulation, resampling and argmax (cfrseg.accumulate) equal the whole-volume computations, and
never allocate a K x volume float32 map (peak RSS measured in a subprocess, with a positive control)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cfrseg.accumulate import ArgmaxSink, FullSink, SampleSink, SweepAccumulator, SweepResampler
from cfrseg.data.volume import Volume
from cfrseg.sam import concat
from cfrseg.sam.calibrate import subsample
from cfrseg.sam.mosaic import MosaicSpec, crop_padded, orient, plan_windows, prepare_volume, unorient
from cfrseg.stages.infer import InferConfig, predict_probabilities, resize, segment_volume, sliding_window
from cfrseg.stages.pseudolabel import predict_volume, probs_to_label, stream_volume, tta_family


@pytest.mark.parametrize("axis", [0, 2])
@pytest.mark.parametrize("weighted", [False, True])
def test_sweep_accumulator_equals_whole_volume_sums(axis, weighted):
    g = torch.Generator().manual_seed(axis)
    shape, win, k = (23, 17, 19), (8, 9, 7), 3
    starts = [tuple(int(v) for v in torch.randint(-3, s - 2, (1,), generator=g)) for s in shape]
    corners = sorted({(int(torch.randint(-3, shape[0] - 4, (1,), generator=g)),
                       int(torch.randint(-3, shape[1] - 4, (1,), generator=g)),
                       int(torch.randint(-3, shape[2] - 4, (1,), generator=g))) for _ in range(40)},
                     key=lambda c: c[axis])
    assert starts  # (unused draw keeps the generator sequence documented)
    blocks = [torch.rand(k, *win, generator=g) for _ in corners]
    w = torch.rand(win, generator=g) + 0.5 if weighted else None
    full = torch.zeros(k, *shape)
    norm = torch.zeros(shape)
    acc = SweepAccumulator(k, shape, axis)
    got_s, got_n = torch.zeros(k, *shape), torch.zeros(shape)

    def take(rel):
        if rel is None:
            return
        lo, s, n = rel
        sl = [slice(None)] * 3
        sl[axis] = slice(lo, lo + n.shape[axis])
        got_s[(slice(None), *sl)] = s
        got_n[tuple(sl)] = n

    for i, (c, b) in enumerate(zip(corners, blocks)):
        src = tuple(slice(max(-v, 0), min(n, s - v)) for v, n, s in zip(c, win, shape))
        dst = tuple(slice(max(v, 0), min(v + n, s)) for v, n, s in zip(c, win, shape))
        full[(slice(None), *dst)] += b[(slice(None), *src)] * (1 if w is None else w[src])
        norm[dst] += 1 if w is None else w[src]
        acc.add(c, b, w)
        nxt = corners[i + 1][axis] if i + 1 < len(corners) else shape[axis]
        take(acc.release(nxt))
    assert torch.equal(got_s, full) and torch.equal(got_n, norm)
    assert acc.peak_planes <= win[axis] + max(np.diff([c[axis] for c in corners]).max(), 0) + 3
    with pytest.raises(ValueError, match="sorted"):
        acc2 = SweepAccumulator(k, shape, axis)
        acc2.add((5, 5, 5), blocks[0])
        acc2.release(10)
        acc2.add((0, 0, 0), blocks[0])


@pytest.mark.parametrize("axis", [0, 2])
@pytest.mark.parametrize("src, dst", [((10, 12, 7), (23, 30, 14)), ((20, 18, 16), (9, 7, 16)),
                                      ((11, 13, 5), (11, 13, 17)), ((9, 8, 7), (9, 8, 7))])
def test_resampler_equals_trilinear_interpolate(axis, src, dst):
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(4, *src, generator=g)
    ref = F.interpolate(probs[None], size=dst, mode="trilinear", align_corners=False)[0]
    full = FullSink(dst, 4, axis)
    r = SweepResampler(src, dst, axis, full, max_bytes=3 * 4 * 4 * 30 * 30)   # a few planes per chunk
    lo = 0
    for n in (1, 3, 2, 100):                                                      # uneven pushes
        hi = min(lo + n, src[axis])
        if hi > lo:
            sl = [slice(None)] * 3
            sl[axis] = slice(lo, hi)
            r.push(lo, probs[(slice(None), *sl)])
        lo = hi
    r.finish()
    torch.testing.assert_close(full.probs, ref, atol=2e-6, rtol=1e-5)


def test_sinks_match_whole_volume_helpers():
    g = torch.Generator().manual_seed(2)
    probs = torch.softmax(torch.randn(5, 12, 10, 9, generator=g) * 3, 0)
    weights = [1.0, 2.0, 0.5, 1.0, 3.0]
    for axis in (0, 2):
        am, smp = ArgmaxSink((12, 10, 9), 5, axis, confidence=True, class_weights=weights), \
            SampleSink((12, 10, 9), 5, axis, n=300, seed=4)
        for lo in range(0, probs.shape[1 + axis], 4):
            sl = [slice(None)] * 4
            sl[1 + axis] = slice(lo, lo + 4)
            am(lo, probs[tuple(sl)])
            smp(lo, probs[tuple(sl)])
        lab, conf = probs_to_label(probs, weights)
        assert np.array_equal(am.labels, lab)
        np.testing.assert_allclose(am.confidence, conf, atol=1e-6)   # same math; float summation order differs
        assert torch.equal(smp.samples, subsample(probs, 300, seed=4))


# -------------------------------------------------------------------------- the stages' streamed paths
class PixelSam(nn.Module):
    """A deterministic, batch-independent stand-in for SAM: (B, 3, S, S) -> (B, K, S, S) by a 3x3 convolution."""

    def __init__(self, k: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, k, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * 4


def _whole_volume_predict(sam, spec, image, k, tta_family, overlap, batch_size):
    """The pseudo-label stage's former whole-volume implementation (K x volume accumulators), as reference."""
    pv = prepare_volume(image, None, spec, k, torch.device("cpu"))
    layout = spec.layout()
    total = torch.zeros((k, *pv.image.shape))
    for o in tta_family:
        vol = orient(pv.image, o)
        acc, cnt = torch.zeros((k, *vol.shape)), torch.zeros(tuple(vol.shape))
        starts = plan_windows(tuple(vol.shape), spec.crop, overlap)
        for i in range(0, len(starts), batch_size):
            chunk = starts[i:i + batch_size]
            wins = [crop_padded(vol, s, spec.crop) for s in chunk]
            x = torch.stack([torch.where(ins, w, torch.zeros(())) for w, ins in wins])
            with torch.no_grad():
                prob = torch.softmax(sam(concat.to_mosaic(x, layout)[:, None].expand(-1, 3, -1, -1)), 1)
            for s, p in zip(chunk, concat.from_mosaic(prob, layout)):
                src, dst = [], []
                for st, n, L in zip(s, spec.crop, vol.shape):
                    lo, hi = max(st, 0), min(st + n, L)
                    dst.append(slice(lo, hi))
                    src.append(slice(lo - st, hi - st))
                acc[(slice(None), *dst)] += p[(slice(None), *src)]
                cnt[tuple(dst)] += 1
        total += unorient(acc / cnt.clamp_min(1), o)
    probs = total / len(tta_family)
    return F.interpolate(probs[None], size=image.shape, mode="trilinear", align_corners=False)[0]


@pytest.mark.parametrize("k", [4, 14])
def test_streamed_pseudolabels_equal_whole_volume_reference(k):
    spec = MosaicSpec(image_size=64, crop=(16, 16, 9), grid=3, tile_pad=2, zoom=(0.7, 0.7, 0.8))
    image = np.random.default_rng(k).standard_normal((33, 30, 23)).astype(np.float32)
    sam = PixelSam(k).eval()
    fam = tta_family(spec, 3)
    assert len(fam) == 3 and any(o[0] % 2 for o in fam)         # includes a quarter turn (x, y swapped)
    ref = _whole_volume_predict(sam, spec, image, k, fam, 0.3, 4)
    got = predict_volume(sam, spec, image, k, tta=True, tta_count=3, overlap=0.3, batch_size=4)
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)
    sink = ArgmaxSink(image.shape, k, 2, confidence=True)
    stream_volume(sam, spec, image, k, sink, tta=True, tta_count=3, overlap=0.3, batch_size=4)
    lab, conf = probs_to_label(ref)
    assert (sink.labels == lab).mean() > 0.9999 and np.abs(sink.confidence - conf).max() < 1e-5


@pytest.mark.parametrize("k, zoom", [(4, (0.5, 0.6, 0.75)), (14, None)])
def test_segment_volume_streamed_equals_whole_volume_argmax(k, zoom):
    torch.manual_seed(0)
    from cfrseg.models import build_network

    net = build_network("tiny", 1, k).eval()
    arr = np.random.default_rng(0).standard_normal((37, 30, 21)).astype(np.float32)
    vol = Volume(arr, (1.0, 1.0, 2.0))
    cfg = InferConfig(patch=(16, 16, 16), stride=(12, 10, 10), batch_size=3, device="cpu")
    pre = {"zoom": zoom, "normalize": "zscore"}
    img = torch.from_numpy((arr - arr.mean()) / arr.std())[None]
    from cfrseg.stages.infer import zoomed_shape

    img = resize(img, zoomed_shape(arr.shape, zoom))
    ref = resize(sliding_window(net, img, cfg.patch, cfg.stride, k, 3), arr.shape)   # whole-volume path
    probs = predict_probabilities(net, vol, cfg, pre)
    torch.testing.assert_close(probs, ref, atol=2e-6, rtol=1e-5)
    seg = segment_volume(net, vol, cfg, pre).array
    assert seg.shape == arr.shape and (seg == ref.argmax(0).numpy()).mean() > 0.9999


# ------------------------------------------------------------------------------------------------ memory
_MEMORY_SCRIPT = textwrap.dedent('''
    import json, sys
    import numpy as np, torch
    from torch import nn
    torch.set_num_threads(1)
    from cfrseg.data.volume import Volume
    from cfrseg.accumulate import ArgmaxSink
    from cfrseg.sam.mosaic import MosaicSpec
    from cfrseg.stages.infer import InferConfig, predict_probabilities, segment_volume
    from cfrseg.stages.pseudolabel import predict_volume, stream_volume

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    def measure(fn, *args):
        """Peak RSS growth (bytes) while fn runs: the high-water mark is reset first (Linux clear_refs 5); the
        process's ru_maxrss would not do, it starts at the parent's size after fork + exec."""
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = status("VmRSS")
        fn(*args)
        return status("VmHWM") - base

    class Net(nn.Module):                  # 1x1x1 convolution: the accumulation, not the network, is measured
        def __init__(self, k):
            super().__init__()
            self.num_classes = k
            self.conv = nn.Conv3d(1, k, 1)
        def forward(self, x):
            return self.conv(x)

    which = sys.argv[1]
    K = 14
    # volume B is volume A twice as long along the sweep axis (x for inference, z for pseudo-labels)
    a_shape, b_shape = ((192, 80, 48), (384, 80, 48)) if which == "infer" else ((96, 96, 80), (96, 96, 160))
    rng = np.random.default_rng(0)
    vol_a, vol_b = (rng.standard_normal(s).astype(np.float32) for s in (a_shape, b_shape))
    cfg = InferConfig(patch=(32, 32, 32), stride=(16, 16, 16), batch_size=4, device="cpu")
    pre = {"zoom": (0.5, 0.5, 0.5), "normalize": "zscore"}
    spec = MosaicSpec(image_size=256, crop=(64, 64, 16), grid=4, tile_pad=0, zoom=(0.5, 0.5, 1.0))

    def streamed(a):
        if which == "infer":
            segment_volume(Net(K).eval(), Volume(a), cfg, pre)
        else:
            stream_volume(nn.Conv2d(3, K, 1).eval(), spec, a, K, ArgmaxSink(a.shape, K, 2, confidence=True))

    def whole(a):                                        # positive control: the whole (K, X, Y, Z) map
        if which == "infer":
            predict_probabilities(Net(K).eval(), Volume(a), cfg, pre)
        else:
            predict_volume(nn.Conv2d(3, K, 1).eval(), spec, a, K)

    streamed(np.zeros((40, 40, 40), np.float32))         # warm up kernels and the allocator on a small volume
    out = {"voxels_a": vol_a.size, "voxels_b": vol_b.size, "k": K, "streamed_a": measure(streamed, vol_a),
           "streamed_b": measure(streamed, vol_b), "whole_a": measure(whole, vol_a)}
    print(json.dumps(out))
''')


@pytest.mark.parametrize("which", ["infer", "pseudolabel"])
def test_streamed_paths_never_allocate_k_times_volume(which, tmp_path):
    """K = 14. Doubling the volume along the sweep axis raises the peak RSS of the streamed path
    (segment_volume; the pseudo-label stage's stream) by less than 0.4 x 4K bytes per added voxel (what is
    left is single-channel: the normalised image, the label and confidence maps), while the whole-volume API
    (positive control, same process) needs at least 0.9 x 4K bytes per voxel of the smaller volume."""
    script = tmp_path / "mem.py"
    script.write_text(_MEMORY_SCRIPT)
    # a fixed mmap threshold makes glibc return freed large blocks at once, so peak RSS follows live memory
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, str(script), which], capture_output=True, text=True, timeout=300, env=env,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    kv4 = 4 * r["k"]
    slope = (r["streamed_b"] - r["streamed_a"]) / (r["voxels_b"] - r["voxels_a"])   # bytes per added voxel
    assert slope < 0.4 * kv4, r
    assert r["whole_a"] > 0.9 * kv4 * r["voxels_a"], r


@pytest.mark.parametrize("perm,flip", [((2, 0, 1), (True, False, True)), ((1, 2, 0), (False, True, False)),
                                       ((0, 1, 2), (True, True, True))])
@pytest.mark.parametrize("axis", [0, 2])
def test_unorient_streams_planes_back_to_the_source_grid_exactly(perm, flip, axis):
    """Planes of a reoriented map, streamed out of order in uneven bands, land where the whole-map inverse
    reorientation puts them (the plan's exact permutation + flips)."""
    from cfrseg.accumulate import FullSink, Unorient
    from cfrseg.data.resample import AxisMap

    amap = AxisMap(perm, flip)
    src_shape = (5, 7, 6)
    oriented = torch.rand((3, *amap.shape(src_shape)), generator=torch.Generator().manual_seed(1))
    sink = FullSink(src_shape, 3, amap.perm[axis])
    un = Unorient(amap, oriented.shape[1:], axis, sink)
    n, bands = oriented.shape[1 + axis], []
    lo = 0
    for width in (2, 1, 3, 9):
        if lo < n:
            bands.append((lo, min(lo + width, n)))
            lo += width
    for lo, hi in reversed(bands):
        un(lo, oriented.narrow(1 + axis, lo, hi - lo))
    assert torch.equal(sink.probs, amap.invert(oriented))
