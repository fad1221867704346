"""Sliding-window inference speed: cfrseg.stages.infer.sliding_window vs a reference-style loop, on one real LA case.

Both methods use the same seeded, randomly initialised full-size V-Net (n_filters 16, 2 classes, eval mode),
the same z-scored image and the same window grid. The reference-style loop re-implements the reference
``test_single_case`` faithfully: numpy padding, one window at a time, autograd ON, softmax copied to numpy and
summed with a count map in numpy. Reported: wall time of each, speed-up, and the Dice agreement of the two
argmax maps; plus cfrseg at a larger stride against the reference at the standard one.

    .venv/bin/python bench/infer_speed.py [--data DIR] [--case ID] [--max-windows N]

``--max-windows N`` crops the volume (centred, identically for both methods) so the grid has at most N
windows. Results: a table on stdout and bench/results/infer_speed.json.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from _common import Timer, format_rows, peak_rss_mb, write_json

from cfrseg.models import VNet
from cfrseg.stages.infer import sliding_window, window_grid, zscore


def reference_style(net: torch.nn.Module, image: np.ndarray, patch, stride, num_classes: int) -> np.ndarray:
    """The reference test_single_case loop (autograd on, numpy sums); returns probabilities (K, X, Y, Z)."""
    w, h, d = image.shape
    w_pad, h_pad, d_pad = (max(p - s, 0) for p, s in zip(patch, (w, h, d)))
    add_pad = w_pad > 0 or h_pad > 0 or d_pad > 0
    wl, hl, dl = w_pad // 2, h_pad // 2, d_pad // 2
    if add_pad:
        image = np.pad(image, [(wl, w_pad - wl), (hl, h_pad - hl), (dl, d_pad - dl)], mode="constant")
    ww, hh, dd = image.shape
    sx = math.ceil((ww - patch[0]) / stride[0]) + 1
    sy = math.ceil((hh - patch[1]) / stride[1]) + 1
    sz = math.ceil((dd - patch[2]) / stride[2]) + 1
    score_map = np.zeros((num_classes,) + image.shape).astype(np.float32)
    cnt = np.zeros(image.shape).astype(np.float32)
    for x in range(sx):
        xs = min(stride[0] * x, ww - patch[0])
        for y in range(sy):
            ys = min(stride[1] * y, hh - patch[1])
            for z in range(sz):
                zs = min(stride[2] * z, dd - patch[2])
                test_patch = image[xs : xs + patch[0], ys : ys + patch[1], zs : zs + patch[2]]
                test_patch = np.expand_dims(np.expand_dims(test_patch, axis=0), axis=0).astype(np.float32)
                test_patch = torch.from_numpy(test_patch)
                y1 = net(test_patch)  # no torch.no_grad(): the graph is built, as in the reference
                prob = F.softmax(y1, dim=1).cpu().data.numpy()[0]
                score_map[:, xs : xs + patch[0], ys : ys + patch[1], zs : zs + patch[2]] += prob
                cnt[xs : xs + patch[0], ys : ys + patch[1], zs : zs + patch[2]] += 1
    score_map = score_map / np.expand_dims(cnt, axis=0)
    if add_pad:
        score_map = score_map[:, wl : wl + w, hl : hl + h, dl : dl + d]
    return score_map


def window_gflop(net: torch.nn.Module, patch) -> float:
    """GFLOP of one forward pass of ``net`` on one window (counted on the meta device: nothing runs)."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    m = copy.deepcopy(net).to("meta").eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        m(torch.empty((1, 1, *patch), device="meta"))
    return fc.get_total_flops() / 1e9


