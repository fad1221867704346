"""Peak memory of sliding-window inference and SAM pseudo-labelling for K = 14 classes on a CT-sized synthetic
volume (512 x 512 x 150), streamed (cfrseg.accumulate, what cfrseg runs) against the whole-volume path (the
former implementation: a (K, X, Y, Z) float32 map in the model grid, resampled to a second one in the source
grid, then argmax).

Every measurement runs in its own fresh subprocess; the peak is the growth of the resident set while the call
runs (Linux: the high-water mark is reset with /proc/self/clear_refs and read from VmHWM), so the input volume
itself is not counted, the single-channel copies the call makes (normalised image, label map) are.

Scenarios (weights random: memory and the averaging do not depend on them):
- ``infer_lite``: the lite profile's V-Net (n_filters 8) at zoom 0.5, patch 64x64x48, stride 32/32/24;
- ``infer_full``: no zoom, patch 96^3, stride 48 (the paper's BTCV patch), a 1x1x1 convolution as network so
  that the accumulation, not the activations, dominates;
- ``pseudolabel_lite``: the lite mosaic (256 px, 62x62x16 windows, zoom 0.33/0.33/0.5, tile pad 1) with a
  1x1 convolution standing in for SAM (LiteMedSAM's own memory does not depend on K).

    .venv/bin/python bench/infer_memory.py [--classes 14] [--shape 512 512 150] [--only infer_lite ...]

Results: a table on stdout and bench/results/infer_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from _common import format_rows, write_json

SCENARIOS = ("infer_lite", "infer_full", "pseudolabel_lite")
MODES = ("streamed", "whole")

_CHILD = textwrap.dedent('''
    import json, sys, time
    import numpy as np, torch
    from torch import nn
    torch.set_num_threads(int(sys.argv[5]))
    from cfrseg.data.volume import Volume
    from cfrseg.models import build_network
    from cfrseg.sam.mosaic import MosaicSpec
    from cfrseg.accumulate import ArgmaxSink
    from cfrseg.stages.infer import InferConfig, resize, segment_volume, sliding_window, zoomed_shape, zscore
    from cfrseg.stages.pseudolabel import predict_volume, probs_to_label, stream_volume

    scenario, mode, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
    shape = tuple(int(v) for v in sys.argv[4].split("x"))

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    class Conv(nn.Module):
        def __init__(self, dims):
            super().__init__()
            self.num_classes = k
            self.conv = (nn.Conv3d if dims == 3 else nn.Conv2d)(1 if dims == 3 else 3, k, 1)
        def forward(self, x):
            return self.conv(x)

    torch.manual_seed(0)
    arr = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    if scenario.startswith("infer"):
        if scenario == "infer_lite":
            net = build_network("vnet", 1, k, n_filters=8).eval()
            cfg = InferConfig(patch=(64, 64, 48), stride=(32, 32, 24), batch_size=2, device="cpu")
            pre = {"zoom": (0.5, 0.5, 0.5), "normalize": "zscore"}
        else:
            net = Conv(3).eval()
            cfg = InferConfig(patch=(96, 96, 96), stride=(48, 48, 48), batch_size=2, device="cpu")
            pre = {"zoom": None, "normalize": "zscore"}

        def run(a):
            if mode == "streamed":
                return segment_volume(net, Volume(a), cfg, pre).array
            img = resize(torch.from_numpy(zscore(a))[None], zoomed_shape(a.shape, pre["zoom"]))
            probs = sliding_window(net, img, cfg.patch, cfg.stride, k, cfg.batch_size)   # (K, model grid)
            return resize(probs, a.shape).argmax(0).numpy().astype(np.uint8)           # (K, source grid)
    else:
        spec = MosaicSpec(image_size=256, crop=(62, 62, 16), grid=0, tile_pad=1, zoom=(0.33, 0.33, 0.5))
        sam = Conv(2).eval()

        def run(a):
            if mode == "streamed":
                sink = ArgmaxSink(a.shape, k, 2, confidence=True)
                stream_volume(sam, spec, a, k, sink, batch_size=2)
                return sink.labels
            return probs_to_label(predict_volume(sam, spec, a, k, batch_size=2))[0]

    run(np.zeros((70, 70, 40), np.float32))       # warm-up: kernels, allocator
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status("VmRSS")
    t0 = time.perf_counter()
    lab = run(arr)
    out = {"peak_bytes": status("VmHWM") - base, "seconds": time.perf_counter() - t0,
           "labels_present": int(len(np.unique(lab)))}
    print(json.dumps(out))
''')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", type=int, default=14)
    ap.add_argument("--shape", type=int, nargs=3, default=(512, 512, 150))
    ap.add_argument("--only", nargs="*", choices=SCENARIOS, default=list(SCENARIOS))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    shape = "x".join(str(v) for v in args.shape)
    voxels = args.shape[0] * args.shape[1] * args.shape[2]
    kv4 = 4 * args.classes * voxels
    script = Path(os.environ.get("TMPDIR", "/tmp")) / f"cfrseg_infer_memory_{os.getpid()}.py"
    script.write_text(_CHILD)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")   # freed large blocks go back at once
    results: dict = {}
    rows = [["scenario", "path", "peak growth (MiB)", "x (K x volume x 4 B)", "seconds"]]
    try:
        for sc in args.only:
            for mode in MODES:
                p = subprocess.run([sys.executable, str(script), sc, mode, str(args.classes), shape, str(args.threads)],
                                   capture_output=True, text=True, env=env, check=False)
                if p.returncode != 0:
                    raise SystemExit(f"{sc}/{mode} failed:\n{p.stderr[-3000:]}")
                r = json.loads(p.stdout.strip().splitlines()[-1])
                results.setdefault(sc, {})[mode] = r
                rows.append([sc, mode, f"{r['peak_bytes'] / 2**20:.0f}", f"{r['peak_bytes'] / kv4:.2f}",
                             f"{r['seconds']:.1f}"])
                print(rows[-1], flush=True)
    finally:
        script.unlink(missing_ok=True)
    print(f"K = {args.classes}, volume {shape} ({voxels / 1e6:.1f} M voxels); K x volume x 4 B = "
          f"{kv4 / 2**20:.0f} MiB")
    print(format_rows(rows))
    path = write_json("infer_memory", {"classes": args.classes, "shape": list(args.shape), "voxels": voxels,
                                       "k_volume_float32_bytes": kv4, "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
