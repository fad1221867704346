"""Re-training on LA with lite-like settings: compares SSL methods (default none, mt, acmt) on a held-out split.

Split (cfrseg.data.datasets.manifest_from_la): the first ``--labeled`` ids of train.list are labeled (default 4), the last
``--holdout`` are test cases (default 16), the rest unlabeled. Each method runs in its own subprocess (so peak
RSS is per run) with the same seed: run_retrain, then evaluate_model on the test cases (full resolution, mm).

    .venv/bin/python bench/retrain_la.py [--data DIR] [--iterations N] [--methods none,mt,acmt]
        [--labeled 4] [--holdout 16] [--n-filters 8] [--zoom 0.5] [--patch 64 64 48]
        [--pseudo-labels DIR] [--threads 2] [--out bench/results/retrain_la.json]

Prints Dice / Jaccard / ASD / HD95 (mean over test cases), wall time, s/iteration and peak RSS per run, and
writes the JSON (one entry per method, with the per-case metrics). Run stores go to --work (default a temp dir).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import default_data, format_rows, peak_rss_mb, write_json

DEFAULT_ITERATIONS = 1200


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=default_data("CFRSEG_LA_DIR", "la2018"))
    ap.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS)
    ap.add_argument("--methods", default="none,mt,acmt")
    ap.add_argument("--labeled", type=int, default=4)
    ap.add_argument("--holdout", type=int, default=16)
    ap.add_argument("--n-filters", type=int, default=8)
    ap.add_argument("--zoom", type=float, default=0.5)
    ap.add_argument("--patch", type=int, nargs=3, default=[64, 64, 48])
    ap.add_argument("--batch", type=int, nargs=2, default=[2, 2], metavar=("LABELED", "UNLABELED"))
    ap.add_argument("--pseudo-labels", help="folder of <case_id>.nii.gz SAM pseudo-labels for the unlabeled cases")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--work", help="folder for the run stores (default: a temporary folder, removed)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "retrain_la.json"))
    ap.add_argument("--one", help=argparse.SUPPRESS)          # internal: run a single method in this process
    ap.add_argument("--one-json", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def retrain_config(a: argparse.Namespace, ssl: str):
    from cfrseg.stages.retrain import RetrainConfig

    patch = tuple(a.patch)
    return RetrainConfig(
        network="vnet", network_kwargs={"n_filters": a.n_filters, "has_dropout": True}, ssl=ssl,
        iterations=a.iterations, batch_labeled=a.batch[0], batch_unlabeled=a.batch[1], patch=patch,
        zoom=(a.zoom,) * 3, lr_schedule="poly", consistency_rampup=1.0, seed=a.seed, device="cpu",
        checkpoint_interval_s=300.0, resume=True,
        infer={"patch": patch, "stride": tuple(p // 2 for p in patch), "batch_size": 2})


def manifest(a: argparse.Namespace):
    from cfrseg.data.datasets import manifest_from_la

    m = manifest_from_la(a.data, a.labeled, holdout=a.holdout)
    if a.pseudo_labels:
        found = {c.case_id: str(Path(a.pseudo_labels) / f"{c.case_id}.nii.gz") for c in m.unlabeled}
        missing = [k for k, v in found.items() if not Path(v).is_file()]
        if missing:
            sys.exit(f"--pseudo-labels {a.pseudo_labels}: missing {missing[:5]}")
        m = m.with_pseudo_labels(found)
    return m


def run_one(a: argparse.Namespace) -> None:
    """Child process: train one method, evaluate it, write a JSON result."""
    import torch

    from cfrseg.stages.retrain import evaluate_model, run_retrain
    from cfrseg.store import LocalStore

    torch.set_num_threads(a.threads)
    m = manifest(a)
    cfg = retrain_config(a, a.one)
    store_dir = Path(a.work) / a.one
    t0 = time.perf_counter()
    res = run_retrain(cfg, m, LocalStore(store_dir))
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    ev = evaluate_model(store_dir, m)
    eval_s = time.perf_counter() - t1
    means = {k: v["class_mean"] for k, v in ev["summary"]["metrics"].items()}
    out = {"method": a.one, "config": cfg.to_dict(), "iterations": res.iterations, "train_wall_s": res.wall_s,
           "this_session_s": train_s, "s_per_iteration": res.wall_s / max(res.iterations, 1),
           "eval_wall_s": eval_s, "peak_rss_mb": peak_rss_mb(), "final_losses": res.final_losses,
           "metrics": means, "summary": ev["summary"], "cases": ev["cases"],
           "n_labeled": len(m.labeled), "n_unlabeled": len(m.unlabeled), "n_test": len(m.test),
           "pseudo_labels": bool(a.pseudo_labels)}
    Path(a.one_json).write_text(json.dumps(out, default=str))


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    if a.one:
        run_one(a)
        return 0
    methods = [s.strip() for s in a.methods.split(",") if s.strip()]
    tmp = None
    if a.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="retrain_la-")
        a.work = tmp.name
    m = manifest(a)
    print(f"LA split: {len(m.labeled)} labeled, {len(m.unlabeled)} unlabeled, {len(m.test)} test; "
          f"{a.iterations} iterations, V-Net n_filters {a.n_filters}, zoom {a.zoom}, patch {a.patch}", flush=True)
    results = []
    for ssl in methods:
        j = Path(a.work) / f"{ssl}.json"
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--work", a.work,
               "--one", ssl, "--one-json", str(j)]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, check=False)
        if r.returncode != 0:
            print(f"[{ssl}] failed with exit code {r.returncode}", flush=True)
            results.append({"method": ssl, "error": f"exit code {r.returncode}"})
            continue
        res = json.loads(j.read_text())
        res["process_wall_s"] = time.perf_counter() - t0
        results.append(res)
        mt = res["metrics"]
        print(f"[{ssl}] dice {mt['dice']:.4f} jaccard {mt['jaccard']:.4f} asd {mt['asd']:.2f} "
              f"hd95 {mt['hd95']:.2f} | train {res['train_wall_s']:.0f}s ({res['s_per_iteration']:.2f} s/it) "
              f"eval {res['eval_wall_s']:.0f}s | peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)
    rows = [["method", "Dice", "Jaccard", "ASD mm", "HD95 mm", "train s", "s/it", "peak RSS MB"]]
    for r in results:
        if "error" in r:
            rows.append([r["method"], r["error"], "", "", "", "", "", ""])
            continue
        mt = r["metrics"]
        rows.append([r["method"], f"{mt['dice']:.4f}", f"{mt['jaccard']:.4f}", f"{mt['asd']:.2f}",
                     f"{mt['hd95']:.2f}", f"{r['train_wall_s']:.0f}", f"{r['s_per_iteration']:.2f}",
                     f"{r['peak_rss_mb']:.0f}"])
    print(format_rows(rows))
    out = Path(a.out)
    path = write_json(out.stem, {"bench": "retrain_la", "args": {k: v for k, v in vars(a).items()
                                                                  if not k.startswith("one")},
                                 "results": results}, out.parent)
    print(f"wrote {path}")
    if tmp is not None:
        tmp.cleanup()
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
