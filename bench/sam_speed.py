"""LiteMedSAM speed on this machine: forward and forward+backward time and peak RSS at 256x256, batch 1 and 2.

The model is the fine-tune configuration: CfrSam (2 classes) + LoRA r=4 on q/v, trainable set as in
fine-tuning. "forward" runs under torch.inference_mode; "forward+backward" does a training forward, a
cross-entropy loss and backward. Each (batch, mode) runs in its own subprocess so that its peak RSS
(ru_maxrss) is its own. Median of --repeats timed runs after one warm-up.

    .venv/bin/python bench/sam_speed.py [--threads 2] [--repeats 3] [--device cpu]
Writes bench/results/sam_speed.json.

``--cached-steps`` measures instead what a fine-tune step on cached activations costs (lite trains on an
embedding cache, batch 4) as the trainable part grows into the encoder: the decoder alone (lite today, from
cached embeddings), the neck + decoder, and the last encoder stage + neck + decoder (from cached stage inputs).
Forward + backward + AdamW step, CfrSam K=2 without LoRA. Writes bench/results/sam_cached_steps.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "sam_speed.json"
OUT_CACHED = Path(__file__).resolve().parent / "results" / "sam_cached_steps.json"
CACHED_TAILS = {"decoder": "none", "neck+decoder": "neck", "last_stage+neck+decoder": "last_stage"}
CACHED_PARTS = tuple(CACHED_TAILS)


def _timed(step, repeats: int) -> list[float]:
    """Seconds of ``repeats`` calls of ``step`` after one untimed warm-up call."""
    step()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return times


def one(batch: int, mode: str, threads: int, repeats: int, device: str) -> dict:
    import torch
    import torch.nn.functional as F

    from cfrseg.sam.lora import inject_lora, trainable_parameters
    from cfrseg.sam.model import build_sam

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    m = inject_lora(build_sam("lite_medsam", 2), rank=4).to(dev)
    trainable_parameters(m)
    x = torch.rand(batch, 3, 256, 256, device=dev)
    y = torch.randint(0, 2, (batch, 256, 256), device=dev)

    def step() -> None:
        if mode == "forward":
            m.eval()
            with torch.inference_mode():
                m(x)
        else:
            m.train()
            loss = F.cross_entropy(m(x), y)
            loss.backward()
            m.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    times = _timed(step, repeats)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"batch": batch, "mode": mode, "median_s": round(statistics.median(times), 3),
            "min_s": round(min(times), 3), "times_s": [round(t, 3) for t in times],
            "peak_rss_mb": round(rss_mb, 1)}


def cached_step(part: str, batch: int, threads: int, repeats: int) -> dict:
    """Median time of one training step whose input is cached at the start of ``part`` (see the docstring)."""
    import torch
    import torch.nn.functional as F

    from cfrseg.sam.tail import apply_tail, encode_head
    from cfrseg.stages.finetune import build_model, resolve_base_checkpoint, train_mode

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tail = CACHED_TAILS[part]
    path, _ = resolve_base_checkpoint("lite_medsam", None, None)
    m = build_model("lite_medsam", 2, path, 256, lora_rank=0, lora_alpha=4.0, lora_dropout=0.0, encoder_tail=tail)
    x = torch.rand(batch, 3, 256, 256)
    with torch.inference_mode():              # the cached input of the trainable part (as the fine-tune caches it)
        head = encode_head(m, x, tail)
    cached = head.clone()                     # a normal tensor: autograd may save it
    y = torch.randint(0, 2, (batch, 256, 256))
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    train_mode(m)

    def step() -> None:
        logits = F.interpolate(m.decode(apply_tail(m, cached, tail)), size=(256, 256), mode="bilinear",
                               align_corners=False)
        F.cross_entropy(logits, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = _timed(step, repeats)
    return {"part": part, "batch": batch, "cached_shape": list(cached.shape[1:]),
            "trainable_params": sum(p.numel() for p in m.parameters() if p.requires_grad),
            "median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
            "times_s": [round(t, 3) for t in times],
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main_cached(a: argparse.Namespace) -> int:
    load_start = [round(v, 2) for v in os.getloadavg()]
    rows = []
    for part in CACHED_PARTS:
        r = subprocess.run([sys.executable, __file__, "--one-cached", part, "--threads", str(a.threads),
                            "--repeats", str(a.repeats)], capture_output=True, text=True, check=True)
        row = json.loads(r.stdout.strip().splitlines()[-1])
        row["vs_decoder"] = round(row["median_s"] / rows[0]["median_s"], 2) if rows else 1.0
        rows.append(row)
        print(f"cached step, batch 4, trains {part:24s} median {row['median_s']:.3f} s ({row['vs_decoder']:.2f}x)"
              f"  trainable {row['trainable_params'] / 1e6:.2f} M  peak RSS {row['peak_rss_mb']:.0f} MB",
              flush=True)
    import torch

    res = {"model": "lite_medsam (CfrSam K=2, no LoRA)", "image_size": 256, "batch": 4, "threads": a.threads,
           "repeats": a.repeats, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count(), "loadavg_at_start": load_start,
           "loadavg_at_end": [round(v, 2) for v in os.getloadavg()], "results": rows}
    OUT_CACHED.parent.mkdir(parents=True, exist_ok=True)
    OUT_CACHED.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {OUT_CACHED}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cached-steps", action="store_true",
                    help="time fine-tune steps on cached activations (decoder / neck / last stage trainable)")
    ap.add_argument("--one", nargs=2, metavar=("BATCH", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("--one-cached", choices=CACHED_PARTS, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one_cached:
        print(json.dumps(cached_step(a.one_cached, 4, a.threads, a.repeats)))
        return 0
    if a.cached_steps:
        return main_cached(a)
    if a.one:
        print(json.dumps(one(int(a.one[0]), a.one[1], a.threads, a.repeats, a.device)))
        return 0
    load_start = [round(v, 2) for v in os.getloadavg()]
    rows = []
    for batch in (1, 2):
        for mode in ("forward", "forward+backward"):
            r = subprocess.run([sys.executable, __file__, "--one", str(batch), mode, "--threads", str(a.threads),
                                "--repeats", str(a.repeats), "--device", a.device],
                               capture_output=True, text=True, check=True)
            row = json.loads(r.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"lite_medsam 256x256 batch {batch} {mode:17s} median {row['median_s']:.3f} s "
                  f"(min {row['min_s']:.3f})  peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
    import torch

    res = {"model": "lite_medsam (CfrSam K=2 + LoRA r=4)", "image_size": 256, "device": a.device,
           "threads": a.threads, "repeats": a.repeats, "torch": torch.__version__,
           "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "loadavg_at_start": load_start, "loadavg_at_end": [round(v, 2) for v in os.getloadavg()], "results": rows}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
