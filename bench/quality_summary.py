"""Markdown results tables from quality run records (bench/run_records.py): mean ± std over seeds and a paired
per-case comparison of two models (default CFR_MT against MT). docs/results.md tables are made with this.

    .venv/bin/python bench/quality_summary.py --split test [--results bench/results/quality_la] [--out FILE]

Maths (docs/protocol.md): for each record (one seed) a model's figure is the mean over the split's cases
(foreground classes averaged per case; NaN distances left out). The table gives the mean ± sample std (ddof 1)
of those per-seed figures, with the number of seeds. The paired comparison takes the seeds both models have;
per case it averages each model's Dice over those seeds, then reports the mean per-case difference A - B,
wins / losses / ties over cases, the two-sided Wilcoxon signed-rank p-value over cases (scipy), and the
per-seed differences of the means. Records are grouped by setting (profile, overrides, code version: the core's
source tree, run_records.code_tag, so commits that changed only benchmarks, tests or docs share a table): one
table per setting, never averaged across settings. ``--png`` also draws the largest setting's figures: Dice per L
and model (bars = mean over seeds, dots = the seeds) and the paired per-case differences A - B, sorted.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_records import canonical, code_tag, commits_of, load_records

from cfrseg.metrics import case_mean as case_value, paired_stats

METRICS = ("dice", "jaccard", "asd", "hd95")
MODEL_ORDER = ("supervised", "MT", "CFR_FT", "CFR_MT")


def run_mean(cases: Mapping[str, Mapping[str, Any]], metric: str) -> float:
    """Mean over cases of :func:`case_value` (NaN cases left out)."""
    vals = [case_value(m, metric) for m in cases.values()]
    vals = [v for v in vals if not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """(mean, sample std with ddof 1 (NaN for one value), n) of the finite values."""
    v = np.array([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan, int(v.size)


def setting_of(rec: Mapping[str, Any]) -> str:
    s = rec["spec"]
    return canonical({"profile": s["profile"], "overrides": s["overrides"], "code": code_tag(s.get("code", {})),
                      "platform": s.get("platform")})


def label_L(rec: Mapping[str, Any]) -> str:
    s = rec["spec"]
    return f"all ({s['L']})" if s.get("ceiling") else str(s["L"])


def aggregate(records: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows {L, model, n_seeds, seeds, <metric>: (mean, std), wall_min, cpu_min, peak_rss_gb} over seeds."""
    by: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        for model in r["models"]:
            by[(label_L(r), model)].append(r)
    rows = []
    for (L, model), recs in by.items():
        row: dict[str, Any] = {"L": L, "model": model, "seeds": sorted(r["spec"]["seed"] for r in recs)}
        row["n_seeds"] = len(row["seeds"])
        for m in METRICS:
            row[m] = mean_std(run_mean(r["models"][model], m) for r in recs)[:2]
        t = [r["timing"] for r in recs]
        row["wall_min"] = mean_std(x.get("pipeline_wall_s", math.nan) / 60 for x in t)[0]
        row["cpu_min"] = mean_std(x.get("pipeline_cpu_s", math.nan) / 60 for x in t)[0]
        row["peak_rss_gb"] = max((x.get("peak_rss_mb") or math.nan) / 1024 for x in t)
        row["threads"] = sorted({x.get("threads") for x in t})
        rows.append(row)
    order = {m: i for i, m in enumerate(MODEL_ORDER)}
    rows.sort(key=lambda r: (_L_sort(r["L"]), order.get(r["model"], 99), r["model"]))
    return rows


def _L_sort(L: str) -> float:
    return float(L) if L.isdigit() else 1e9


