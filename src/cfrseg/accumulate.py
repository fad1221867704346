"""Memory-bounded accumulation of overlapping window predictions, streamed resampling and streamed argmax.

Sliding-window inference (:mod:`cfrseg.stages.infer`) and SAM pseudo-labelling (:mod:`cfrseg.stages.pseudolabel`)
average the K-class probabilities of overlapping windows, resample them to the source grid and take the argmax.
Holding the whole (K, X, Y, Z) float32 map costs 4 K bytes per voxel (K = 14 on 512 x 512 x 150: 2.2 GB, and as
much again for the resampled copy). Here nothing of size K x volume is ever allocated:

- windows arrive sorted along one *sweep* axis (the slowest axis of the window plan); :class:`SweepAccumulator`
  keeps sums only for the band of planes a window may still touch (about one window long) and hands finished
  planes on (:meth:`SweepAccumulator.release`);
- :class:`SweepResampler` turns finished planes of the model grid into planes of the source grid: linear
  interpolation along the sweep axis, bilinear in the plane (together exactly the trilinear interpolation of
  ``F.interpolate(..., mode="trilinear", align_corners=False)``, to float rounding), a few planes at a time;
- sinks consume the final planes: :class:`ArgmaxSink` (labels, optional confidence and class weights),
  :class:`SampleSink` (a fixed voxel subsample, for calibration) or :class:`FullSink` (the whole map, for the
  APIs that return probabilities).

Peak memory: 4 K bytes x (band planes + a few resampled planes) x plane size, plus the label map (1 byte per
voxel) and optional confidence map (4 bytes per voxel). Sums are float32 and added in the same order as a
whole-volume accumulator would, so the averaged probabilities are bit-identical to it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

Sink = Callable[[int, torch.Tensor], None]   # sink(first plane index, planes (K, ...) in volume layout)


def _to_buf(t: torch.Tensor, axis: int, lead: int) -> torch.Tensor:
    """Volume layout -> buffer layout (sweep axis first after ``lead`` leading dims)."""
    return t.movedim(lead + axis, lead)


def _to_vol(t: torch.Tensor, axis: int, lead: int) -> torch.Tensor:
    return t.movedim(lead, lead + axis)


class SweepAccumulator:
    """Weighted sums of K-channel windows over a volume ``shape`` (3 axes), kept only for the planes (along
    ``axis``) at or after the last :meth:`release`. Windows may start before 0 or end after the volume (padding):
    only their part inside the volume is added. The sum and the summed weight are float32."""

    def __init__(self, num_classes: int, shape: Sequence[int], axis: int, device: torch.device | str = "cpu",
                 capacity: int = 0) -> None:
        self.k, self.shape, self.axis = int(num_classes), tuple(int(s) for s in shape), int(axis)
        self.device = torch.device(device)
        self.other = [i for i in range(3) if i != self.axis]
        self.lo = 0            # first plane not yet released
        self.hi = 0            # one past the last plane touched
        self.peak_planes = 0   # largest number of planes held at once (for tests and benchmarks)
        self._alloc(max(1, capacity))

    def _alloc(self, cap: int) -> None:
        a, b = (self.shape[i] for i in self.other)
        self.acc = torch.zeros((self.k, cap, a, b), dtype=torch.float32, device=self.device)
        self.norm = torch.zeros((cap, a, b), dtype=torch.float32, device=self.device)

    def _ensure(self, planes: int) -> None:
        cap = self.acc.shape[1]
        if planes <= cap:
            return
        old_acc, old_norm, used = self.acc, self.norm, self.hi - self.lo
        self._alloc(planes)   # exactly what is needed: the band is the memory this class exists to bound
        self.acc[:, :used] = old_acc[:, :used]
        self.norm[:used] = old_norm[:used]

    def add(self, start: Sequence[int], block: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Add ``block`` (K, wx, wy, wz) * ``weight`` (wx, wy, wz; None = 1) at corner ``start`` of the volume."""
        src, dst = [], []
        for st, n, size in zip(start, block.shape[1:], self.shape):
            a, b = max(int(st), 0), min(int(st) + int(n), size)
            if b <= a:
                return
            dst.append((a, b))
            src.append(slice(a - int(st), b - int(st)))
        a, b = dst[self.axis]
        if a < self.lo:
            raise ValueError(f"window at plane {a} of axis {self.axis} arrives after planes up to {self.lo} "
                             f"were released (windows must come sorted along the sweep axis)")
        self._ensure(b - self.lo)
        blk = block[(slice(None), *src)]
        if weight is not None:
            w = weight[tuple(src)]
            blk = blk * w
        sl = (slice(a - self.lo, b - self.lo), *(slice(*dst[i]) for i in self.other))
        self.acc[(slice(None), *sl)] += _to_buf(blk, self.axis, 1)
        if weight is None:
            self.norm[sl] += 1.0
        else:
            self.norm[sl] += _to_buf(w, self.axis, 0)
        self.hi = max(self.hi, b)
        self.peak_planes = max(self.peak_planes, self.hi - self.lo)

    def release(self, upto: int) -> tuple[int, torch.Tensor, torch.Tensor] | None:
        """Hand over planes [lo, upto) (no later window may touch them): ``(lo, sums (K, ...), weights (...))`` in
        volume layout (copies), or None when there is nothing new. The planes are dropped from the buffer."""
        upto = min(int(upto), self.shape[self.axis])
        n = upto - self.lo
        if n <= 0:
            return None
        lo = self.lo
        acc = _to_vol(self.acc[:, :n].clone(), self.axis, 1)
        norm = _to_vol(self.norm[:n].clone(), self.axis, 0)
        keep = max(self.hi - upto, 0)
        if keep:
            self.acc[:, :keep] = self.acc[:, n:n + keep].clone()
            self.norm[:keep] = self.norm[n:n + keep].clone()
        self.acc[:, keep:keep + n].zero_()
        self.norm[keep:keep + n].zero_()
        self.lo, self.hi = upto, max(self.hi, upto)
        return lo, acc, norm


