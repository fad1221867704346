"""Quality of CFR on ACDC (4 classes: RV, Myo, LV) on the validation or test split: one JSON record per run.

Splits by patient (bench/acdc_protocol.py): validation = the last 10 patients of splits.json's ``train`` list,
pool = its first 60 patients, the first L labeled (both frames) and the rest unlabeled (labels never read).
Every tuning decision is taken on ``val``. ``--split test`` scores on splits.json's ``val`` list (10 other
patients), which no decision reads: a run trained once is evaluated on each split asked for (as
bench/quality_la.py), and the tables and charts are per split.

Methods as bench/quality_la.py: ``supervised``, an SSL method of the re-train stage (``mt``, ``magicnet``...),
and ``cfr_<ssl>`` (the whole CFR pipeline; it also scores SAM alone, the CFR_FT row). Each (L, method, seed) runs
in its own process (wall time, CPU time and peak RSS are its own); a record is reused only when its whole spec
(profile, resolved settings, overrides, seed, ids, subset, code version, threads: bench/run_records.py) is equal.
The tables give per-class and mean Dice and HD95 **in voxels** (the files carry a nominal 1 mm spacing, so the
metric code's millimetres are voxel steps; one step along z is several in-plane steps in reality), mean over
validation frames, then mean ± std over seeds; wall time and peak RSS of the run. Below each table, the paired
per-frame comparisons CFR_MT - MT and CFR_MagicNet - MagicNet (bench/quality_summary.paired: mean difference,
wins / losses / ties over frames, Wilcoxon p); the chart ``<results>/quality_acdc.png`` shows the Dice bars.

  nice -n 10 .venv/bin/python bench/quality_acdc.py --labeled 3 14 \\
      --methods supervised mt cfr_mt magicnet cfr_magicnet --seeds 0 1 2 --threads 2 [--split val test]
  .venv/bin/python bench/quality_acdc.py --summary-only
  # smoke run (proves the plumbing, numbers mean nothing): 3 pool patients, 1 validation patient
  .venv/bin/python bench/quality_acdc.py --profile tiny --labeled 1 --max-pool 3 --max-val 1 \\
      --results /tmp/qa_smoke
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import acdc_protocol as ap_
from _common import default_data
import quality_la as qla
import quality_summary as qs
from run_records import StaleRecord, canonical, code_tag, code_version, commits_of, load_cached, load_records

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results" / "quality_acdc"
DEFAULT_METHODS = ["supervised", "mt", "cfr_mt", "magicnet", "cfr_magicnet"]
MODEL_ORDER = ("supervised", "MT", "CFR_FT", "CFR_MT", "MAGICNET", "CFR_MAGICNET")
PAIRS = (("CFR_MT", "MT"), ("CFR_MAGICNET", "MAGICNET"))
PL_ONLY = ("retrain.pl_",)        # settings that act only through pseudo-labels, i.e. only in cfr_* runs


def make_spec(args: argparse.Namespace, L: int, method: str, seed: int, code: dict[str, Any],
              ids: list[str], sha: str, split: str = "val", test_ids: list[str] | None = None) -> dict[str, Any]:
    """The spec of one run evaluated on ``split`` (``test_ids``: splits.json's val list, for "test")."""
    if split == "test" and test_ids is None:
        raise ValueError("the test split needs test_ids (acdc_protocol.read_test)")
    r = ap_.roles(ids, L, args.max_pool, args.max_val, test_ids if split == "test" else None)
    return {"bench": "quality_acdc", "profile": args.profile,
            "resolved": qla.resolved_profile(args.profile, args.set, seed), "overrides": list(args.set),
            "seed": seed, "L": L, "ceiling": not r["unlabeled"], "method": method, "split": split,
            "split_ids": r["test"], "labeled_ids": r["labeled"], "unlabeled_ids": r["unlabeled"],
            "subset": {"max_pool": args.max_pool, "max_val": args.max_val}, "data_list_sha256": sha,
            "code": code, "platform": qla.platform_info(), "threads": args.threads}


def _evaluate(spec: dict[str, Any], data: str, store) -> tuple[dict[str, Any], dict[str, Any]]:
    sub = spec["subset"]
    man = ap_.manifest(data, spec["L"], sub["max_pool"], sub["max_val"], split=spec.get("split", "val"))
    if [c.case_id for c in man.labeled] != spec["labeled_ids"]:
        raise RuntimeError("manifest and spec disagree on the labeled frames")
    return qla.evaluate_manifest(spec, man, store)


# ------------------------------------------------------------------------------------------------- tables
def _class_means(cases: dict[str, Any], metric: str, k: int) -> list[float]:
    """Per foreground class: the mean over frames (NaN / None left out; NaN when none)."""
    out = []
    for j in range(k):
        v = [c[metric][j] for c in cases.values() if c[metric][j] is not None and not math.isnan(c[metric][j])]
        out.append(float(np.mean(v)) if v else math.nan)
    return out


def _fmt(v: float, f: str = ".3f") -> str:
    return "n/a" if v is None or math.isnan(v) else format(v, f)


def _pm(vals: list[float], f: str = ".3f") -> str:
    v = [x for x in vals if not math.isnan(x)]
    if not v:
        return "n/a"
    return _fmt(float(np.mean(v)), f) + (f" ± {np.std(v, ddof=1):{f}}" if len(v) > 1 else "")


def _setting(r: dict[str, Any], overrides: list[str] | None = None) -> str:
    s = r["spec"]
    return canonical({"profile": s["profile"], "overrides": s["overrides"] if overrides is None else overrides,
                      "code": code_tag(s["code"]), "subset": s.get("subset"), "split": s.get("split", "val")})


def _no_pl(overrides: list[str]) -> list[str]:
    return [o for o in overrides if not o.startswith(PL_ONLY)]


def group_records(records: list[dict[str, Any]]) -> dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
    """Records by setting, as {setting: (records, borrowed)}. Pseudo-label settings (``retrain.pl_*``) act only
    where pseudo-labels exist, i.e. in ``cfr_*`` runs; so a setting that sets them also shows the runs without
    pseudo-labels (supervised, MT, MagicNet) of the same setting without them, for each (L, method) it has none
    of its own (``borrowed``: same profile, code, subset and every other override)."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[_setting(r)].append(r)
    out = {}
    for key, rs in groups.items():
        over = list(rs[0]["spec"]["overrides"])
        borrowed: list[dict[str, Any]] = []
        if _no_pl(over) != over:
            have = {(r["spec"]["L"], r["spec"]["method"]) for r in rs}
            borrowed = [r for r in groups.get(_setting(rs[0], _no_pl(over)), [])
                        if not r["spec"]["method"].startswith("cfr_")
                        and (r["spec"]["L"], r["spec"]["method"]) not in have]
        out[key] = (rs + borrowed, borrowed)
    return out


def to_markdown(records: list[dict[str, Any]], names: list[str]) -> str:
    """Per (setting, L, model): per-class and mean Dice and HD95 (voxels), mean ± std over seeds; wall time
    and peak RSS of the runs."""
    if not records:
        return "(no ACDC records)\n"
    k = len(names)
    lines: list[str] = []
    order = {m: i for i, m in enumerate(MODEL_ORDER)}
    for _, (rs, borrowed) in sorted(group_records(records).items()):
        s = rs[0]["spec"]
        note = ""
        if borrowed:
            ms = sorted({f"{r['spec']['method']} L={r['spec']['L']}" for r in borrowed})
            note = (f" Rows without pseudo-labels ({', '.join(ms)}) are the runs with overrides "
                    f"`{' '.join(_no_pl(s['overrides'])) or 'none'}`: `retrain.pl_*` acts only on CFR runs.")
        lines += [(f"Split `{s.get('split', 'val')}` ({len(s['split_ids'])} frames); profile `{s['profile']}`, "
                  f"overrides `{' '.join(s['overrides']) or 'none'}`, subset {s.get('subset')}; code {commits_of(rs)} "
                  f"({code_tag(s['code'])}). HD95 in voxels.{note}"), "",
                  "| L | model | seeds | " + " | ".join(f"Dice {n}" for n in names) + " | Dice mean | "
                  + " | ".join(f"HD95 {n}" for n in names) + " | HD95 mean | wall (min) | peak RSS (GB) |",
                  "|" + "---|" * (2 * k + 7)]
        by: dict[tuple[int, str], dict[int, dict[str, Any]]] = defaultdict(dict)
        for r in rs:     # one record per seed: CFR_FT (SAM alone) comes from every cfr_<ssl> run of a seed
            for model in r["models"]:
                by[(r["spec"]["L"], model)].setdefault(r["spec"]["seed"], r)
        for (L, model), per_seed in sorted(by.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 99), kv[0][1])):
            recs = [per_seed[k] for k in sorted(per_seed)]
            dice = [_class_means(r["models"][model], "dice", k) for r in recs]
            hd = [_class_means(r["models"][model], "hd95", k) for r in recs]
            cells = [_pm([d[j] for d in dice]) for j in range(k)] + [_pm([float(np.nanmean(d)) for d in dice])]
            cells += [_pm([h[j] for h in hd], ".2f") for j in range(k)]
            cells += [_pm([float(np.nanmean(h)) if not all(map(math.isnan, h)) else math.nan for h in hd], ".2f")]
            own = model != "CFR_FT"          # SAM alone is a by-product of the CFR run: no time of its own
            wall = [r["timing"].get("pipeline_wall_s", math.nan) / 60 for r in recs]
            rss = max((r["timing"].get("peak_rss_mb") or math.nan) / 1024 for r in recs)
            lines.append(f"| {L} | {model} | {len(recs)} | " + " | ".join(cells)
                         + f" | {_pm(wall, '.1f') if own else ''} | {_fmt(rss, '.2f') if own else ''} |")
        lines += [""] + paired_md(rs)
    return "\n".join(lines)


def paired_md(records: list[dict[str, Any]]) -> list[str]:
    """CFR_<ssl> against <ssl>, per L, frame by frame (bench/quality_summary.paired: each frame's Dice is its
    mean over the foreground classes, averaged over the seeds both models have)."""
    rows = [c for a, b in PAIRS for c in qs.paired(records, a, b)]
    if not rows:
        return []
    out = ["Paired per-frame comparison (Dice, mean over classes per frame):", "",
           "| L | A - B | seeds | frames | mean diff | wins / losses / ties | Wilcoxon p |", "|---|---|---|---|---|---|---|"]
    for c in sorted(rows, key=lambda c: (qs._L_sort(c["L"]), c["a"])):
        out.append(f"| {c['L']} | {c['a']} - {c['b']} | {len(c['seeds'])} | {c['n_cases']} | {c['mean_diff']:+.3f} | "
                   f"{c['wins']} / {c['losses']} / {c['ties']} | {c['wilcoxon_p']:.3g} |")
    return out + [""]


def dice_png(records: list[dict[str, Any]], names: list[str], path: Path,
             prefer: tuple[str, list[str]] | None = None) -> Path | None:
    """Bars of per-class and mean Dice (mean over seeds, error bar = std over seeds when > 1) per L and model,
    for one setting (profile, overrides, code version (the core's tree: run_records.code_tag), subset): the one
    with the most records among those with ``prefer`` = (profile, overrides) when there are such, else among
    all; None when there are no records."""
    if not records:
        return None
    groups = [rs for rs, _ in group_records(records).values()]
    if prefer is not None:
        groups = [g for g in groups if (g[0]["spec"]["profile"], list(g[0]["spec"]["overrides"])) == prefer] or groups
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = max(groups, key=len)
    k = len(names)
    order = {m: i for i, m in enumerate(MODEL_ORDER)}
    Ls = sorted({r["spec"]["L"] for r in rs})
    models = sorted({m for r in rs for m in r["models"]}, key=lambda m: (order.get(m, 99), m))
    fig, axes = plt.subplots(1, k + 1, figsize=(3.2 * (k + 1), 3.4), sharey=True)
    width = 0.8 / max(len(models), 1)
    for col, ax in enumerate(axes):
        for i, model in enumerate(models):
            means, stds = [], []
            for L in Ls:
                vals = [_class_means(r["models"][model], "dice", k) for r in rs
                        if r["spec"]["L"] == L and model in r["models"]]
                v = [float(np.nanmean(d)) if col == k else d[col] for d in vals]
                v = [x for x in v if not math.isnan(x)]
                means.append(float(np.mean(v)) if v else math.nan)
                stds.append(float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
            ax.bar(np.arange(len(Ls)) + i * width, means, width, yerr=stds, label=model)
        ax.set_xticks(np.arange(len(Ls)) + width * (len(models) - 1) / 2, [f"L={L}" for L in Ls])
        ax.set_title("mean over classes" if col == k else names[col])
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("Dice (validation frames)")
    sp = rs[0]["spec"]
    fig.suptitle(f"ACDC, profile {sp['profile']}, overrides {' '.join(sp['overrides']) or 'none'}", fontsize=9)
    axes[-1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def class_names(data: str, records: list[dict[str, Any]]) -> list[str]:
    """Foreground class names from the data's dataset.json; ``class j`` when the folder is not readable."""
    from cfrseg.data.datasets import manifest_from_nnunet
    from cfrseg.errors import CfrsegError

    try:
        names = manifest_from_nnunet(data).class_names
        if names:
            return list(names[1:])
    except (CfrsegError, OSError):
        pass
    first = next(iter(next(iter(records[0]["models"].values())).values())) if records else {"dice": []}
    return [f"class {j + 1}" for j in range(len(first["dice"]))]


# ---------------------------------------------------------------------------------------------- driver
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--data", default=default_data("CFRSEG_ACDC_DIR", "acdc"))
    ap.add_argument("--labeled", nargs="+", type=int, default=[3, 14], help="L: labeled patients")
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    ap.add_argument("--max-pool", type=int, help="smoke runs: only the first N pool patients")
    ap.add_argument("--max-val", type=int, help="smoke runs: only the first N patients of the evaluated split")
    ap.add_argument("--split", nargs="+", default=["val"], choices=list(ap_.SPLITS),
                    help="evaluate on these splits (test: splits.json's val list; decisions use val only)")
    qla.add_run_arguments(ap, DEFAULT_RESULTS)
    args = ap.parse_args(argv)
    if args.one:
        qla.run_one(args.one, evaluate=_evaluate)
        return 0
    results = Path(args.results)
    records_dir = results / "records"
    if not args.summary_only:
        try:
            ids, sha = ap_.read_train(args.data)
            test_ids = ap_.read_test(args.data) if "test" in args.split else None
            for L in args.labeled:
                ap_.roles(ids, L, args.max_pool, args.max_val, test_ids)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for m in args.methods:
            qla.check_method(m)
        code = code_version()
        for L in args.labeled:
            for m in args.methods:
                for seed in args.seeds:
                    specs = [make_spec(args, L, m, seed, code, ids, sha, s, test_ids) for s in args.split]
                    if args.score_trained:
                        specs = [qla.adopt_trained(results, s) for s in specs]
                    tag = f"L={L} {m} seed={seed}"
                    if specs[0]["ceiling"] and m != "supervised":
                        print(f"== {tag}: skipped (no unlabeled patient left)")
                        continue
                    try:
                        todo = [s for s in specs if load_cached(records_dir, s) is None]
                    except StaleRecord as e:
                        print(f"error: {e}", file=sys.stderr)
                        return 2
                    if not todo:
                        print(f"== {tag}: cached")
                        continue
                    print(f"== {tag}: {'would run' if args.plan else 'running'} {[s['split'] for s in todo]}",
                          flush=True)
                    if args.plan:
                        continue
                    rc = qla.run_job(__file__, results, todo, args.data, f"{m}_L{L}_seed{seed}",
                                     reuse_teacher=args.reuse_teacher)
                    if rc != 0:
                        print(f"== {tag}: failed (exit {rc})", file=sys.stderr)
                        return 1
    try:
        recs = [r for r in (load_records(records_dir) if records_dir.is_dir() else [])
                if r["spec"].get("bench") == "quality_acdc"]
    except StaleRecord as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = class_names(args.data, recs)
    print(to_markdown(recs, names))
    for split in args.split:
        png = dice_png([r for r in recs if r["spec"].get("split", "val") == split], names,
                       results / ("quality_acdc.png" if split == "val" else f"quality_acdc_{split}.png"),
                       prefer=(args.profile, list(args.set)))
        if png is not None:
            print(f"chart: {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