def crop_to_windows(image: np.ndarray, patch, stride, max_windows: int | None) -> np.ndarray:
    """Centre-crop so the grid has at most ``max_windows`` windows (dropping windows on the longest axis)."""
    if not max_windows:
        return image
    n = [math.ceil((max(s, p) - p) / st) + 1 for s, p, st in zip(image.shape, patch, stride)]
    while math.prod(n) > max_windows and max(n) > 1:
        n[int(np.argmax(n))] -= 1
    size = [min(s, p + st * (k - 1)) for s, p, st, k in zip(image.shape, patch, stride, n)]
    lo = [(s - c) // 2 for s, c in zip(image.shape, size)]
    return image[tuple(slice(a, a + c) for a, c in zip(lo, size))]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--data", default=os.environ.get("CFRSEG_LA_DIR"), help="la2018 folder (default $CFRSEG_LA_DIR)"
    )
    ap.add_argument("--case", default=None, help="case id (default: first of train.list)")
    ap.add_argument("--patch", type=int, nargs=3, default=(112, 112, 80))
    ap.add_argument("--stride", type=int, nargs=3, default=(18, 18, 4))
    ap.add_argument(
        "--alt-stride", type=int, nargs=3, default=(28, 28, 8), help="larger stride for comparison"
    )
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="time each method this many times, alternating the order (ref, cfrseg, cfrseg, ref, ...), "
        "and report the fastest run of each (the CPU is shared)",
    )
    ap.add_argument("--bf16", action="store_true",
                    help="also time cfrseg with precision='bf16' (autocast; AVX512-BF16/AMX CPUs)")
    ap.add_argument("--name", default="infer_speed", help="results file name (bench/results/<name>.json)")
    args = ap.parse_args(argv)
    if not args.data or not (Path(args.data) / "train.list").is_file():
        print(
            "error: give --data or set CFRSEG_LA_DIR to the la2018 folder (with train.list)", file=sys.stderr
        )
        return 2
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    case = args.case or (data / "train.list").read_text().split()[0]
    with h5py.File(data / case / "mri_norm2.h5", "r") as f:
        raw = np.asarray(f["image"], dtype=np.float32)
    image = crop_to_windows(
        zscore(raw), args.patch, args.stride, args.max_windows
    )  # z-scored as the reference
    patch, stride, alt = tuple(args.patch), tuple(args.stride), tuple(args.alt_stride)

    torch.manual_seed(args.seed)
    net = VNet(in_channels=1, num_classes=2, n_filters=16).eval()
    n_win = len(window_grid([max(s, p) for s, p in zip(image.shape, patch)], patch, stride))
    n_alt = len(window_grid([max(s, p) for s, p in zip(image.shape, patch)], patch, alt))
    print(
        f"case {case}: volume {raw.shape}, benchmarked {image.shape}, {n_win} windows at stride {stride}, "
        f"{n_alt} at {alt}; {torch.get_num_threads()} threads"
    )

    def run_fast(st, precision="fp32"):
        return sliding_window(net, image, patch, st, 2, batch_size=args.batch_size,
                              precision=precision).cpu().numpy()

    rss0 = peak_rss_mb()
    times: dict[str, list[float]] = {"ref": [], "fast": [], "alt": []}
    rss: dict[str, float] = {}
    for rep in range(max(1, args.repeats)):
        order = ("fast", "ref") if rep % 2 == 0 else ("ref", "fast")
        for which in order:
            with Timer() as t:
                if which == "fast":
                    p_fast = run_fast(stride)
                else:
                    p_ref = reference_style(net, image, patch, stride, 2)
            times[which].append(t.seconds)
            rss.setdefault(which, peak_rss_mb())
        with Timer() as t:
            p_alt = run_fast(alt)
        times["alt"].append(t.seconds)
    if args.bf16:
        times["bf16"] = []
        for _ in range(max(1, args.repeats)):
            with Timer() as t:
                p_bf16 = run_fast(stride, "bf16")
            times["bf16"].append(t.seconds)
    t_ref, t_fast, t_alt = (min(times[k]) for k in ("ref", "fast", "alt"))
    gflop = window_gflop(net, patch)
    rss_fast, rss_ref = rss["fast"], rss["ref"]

    lab_ref, lab_fast, lab_alt = (p.argmax(0) == 1 for p in (p_ref, p_fast, p_alt))
    rows = [
        {
            "method": "reference-style loop",
            "stride": stride,
            "windows": n_win,
            "seconds": t_ref,
            "all_seconds": times["ref"],
            "speedup": 1.0,
            "dice_vs_reference": 1.0,
            "max_abs_prob_diff": 0.0,
        },
        {
            "method": f"cfrseg sliding_window (batch {args.batch_size})",
            "stride": stride,
            "windows": n_win,
            "seconds": t_fast,
            "all_seconds": times["fast"],
            "speedup": t_ref / t_fast,
            "dice_vs_reference": dice(lab_fast, lab_ref),
            "max_abs_prob_diff": float(np.abs(p_fast - p_ref).max()),
        },
        {
            "method": f"cfrseg sliding_window (batch {args.batch_size})",
            "stride": alt,
            "windows": n_alt,
            "seconds": t_alt,
            "all_seconds": times["alt"],
            "speedup": t_ref / t_alt,
            "dice_vs_reference": dice(lab_alt, lab_ref),
            "max_abs_prob_diff": float(np.abs(p_alt - p_ref).max()),
        },
    ]
    if args.bf16:
        t_bf = min(times["bf16"])
        lab_bf = p_bf16.argmax(0) == 1
        rows.append({"method": f"cfrseg sliding_window (batch {args.batch_size}), bf16 autocast", "stride": stride,
                     "windows": n_win, "seconds": t_bf, "all_seconds": times["bf16"], "speedup": t_ref / t_bf,
                     "dice_vs_reference": dice(lab_bf, lab_ref),
                     "max_abs_prob_diff": float(np.abs(p_bf16 - p_ref).max())})
    for r in rows:
        r["gflop_per_s"] = gflop * r["windows"] / r["seconds"]
    table = [["method", "stride", "windows", "seconds", "s/window", "GFLOP/s", "speed-up", "Dice vs ref",
              "max |dp|"]]
    for r in rows:
        table.append(
            [
                r["method"],
                "/".join(map(str, r["stride"])),
                str(r["windows"]),
                f"{r['seconds']:.1f}",
                f"{r['seconds'] / r['windows']:.2f}",
                f"{r['gflop_per_s']:.0f}",
                f"{r['speedup']:.2f}x",
                f"{r['dice_vs_reference']:.5f}",
                f"{r['max_abs_prob_diff']:.1e}",
            ]
        )
    print(format_rows(table))
    print(f"one window: {gflop:.1f} GFLOP (torch.utils.flop_counter); {torch.get_num_threads()} threads")
    if args.repeats > 1:
        print("all runs (s): " + ", ".join(f"{k} {[round(v, 1) for v in vs]}" for k, vs in times.items()))
    print(
        f"foreground voxels (reference argmax): {int(lab_ref.sum())} of {lab_ref.size}; peak RSS MiB "
        f"(cumulative): start {rss0:.0f}, after first cfrseg run {rss_fast:.0f}, after first reference-style "
        f"run {rss_ref:.0f}"
    )
    path = write_json(
        args.name,
        {
            "case": case,
            "volume_shape": raw.shape,
            "benchmarked_shape": image.shape,
            "patch": patch,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "max_windows": args.max_windows,
            "repeats": args.repeats,
            "rows": rows,
            "gflop_per_window": gflop,
            "threads": torch.get_num_threads(),
            "foreground_voxels_reference": int(lab_ref.sum()),
            "peak_rss_mb": {"start": rss0, "after_cfrseg": rss_fast, "after_reference_style": rss_ref},
            "target": {"speedup": 5.0, "dice": 0.999},
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