def _linear_source(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every output index: (i0, i1, lambda) of linear interpolation with align_corners=False (PyTorch's
    source index: scale (j + 0.5) - 0.5, clamped at 0; i1 = i0 + 1 except at the last input sample)."""
    j = np.arange(n_out, dtype=np.float64)
    src = np.maximum((n_in / n_out) * (j + 0.5) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


class SweepResampler:
    """Resamples planes of a (K, *in_shape) map, pushed in order along ``axis``, to (K, *out_shape) and passes
    the output planes to ``sink`` in order; trilinear, align_corners=False. At most ``max_bytes`` of output
    planes are made at once (at least one plane)."""

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], axis: int, sink: Sink,
                 max_bytes: int = 16 << 20) -> None:
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.axis, self.sink, self.max_bytes = axis, sink, max_bytes
        self.other = [i for i in range(3) if i != axis]
        self.plane_out = tuple(self.out_shape[i] for i in self.other)
        self.same_plane = self.plane_out == tuple(self.in_shape[i] for i in self.other)
        self.identity = self.same_plane and self.in_shape[axis] == self.out_shape[axis]
        self.i0, self.i1, self.lam = _linear_source(self.in_shape[axis], self.out_shape[axis])
        self.buf: torch.Tensor | None = None   # input planes [blo, pushed) in buffer layout
        self.blo = 0
        self.pushed = 0                         # input planes received so far
        self.next = 0                           # next output plane

    def push(self, lo: int, planes: torch.Tensor) -> None:
        """Input planes [lo, lo + n) of the map, (K, ...) in volume layout; ``lo`` must continue the last push."""
        if self.identity:
            self.sink(lo, planes)
            return
        if lo != self.pushed:
            raise ValueError(f"resampler: planes pushed out of order ({lo}, expected {self.pushed})")
        p = _to_buf(planes, self.axis, 1)
        self.buf = p if self.buf is None or self.buf.shape[1] == 0 else torch.cat([self.buf, p], dim=1)
        if self.buf is p:
            self.blo = lo
        self.pushed = lo + p.shape[1]
        self._emit(self.pushed)

    def finish(self) -> None:
        """Emit the remaining output planes (all input planes must have been pushed)."""
        if not self.identity and self.next < self.out_shape[self.axis]:
            if self.pushed < self.in_shape[self.axis]:
                raise ValueError("resampler: finish() before every input plane was pushed")
            self._emit(self.in_shape[self.axis])

    def _emit(self, available: int) -> None:
        assert self.buf is not None
        n_out = self.out_shape[self.axis]
        k = self.buf.shape[0]
        per_plane = 4 * k * math.prod(self.plane_out)
        chunk = max(1, self.max_bytes // max(per_plane, 1))
        while self.next < n_out and self.i1[self.next] < available:
            j0 = self.next
            j1 = j0 + 1
            while j1 < n_out and j1 - j0 < chunk and self.i1[j1] < available:
                j1 += 1
            i0 = torch.as_tensor(self.i0[j0:j1] - self.blo, device=self.buf.device)
            i1 = torch.as_tensor(self.i1[j0:j1] - self.blo, device=self.buf.device)
            lam = torch.as_tensor(self.lam[j0:j1], device=self.buf.device).view(1, -1, 1, 1)
            a, b = self.buf[:, i0], self.buf[:, i1]
            planes = a + (b - a) * lam                                        # (K, c, A, B)
            if not self.same_plane:
                planes = F.interpolate(planes.transpose(0, 1), size=self.plane_out, mode="bilinear",
                                       align_corners=False).transpose(0, 1)
            self.sink(j0, _to_vol(planes, self.axis, 1))
            self.next = j1
            keep_from = min(int(self.i0[j1]), self.pushed) if j1 < n_out else self.pushed
            if keep_from > self.blo:   # input planes no later output needs
                self.buf, self.blo = self.buf[:, keep_from - self.blo:], keep_from


class ArgmaxSink:
    """Label map (uint8, or uint16 for > 256 classes) and optional confidence (float32 max probability) of a
    volume ``shape``, filled plane by plane along ``axis``; ``class_weights`` reweight and renormalise the
    probabilities first (:func:`cfrseg.sam.calibrate.apply_class_weights`)."""

    def __init__(self, shape: Sequence[int], num_classes: int, axis: int, confidence: bool = False,
                 class_weights: Sequence[float] | None = None) -> None:
        self.axis, self.class_weights = axis, class_weights
        self.labels = np.zeros(tuple(shape), np.uint8 if num_classes <= 256 else np.uint16)
        self.confidence = np.zeros(tuple(shape), np.float32) if confidence else None

    def __call__(self, lo: int, probs: torch.Tensor) -> None:
        from cfrseg.sam.calibrate import apply_class_weights

        conf, lab = apply_class_weights(probs, self.class_weights).max(dim=0)
        sl = [slice(None)] * 3
        sl[self.axis] = slice(lo, lo + probs.shape[1 + self.axis])
        self.labels[tuple(sl)] = lab.cpu().numpy()
        if self.confidence is not None:
            self.confidence[tuple(sl)] = conf.clamp(0, 1).float().cpu().numpy()


class FullSink:
    """The whole (K, *shape) float32 map (K x volume memory: only for APIs that return probabilities)."""

    def __init__(self, shape: Sequence[int], num_classes: int, axis: int, device: torch.device | str = "cpu") -> None:
        self.axis = axis
        self.probs = torch.zeros((num_classes, *shape), dtype=torch.float32, device=device)

    def __call__(self, lo: int, probs: torch.Tensor) -> None:
        sl = [slice(None)] * 4
        sl[1 + self.axis] = slice(lo, lo + probs.shape[1 + self.axis])
        self.probs[tuple(sl)] = probs


class SampleSink:
    """(n, K) probabilities of ``n`` voxels drawn uniformly without replacement with a fixed seed, the same
    voxels and order as :func:`cfrseg.sam.calibrate.subsample` of the whole map (all voxels when fewer)."""

    def __init__(self, shape: Sequence[int], num_classes: int, axis: int, n: int, seed: int = 0) -> None:
        self.shape, self.axis = tuple(shape), axis
        m = math.prod(self.shape)
        if m <= n:
            idx = torch.arange(m)
        else:
            idx = torch.randperm(m, generator=torch.Generator().manual_seed(seed))[:n]
        self.coords = np.unravel_index(idx.numpy(), self.shape)
        self.samples = torch.zeros((len(idx), num_classes), dtype=torch.float32)

    def __call__(self, lo: int, probs: torch.Tensor) -> None:
        hi = lo + probs.shape[1 + self.axis]
        c = self.coords[self.axis]
        pick = np.nonzero((c >= lo) & (c < hi))[0]
        if pick.size == 0:
            return
        at = [torch.as_tensor(self.coords[i][pick] - (lo if i == self.axis else 0), device=probs.device)
              for i in range(3)]
        self.samples[torch.as_tensor(pick)] = probs[:, at[0], at[1], at[2]].T.float().cpu()


class Unorient:
    """A sink adapter for sweeps over a reoriented array (``amap.apply`` of the source, shape
    ``oriented_shape``): planes along its ``axis`` go to ``sink`` as planes of the source array, along source
    axis ``amap.perm[axis]`` (build ``sink`` with that axis), in source order also where the axis is flipped.
    Exact: only a permutation and flips (:class:`cfrseg.data.resample.AxisMap`)."""

    def __init__(self, amap: Any, oriented_shape: Sequence[int], axis: int, sink: Sink) -> None:
        self.amap, self.axis, self.n, self.sink = amap, axis, int(oriented_shape[axis]), sink

    def __call__(self, lo: int, planes: torch.Tensor) -> None:
        k = planes.shape[1 + self.axis]
        start = self.n - lo - k if self.amap.flip[self.axis] else lo
        self.sink(start, self.amap.invert(planes))