def paired(records: list[Mapping[str, Any]], a: str = "CFR_MT", b: str = "MT",
           metric: str = "dice") -> list[dict[str, Any]]:
    """Per L: the paired per-case comparison of model ``a`` against ``b`` (see the module docstring)."""
    per: dict[str, dict[str, dict[int, Mapping[str, Any]]]] = defaultdict(lambda: {a: {}, b: {}})
    for r in records:
        for model in (a, b):
            if model in r["models"]:
                per[label_L(r)][model][r["spec"]["seed"]] = r["models"][model]
    out = []
    for L, mods in per.items():
        seeds = sorted(set(mods[a]) & set(mods[b]))
        if not seeds:
            continue
        cases = sorted(set.intersection(*(set(mods[m][s]) for m in (a, b) for s in seeds)))
        if not cases:
            continue
        da = np.array([[case_value(mods[a][s][c], metric) for c in cases] for s in seeds])
        db = np.array([[case_value(mods[b][s][c], metric) for c in cases] for s in seeds])
        diff = np.nanmean(da, axis=0) - np.nanmean(db, axis=0)           # per case, over seeds
        stats = paired_stats(diff)
        out.append({"L": L, "a": a, "b": b, "metric": metric, "seeds": seeds, **stats, "diff": diff.tolist(),
                    "per_seed_diff": [float(np.nanmean(da[i]) - np.nanmean(db[i])) for i in range(len(seeds))]})
    out.sort(key=lambda r: _L_sort(r["L"]))
    return out


def _platform(p: Mapping[str, Any] | None) -> str:
    if not p:
        return ""
    where = f"GPU {p['cuda']}" if p.get("cuda") else "CPU"
    return f"; torch {p.get('torch')}, {where}, native bf16 CPU: {'yes' if p.get('cpu_bf16_native') else 'no'}"


def _pm(ms: tuple[float, float]) -> str:
    m, s = ms
    if math.isnan(m):
        return "n/a"
    return f"{m:.4f}" + ("" if math.isnan(s) else f" ± {s:.4f}")


