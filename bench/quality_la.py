"""Quality of CFR on the LA 2018 data, `lite` profile (or another), against its baselines.

For each L in --labeled (first L of train.list labeled; the last --holdout cases held out for evaluation; the
rest unlabeled), runs, each in its own process (so peak memory is per run):
  - none : supervised-only 3D network (lower bound)
  - mt   : mean teacher without pseudo-labels
  - cfr  : the CFR pipeline with --ssl (default mt): fine-tune SAM -> pseudo-label -> re-train; this run also
           scores SAM alone (CFR_FT) and the pseudo-labels themselves.
Prints a table of Dice / Jaccard / ASD / HD95 (mean ± std over the held-out cases), wall time and peak RSS, and
writes bench/results/quality_la.json. Runs are resumable: finished ones are read back from --out.

  .venv/bin/python bench/quality_la.py --data ../shared/data/la2018 --labeled 1 4 16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import peak_rss_mb, write_json  # noqa: E402


def _one(args: argparse.Namespace) -> None:
    """Run one configuration in this process and write its result JSON."""
    from cfrseg.config import apply_overrides, load_profile
    from cfrseg.data.datasets import manifest_from_la
    from cfrseg.stages.pipeline import PipelineConfig, _fg, run_pipeline
    from cfrseg.stages.retrain import RetrainConfig, evaluate_model, run_retrain
    from cfrseg.store import LocalStore

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out) / f"L{args.L}_{args.method}"
    data = manifest_from_la(args.data, args.L, holdout=args.holdout)
    prof = apply_overrides(load_profile(args.profile), args.set or [])
    t0 = time.monotonic()
    res: dict = {"L": args.L, "method": args.method, "profile": args.profile}
    if args.method == "cfr":
        cfg = PipelineConfig.from_profile(prof, ssl=args.ssl, resume=True, profile=args.profile)
        rep = run_pipeline(cfg, data, LocalStore(out)).report
        res["CFR_FT"] = _fg(rep["metrics"]["CFR_FT"]["holdout"]["summary"])
        res[f"CFR_{args.ssl.upper()}"] = _fg(rep["metrics"]["final"]["holdout"]["summary"])
        q = rep["pseudolabel"]["quality"]
        res["pseudo_labels"] = _fg(q["summary"]) if q else None
        res["timings_s"] = rep["timings_s"]
    else:
        sec = dict(prof.get("retrain", {}), ssl=args.method, resume=True)
        if "infer" in prof:
            sec["infer"] = dict(prof["infer"], **sec.get("infer", {}))
        cfg = RetrainConfig.from_dict(sec)
        store = LocalStore(out)
        run_retrain(cfg, data, store)
        ev = evaluate_model(store, data)
        res[{"none": "supervised", "mt": "MT"}.get(args.method, args.method)] = _fg(ev["summary"])
    import torch

    res["wall_s"] = round(time.monotonic() - t0, 1)
    res["threads"] = torch.get_num_threads()
    res["overrides"] = list(args.set or [])
    res["peak_rss_mb"] = round(peak_rss_mb(), 1)
    (out / "bench_result.json").write_text(json.dumps(res, indent=2, default=str))


def _fmt(r: dict | None) -> str:
    if not r:
        return "n/a"
    return " | ".join(f"{r[m]['mean']:.4f} ± {r[m]['std']:.4f}" if r[m]["mean"] == r[m]["mean"] else "nan"
                      for m in ("dice", "jaccard", "asd", "hd95"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("CFRSEG_LA_DIR", "../shared/data/la2018"))
    ap.add_argument("--labeled", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--methods", nargs="+", default=["none", "mt", "cfr"], choices=["none", "mt", "cfr"])
    ap.add_argument("--ssl", default="mt", help="SSL method of the CFR re-train stage")
    ap.add_argument("--holdout", type=int, default=16)
    ap.add_argument("--profile", default="lite")
    ap.add_argument("--set", action="append", help="profile override stage.key=JSON (all runs)")
    ap.add_argument("--out", default="bench/results/quality_la")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (default: torch's choice)")
    ap.add_argument("--one", nargs=2, metavar=("L", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        args.L, args.method = int(args.one[0]), args.one[1]
        _one(args)
        return
    rows = []
    for L in args.labeled:
        for m in args.methods:
            f = Path(args.out) / f"L{L}_{m}" / "bench_result.json"
            if not f.is_file():
                cmd = [sys.executable, __file__, "--one", str(L), m, "--data", args.data, "--holdout",
                       str(args.holdout), "--profile", args.profile, "--out", args.out, "--ssl", args.ssl,
                       "--threads", str(args.threads)]
                for s in args.set or []:
                    cmd += ["--set", s]
                print(f"== L={L} {m}: {' '.join(cmd[2:])}", flush=True)
                subprocess.run(cmd, check=True)
            rows.append(json.loads(f.read_text()))
    print("\n| L | model | Dice | Jaccard | ASD (mm) | HD95 (mm) | wall (s) | peak RSS (MB) | threads |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        models = [k for k in r if k in ("supervised", "MT", "CFR_FT", "pseudo_labels") or k.startswith("CFR_")]
        for k in models:
            print(f"| {r['L']} | {k} | {_fmt(r[k])} | {r['wall_s']} | {r['peak_rss_mb']} | {r.get('threads', '?')} |")
    p = write_json("quality_la", {"profile": args.profile, "holdout": args.holdout, "runs": rows})
    print(f"\nwrote {p}")


if __name__ == "__main__":
    main()
