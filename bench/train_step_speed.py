"""Time per training step, fp32 against bf16 autocast: the 3D re-train step and the SAM side of lite.

Rows (each timed in fp32 and in bf16, alternating which goes first from one repeat to the next):
  - ``vnet_step``: one real re-training step (``cfrseg.stages.retrain._train_step``: student forward of
    labeled + unlabeled crops, the SSL method's loss with its EMA-teacher forward, backward, SGD, EMA) at lite
    settings: V-Net ``--n-filters`` 8, patch 64x64x48, batch 2+2, ``--ssl`` mt. Random crops of the right shape
    (speed does not depend on the values).
  - with ``--sam``: ``sam_encode`` (LiteMedSAM encoder forward of 4 mosaics at 256 px, inference mode: the
    embedding cache and pseudo-labelling), ``sam_decoder_step`` (decoder forward + backward + AdamW on 4 cached
    embeddings: the lite fine-tune step). Random weights: the same compute as the real ones.

Each timed block runs ``--steps`` steps after ``--warmup`` untimed ones (oneDNN builds its kernels on first use);
a repeat times both precisions; the best and the median over ``--repeats`` of the per-step time are reported.

    .venv/bin/python bench/train_step_speed.py [--threads 2] [--repeats 5] [--steps 3] [--sam]

Prints a table and writes bench/results/train_step_speed.json (``--name``). The CPU's bf16 support
(``cfrseg.stages.precision.cpu_bf16_native``) is recorded: without AVX512-BF16/AMX, bf16 is emulated and slow.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import format_rows, peak_rss_mb, write_json


def vnet_step_fn(args: argparse.Namespace, precision: str, device: str) -> Callable[[], None]:
    """A closure running one real re-training step at ``precision`` (fresh student/teacher per precision)."""
    import copy

    import torch

    from cfrseg.models.registry import build_network
    from cfrseg.ssl.methods import build_method
    from cfrseg.stages.retrain import RetrainConfig, _train_step, make_teacher_fn

    patch = tuple(args.patch)
    cfg = RetrainConfig(network="vnet", network_kwargs={"n_filters": args.n_filters, "has_dropout": True},
                        ssl=args.ssl, iterations=1000, patch=patch, lr_schedule="poly", device=device,
                        precision=precision, batch_labeled=args.batch[0], batch_unlabeled=args.batch[1],
                        uamt_T=4)
    dev = torch.device(device)
    torch.manual_seed(0)
    student = build_network("vnet", 1, 2, **cfg.network_kwargs).to(dev)
    if dev.type == "cpu":
        student = student.to(memory_format=torch.channels_last_3d)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    method = build_method(cfg.ssl, cfg.ssl_params(2))
    g = torch.Generator().manual_seed(1)
    nl, nu = args.batch
    batch = {"image_l": torch.randn(nl, 1, *patch, generator=g).to(dev),
             "label_l": torch.randint(0, 2, (nl, *patch), generator=g).to(dev)}
    if nu:
        batch["image_u"] = torch.randn(nu, 1, *patch, generator=g).to(dev)

    class _Fixed:
        def next(self):
            return batch

    state = {"step": 0}
    teacher_fn = make_teacher_fn(teacher, cfg)

    def step() -> None:
        _train_step(cfg, method, student, teacher, teacher_fn, opt, _Fixed(), state["step"])  # type: ignore[arg-type]
        state["step"] += 1
        if dev.type == "cuda":
            torch.cuda.synchronize()

    return step


def sam_fns(precision: str, device: str) -> dict[str, Callable[[], None]]:
    """Closures for the LiteMedSAM encoder forward (4 mosaics) and a decoder training step (4 embeddings)."""
    import torch
    import torch.nn.functional as F

    from cfrseg.sam.lora import trainable_parameters
    from cfrseg.sam.model import build_sam
    from cfrseg.stages.precision import autocast

    dev = torch.device(device)
    torch.manual_seed(0)
    m = build_sam("lite_medsam", 2, pretrained=False, head_init="negated").to(dev)
    trainable_parameters(m)
    x = torch.rand(4, 3, 256, 256, device=dev)
    with torch.inference_mode():
        emb = m.embed(x[:1]).float()
    emb = emb.expand(4, -1, -1, -1).clone()
    y = torch.randint(0, 2, (4, 256, 256), device=dev)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def encode() -> None:
        m.eval()
        with torch.inference_mode(), autocast(dev, precision):
            m.embed(x)
        sync()

    def decoder_step() -> None:
        m.train()
        with autocast(dev, precision):
            low = m.decode(emb)
        logits = F.interpolate(low.float(), size=(256, 256), mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()

    return {"sam_encode": encode, "sam_decoder_step": decoder_step}


def time_rows(fns: dict[str, dict[str, Callable[[], None]]], repeats: int, steps: int,
              warmup: int) -> dict[str, dict[str, list[float]]]:
    """``fns[row][precision]`` -> per-step seconds of each repeat, precisions alternating their order."""
    out: dict[str, dict[str, list[float]]] = {row: {p: [] for p in by} for row, by in fns.items()}
    for row, by in fns.items():
        for p, fn in by.items():
            for _ in range(warmup):
                fn()
        precs = list(by)
        for r in range(repeats):
            for p in (precs if r % 2 == 0 else precs[::-1]):
                t = time.perf_counter()
                for _ in range(steps):
                    by[p]()
                out[row][p].append((time.perf_counter() - t) / steps)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="steps per timed block")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--n-filters", type=int, default=8)
    ap.add_argument("--patch", type=int, nargs=3, default=[64, 64, 48])
    ap.add_argument("--batch", type=int, nargs=2, default=[2, 2], metavar=("LABELED", "UNLABELED"))
    ap.add_argument("--ssl", default="mt")
    ap.add_argument("--sam", action="store_true", help="also time the LiteMedSAM encoder and decoder step")
    ap.add_argument("--no-vnet", action="store_true", help="skip the V-Net row")
    ap.add_argument("--name", default="train_step_speed")
    args = ap.parse_args(argv)

    import torch

    from cfrseg.stages.precision import bf16_native

    torch.set_num_threads(args.threads)
    precs = ("fp32", "bf16")
    fns: dict[str, dict[str, Callable[[], None]]] = {}
    if not args.no_vnet:
        fns["vnet_step"] = {p: vnet_step_fn(args, p, args.device) for p in precs}
    if args.sam:
        sam = {p: sam_fns(p, args.device) for p in precs}
        for row in sam["fp32"]:
            fns[row] = {p: sam[p][row] for p in precs}
    native = bf16_native(args.device)
    print(f"device {args.device}, {torch.get_num_threads()} threads, bf16 native: {native}; "
          f"{args.repeats} repeats x {args.steps} steps", flush=True)
    times = time_rows(fns, args.repeats, args.steps, args.warmup)
    rows = []
    table = [["row", "fp32 best s", "fp32 median s", "bf16 best s", "bf16 median s", "fp32/bf16 (best)",
              "fp32/bf16 (median)"]]
    for row, by in times.items():
        r = {"row": row}
        for p in precs:
            r[p] = {"best_s": min(by[p]), "median_s": statistics.median(by[p]), "all_s": by[p]}
        r["speedup_best"] = r["fp32"]["best_s"] / r["bf16"]["best_s"]
        r["speedup_median"] = r["fp32"]["median_s"] / r["bf16"]["median_s"]
        rows.append(r)
        table.append([row, f"{r['fp32']['best_s']:.3f}", f"{r['fp32']['median_s']:.3f}", f"{r['bf16']['best_s']:.3f}",
                      f"{r['bf16']['median_s']:.3f}", f"{r['speedup_best']:.2f}x", f"{r['speedup_median']:.2f}x"])
    print(format_rows(table))
    cpu_flags = {}
    if hasattr(torch, "cpu") and hasattr(torch.cpu, "get_capabilities"):
        caps = torch.cpu.get_capabilities()
        cpu_flags = {k: caps.get(k) for k in ("avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni", "cpu_name")}
    path = write_json(args.name, {"bench": "train_step_speed", "args": vars(args), "bf16_native": native,
                                  "cpu_flags": cpu_flags, "rows": rows, "peak_rss_mb": peak_rss_mb()})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
