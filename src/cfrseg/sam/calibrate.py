"""Prior calibration of SAM's class probabilities before they become pseudo-labels ("distribution alignment").

A SAM fine-tuned on a handful of volumes with a loss dominated by background voxels is biased towards
background: on LA (lite, L=4) its argmax labels cover about half of the atrium, with precision 0.85 but recall
0.46 (docs/results.md). The bias is visible without any ground truth of the unlabeled cases: the argmax labels
hold far fewer foreground voxels than the labeled volumes do.

``calibration = "prior"`` corrects this with per-class weights ``w`` (label = argmax_k w_k p_k) chosen so that
the pseudo-labels of a few unlabeled volumes have the same class fractions as the labeled volumes (the idea of
ReMixMatch's distribution alignment, applied to voxel fractions). Only labeled data and unlabeled images are
used. Two classes: ``w = (1, (1 - t) / t)`` for the exact quantile threshold ``t`` on p_1; more classes:
iterative scaling of log-weights on a fixed voxel subsample.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from cfrseg.errors import InputError

EPS = 1e-6


def class_fractions(labels: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """Pooled voxel fraction of each class 0..K-1 over label maps (the prior of ``calibration = "prior"``)."""
    counts = np.zeros(num_classes, dtype=np.float64)
    for lab in labels:
        counts += np.bincount(np.asarray(lab).ravel().astype(np.int64), minlength=num_classes)[:num_classes]
    total = counts.sum()
    if total == 0:
        raise InputError("calibration: the labeled volumes hold no voxel")
    return counts / total


def subsample(probs: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """(N, K) probabilities of ``n`` voxels of a (K, X, Y, Z) map, drawn uniformly without replacement with a
    fixed seed (all voxels when the volume has fewer)."""
    flat = probs.reshape(probs.shape[0], -1)
    m = flat.shape[1]
    if m <= n:
        return flat.T.float().cpu()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(m, generator=g)[:n].to(flat.device)
    return flat[:, idx].T.float().cpu()


def fit_class_weights(samples: torch.Tensor, prior: Sequence[float], iterations: int = 200) -> list[float]:
    """Weights w (K,) with w_0 = 1 such that the argmax of w * p over ``samples`` (N, K) gives class fractions
    close to ``prior`` (K,). Two classes: exact quantile threshold. Classes absent from the prior keep weight 1."""
    pri = torch.as_tensor(np.asarray(prior, dtype=np.float64))
    k = samples.shape[1]
    if pri.numel() != k:
        raise InputError(f"calibration: prior has {pri.numel()} classes, probabilities have {k}")
    if samples.shape[0] == 0:
        raise InputError("calibration: no voxel to calibrate on")
    p = samples.double().clamp_min(EPS)
    if k == 2:
        target = float(pri[1])
        if target <= 0.0:
            return [1.0, 1.0]
        # foreground where p1 > t: t is the k-th smallest p1, k = the number of background voxels wanted
        k_bg = min(max(int(round((1.0 - target) * p.shape[0])), 1), p.shape[0])
        t = float(p[:, 1].kthvalue(k_bg).values)
        t = min(max(t, EPS), 1.0 - EPS)
        return [1.0, (1.0 - t) / t]
    logp, logw = p.log(), torch.zeros(k, dtype=torch.float64)
    present = pri > 0
    for _ in range(iterations):
        lab = torch.argmax(logp + logw, dim=1)
        frac = torch.bincount(lab, minlength=k).double() / lab.numel()
        step = 0.5 * (pri.clamp_min(EPS).log() - frac.clamp_min(EPS).log())
        logw = logw + torch.where(present, step, torch.zeros_like(step))
        logw = logw - logw[0]
    return [float(v) for v in logw.exp()]


def apply_class_weights(probs: torch.Tensor, weights: Sequence[float] | None) -> torch.Tensor:
    """(K, ...) probabilities reweighted by ``weights`` and renormalised (unchanged for None or all ones)."""
    if weights is None or all(abs(w - 1.0) < 1e-12 for w in weights):
        return probs
    if len(weights) != probs.shape[0]:
        raise InputError(f"calibration: {len(weights)} class weights for {probs.shape[0]} classes")
    w = torch.as_tensor(list(weights), dtype=probs.dtype, device=probs.device).view(-1, *([1] * (probs.dim() - 1)))
    q = probs * w
    return q / q.sum(dim=0, keepdim=True).clamp_min(EPS)