def _f(v: float, fmt: str) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def by_setting(records: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Records grouped by :func:`setting_of` (what a table may average over)."""
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        groups[setting_of(r)].append(r)
    return groups


def to_markdown(records: list[Mapping[str, Any]], split: str, pairs: Iterable[tuple[str, str]] = (("CFR_MT", "MT"),)
                ) -> str:
    """The Markdown tables (one section per setting) of ``records`` on ``split``."""
    recs = [r for r in records if r["spec"]["split"] == split]
    if not recs:
        return f"(no records on split {split!r})\n"
    lines: list[str] = []
    for setting, rs in sorted(by_setting(recs).items()):
        s = rs[0]["spec"]
        lines += [(f"Split `{split}` ({len(s['split_ids'])} cases); profile `{s['profile']}`, overrides "
                  f"`{' '.join(s['overrides']) or 'none'}`; code {commits_of(rs)} "
                  f"({code_tag(s.get('code', {}))}){_platform(s.get('platform'))}."), "",
                  "| L | model | seeds | Dice | Jaccard | ASD (mm) | HD95 (mm) | wall (min) | CPU (min) | peak RSS (GB) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in aggregate(rs):
            timing = row["model"] != "CFR_FT"   # SAM alone is a by-product of the CFR run: no time of its own
            lines.append(f"| {row['L']} | {row['model']} | {row['n_seeds']} | {_pm(row['dice'])} | "
                         f"{_pm(row['jaccard'])} | {_pm(row['asd'])} | {_pm(row['hd95'])} | "
                         f"{_f(row['wall_min'], '.1f') if timing else ''} | "
                         f"{_f(row['cpu_min'], '.1f') if timing else ''} | "
                         f"{_f(row['peak_rss_gb'], '.2f') if timing else ''} |")
        for a, b in pairs:
            cmp = paired(rs, a, b)
            if not cmp:
                continue
            lines += ["", f"Paired per-case Dice, {a} - {b} (per case averaged over the common seeds):", "",
                      "| L | seeds | cases | mean diff | wins / losses / ties | Wilcoxon p | per-seed diff of means |",
                      "|---|---|---|---|---|---|---|"]
            for c in cmp:
                lines.append(f"| {c['L']} | {len(c['seeds'])} | {c['n_cases']} | {c['mean_diff']:+.4f} | "
                             f"{c['wins']} / {c['losses']} / {c['ties']} | {c['wilcoxon_p']:.3g} | "
                             f"{', '.join(f'{d:+.4f}' for d in c['per_seed_diff'])} |")
        lines.append("")
    return "\n".join(lines)


def summary_png(records: list[Mapping[str, Any]], split: str, path: Path, pair: tuple[str, str] = ("CFR_MT", "MT")
                ) -> Path | None:
    """Chart of the setting with the most records on ``split``: left, Dice per L and model (bar = mean over seeds,
    error bar = std over seeds, dots = the seeds' figures); right, for each L, the paired per-case differences
    ``pair[0] - pair[1]`` (per case averaged over the common seeds, as :func:`paired`), sorted. None when the
    split has no records."""
    recs = [r for r in records if r["spec"]["split"] == split]
    if not recs:
        return None
    rs = max(by_setting(recs).values(), key=len)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = aggregate(rs)
    Ls = sorted({row["L"] for row in rows}, key=_L_sort)
    order = {m: i for i, m in enumerate(MODEL_ORDER)}
    models = sorted({row["model"] for row in rows}, key=lambda m: (order.get(m, 99), m))
    cmp = paired(rs, *pair)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / max(len(models), 1)
    for i, model in enumerate(models):
        labelled = False
        for j, L in enumerate(Ls):
            per_seed = [run_mean(r["models"][model], "dice") for r in rs if label_L(r) == L and model in r["models"]]
            if not per_seed:
                continue
            x = j + i * width
            m, s, _ = mean_std(per_seed)
            ax.bar(x, m, width, yerr=0.0 if math.isnan(s) else s, color=f"C{i}", label=None if labelled else model)
            ax.plot([x] * len(per_seed), per_seed, "k.", ms=4)
            labelled = True
    ax.set_xticks(np.arange(len(Ls)) + width * (len(models) - 1) / 2, [f"L={L}" for L in Ls])
    ax.set_ylim(0, 1.12)
    ax.set_ylabel(f"Dice ({split} split, mean over cases)")
    ax.legend(fontsize=7, loc="upper left", ncol=max(len(models), 1))
    for k, c in enumerate(cmp):
        d = np.sort(np.asarray(c["diff"], dtype=float))
        bx.plot(np.arange(d.size), d, "o-", ms=3, color=f"C{k}",
                label=f"L={c['L']}: {c['mean_diff']:+.3f}, {c['wins']}/{c['losses']}, p={c['wilcoxon_p']:.2g}")
    bx.axhline(0.0, color="k", lw=0.8)
    bx.set_xlabel("case (sorted by difference)")
    bx.set_ylabel(f"Dice {pair[0]} - {pair[1]}")
    if cmp:
        bx.legend(fontsize=7, loc="upper left")
    s0 = rs[0]["spec"]
    fig.suptitle(f"LA, profile {s0['profile']}, overrides {' '.join(s0['overrides']) or 'none'}, "
                 f"code {code_tag(s0.get('code', {}))}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(Path(__file__).resolve().parent / "results" / "quality_la"))
    ap.add_argument("--split", required=True, choices=["val", "test"])
    ap.add_argument("--pair", nargs=2, action="append", metavar=("A", "B"),
                    help="models to compare per case (default CFR_MT MT); repeatable")
    ap.add_argument("--out", help="also write the Markdown to this file")
    ap.add_argument("--png", help="also draw the chart (summary_png, first pair) to this PNG file")
    args = ap.parse_args(argv)
    pairs = [tuple(p) for p in args.pair or [("CFR_MT", "MT")]]
    records = load_records(Path(args.results))
    md = to_markdown(records, args.split, pairs)
    print(md)
    if args.out:
        Path(args.out).write_text(md)
    if args.png and summary_png(records, args.split, Path(args.png), pairs[0]) is not None:
        print(f"chart: {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
