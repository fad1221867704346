"""bf16 against fp32 sliding-window inference with a TRAINED model on the protocol's validation cases.

For each case of the split (bench/protocol.py; default ``val``) the model's whole-volume segmentation
(``cfrseg.stages.infer.segment_volume``: z-score, zoom, sliding window, back to full resolution) is made in
fp32 and in bf16; reported per case and in all: Dice between the two label maps, the largest probability
difference, the fraction of voxels whose fp32 foreground probability is within 0.1 of 0.5 (where rounding can
flip a label), the Dice of each against the ground truth, and the time of each (alternating which goes first).

    .venv/bin/python bench/bf16_agreement.py --model RUN_STORE/retrain [--split val] [--threads 2]

Prints a table and writes bench/results/bf16_agreement.json (``--name``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol
from _common import default_data, format_rows, write_json


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="folder holding model.pt (a run's retrain store) or the file")
    ap.add_argument("--data", default=default_data("CFRSEG_LA_DIR", "la2018"))
    ap.add_argument("--split", default="val", choices=list(protocol.EVAL_SPLITS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="bf16_agreement")
    args = ap.parse_args(argv)

    import torch

    from cfrseg.data.datasets import load_case
    from cfrseg.stages.infer import InferConfig, load_model, predict_probabilities
    from cfrseg.stages.precision import bf16_native

    torch.set_num_threads(args.threads)
    net, meta = load_model(args.model, device="cpu")
    man = protocol.manifest(args.data, 1, [args.split])
    rows, per_case = [], {}
    times = {"fp32": [], "bf16": []}
    for i, case in enumerate(man.test):
        image, gt = load_case(case, man, check_pseudo=False)
        probs = {}
        for p in (("fp32", "bf16") if i % 2 == 0 else ("bf16", "fp32")):
            icfg = InferConfig.from_dict({**meta["infer"], "device": "cpu", "precision": p})
            t = time.perf_counter()
            probs[p] = predict_probabilities(net, image, icfg, meta["preprocess"], 2).cpu().numpy()
            times[p].append(time.perf_counter() - t)
        lab = {p: v.argmax(0) == 1 for p, v in probs.items()}
        fg = probs["fp32"][1]
        truth = gt.array == 1
        r = {"dice_bf16_vs_fp32": dice(lab["bf16"], lab["fp32"]),
             "max_prob_diff": float(np.abs(probs["bf16"] - probs["fp32"]).max()),
             "near_half_fraction": float((np.abs(fg - 0.5) < 0.1).mean()),
             "voxels_flipped": int((lab["bf16"] != lab["fp32"]).sum()),
             "dice_gt_fp32": dice(lab["fp32"], truth), "dice_gt_bf16": dice(lab["bf16"], truth),
             "seconds_fp32": times["fp32"][-1], "seconds_bf16": times["bf16"][-1]}
        per_case[case.case_id] = r
        print(f"{case.case_id}: agreement {r['dice_bf16_vs_fp32']:.5f}, flipped {r['voxels_flipped']}, "
              f"GT Dice fp32 {r['dice_gt_fp32']:.4f} bf16 {r['dice_gt_bf16']:.4f}", flush=True)
    agree = [r["dice_bf16_vs_fp32"] for r in per_case.values()]
    summary = {"cases": len(agree), "agreement_mean": float(np.mean(agree)), "agreement_min": float(np.min(agree)),
               "dice_gt_fp32": float(np.mean([r["dice_gt_fp32"] for r in per_case.values()])),
               "dice_gt_bf16": float(np.mean([r["dice_gt_bf16"] for r in per_case.values()])),
               "seconds_fp32": float(np.sum(times["fp32"])), "seconds_bf16": float(np.sum(times["bf16"])),
               "bf16_native": bf16_native("cpu"), "threads": torch.get_num_threads()}
    rows.append(["cases", "agreement mean", "agreement min", "GT Dice fp32", "GT Dice bf16", "fp32 s", "bf16 s"])
    rows.append([str(summary["cases"]), f"{summary['agreement_mean']:.5f}", f"{summary['agreement_min']:.5f}",
                 f"{summary['dice_gt_fp32']:.4f}", f"{summary['dice_gt_bf16']:.4f}",
                 f"{summary['seconds_fp32']:.1f}", f"{summary['seconds_bf16']:.1f}"])
    print(format_rows(rows))
    path = write_json(args.name, {"bench": "bf16_agreement", "model": str(args.model), "split": args.split,
                                  "infer": meta["infer"], "preprocess": meta["preprocess"], "summary": summary,
                                  "per_case": per_case})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
