"""The whole CFR pipeline: plan -> fine-tune SAM -> pseudo-label -> re-train the 3D network -> evaluate -> report.

One call, resumable: the dataset is planned once (``plan.json``, ``fingerprint.json``), each stage keeps its
checkpoint and artifacts in its own part of ``store`` (``finetune/``, ``pseudolabel/``, ``retrain/``); with
``resume`` (and the same data, settings and code: :mod:`cfrseg.provenance`) an interrupted stage continues and
a finished stage is not run again; without it a store holding a run is refused. Writes ``report.json``,
``report.md``, ``loss_curves.png`` and ``overlays/<case>.png`` at the top of ``store``.
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from cfrseg.data.fingerprint import distance_unit
from cfrseg.data.manifest import Case, Manifest
from cfrseg.data.plan import Plan, fingerprint_and_plan, save_plan
from cfrseg.errors import ConfigError, InputError
from cfrseg.progress import CancelFlag, ProgressEvent, ProgressFn, emit
from cfrseg.stages.evaluate import _clean
from cfrseg.stages.finetune import FinetuneConfig, run_finetune
from cfrseg.stages.pseudolabel import PseudolabelConfig, evaluate_sam, run_pseudolabel
from cfrseg.stages.retrain import RetrainConfig, evaluate_model, run_retrain
from cfrseg.store import LocalStore, Store, get_json, put_json

STAGES = ("finetune", "pseudolabel", "retrain")


@dataclass(frozen=True)
class PipelineConfig:
    finetune: FinetuneConfig
    pseudolabel: PseudolabelConfig
    retrain: RetrainConfig
    evaluate_sam: bool = True     # also score SAM alone on the test cases (the paper's CFR_FT row)
    overlays: int = 3             # mid-slice overlay PNGs of this many unlabeled cases
    profile: str = ""

    @classmethod
    def from_profile(cls, prof: Mapping[str, Any], *, ssl: str | None = None, resume: bool = False,
                     sam_checkpoint: str | None = None, profile: str = "") -> "PipelineConfig":
        """Build from a profile's sections ("finetune", "pseudolabel", "retrain", optional "pipeline")."""
        unknown = sorted(set(prof) - {"finetune", "pseudolabel", "retrain", "pipeline", "data", "infer", "_doc"})
        if unknown:
            raise ConfigError(f"profile: unknown section(s) {unknown}")
        ft = dict(prof.get("finetune", {}), resume=resume)
        pl = dict(prof.get("pseudolabel", {}), resume=resume)
        if sam_checkpoint:
            ft["checkpoint"] = sam_checkpoint
        rt = dict(prof.get("retrain", {}), resume=resume)
        if ssl is not None:
            rt["ssl"] = ssl
        if "infer" in prof:
            rt["infer"] = dict(prof["infer"], **rt.get("infer", {}))
        if sam_checkpoint:
            pl["checkpoint"] = sam_checkpoint
        extra = dict(prof.get("pipeline", {}))
        bad = sorted(set(extra) - {"evaluate_sam", "overlays"})
        if bad:
            raise ConfigError(f"profile section 'pipeline': unknown option(s) {bad}")
        return cls(FinetuneConfig.from_dict(ft), PseudolabelConfig.from_dict(pl), RetrainConfig.from_dict(rt),
                   profile=profile, **extra)

    def to_dict(self) -> dict[str, Any]:
        return {"profile": self.profile, "finetune": self.finetune.to_dict(),
                "pseudolabel": self.pseudolabel.to_dict(), "retrain": self.retrain.to_dict(),
                "pipeline": {"evaluate_sam": self.evaluate_sam, "overlays": self.overlays}}


@dataclass
class PipelineResult:
    report: dict[str, Any]
    summary: str
    store: Store = field(repr=False, default=None)  # type: ignore[assignment]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _fg(summary: Mapping[str, Any]) -> dict[str, Any]:
    """Foreground-class means of a metrics summary: {"dice": {"mean", "std", "n_nan", "n_excluded"}, ..., "n"}
    (``n_nan``: case-class pairs left out of the mean because the value is undefined, e.g. a distance to a
    missed structure; ``n_excluded``: pairs where prediction and truth are both empty)."""
    out: dict[str, Any] = {"n": summary["n_cases"]}
    for m, v in summary["metrics"].items():
        stds = np.array(v["std"], dtype=float)
        stds = stds[~np.isnan(stds)]
        out[m] = {"mean": v["class_mean"], "std": float(stds.mean()) if stds.size else float("nan"),
                  "n_nan": int(sum(v.get("n_nan", []))), "n_excluded": int(sum(v.get("n_excluded", [])))}
    return out


class _LocalFiles:
    """Local paths of stored label files (downloads them when the store is not a LocalStore)."""

    def __init__(self) -> None:
        self._tmp: tempfile.TemporaryDirectory | None = None

    def path(self, store: Store, key: str) -> str:
        if isinstance(store, LocalStore):
            return str(store.path(key))
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="cfrseg-pl-")
        dest = Path(self._tmp.name) / key
        store.get_file(key, dest)
        return str(dest)


def _test_sets(data: Manifest, test_data: Manifest | None) -> list[tuple[str, Manifest, list[Case]]]:
    """The evaluation sets, each checked to share no case id and no image (sha256) with the training cases."""
    from cfrseg.provenance import check_disjoint

    sets = []
    if data.test:
        check_disjoint(data.training, data.test, "holdout set")
        sets.append(("holdout", data, data.test))
    if test_data is not None:
        if not test_data.test:
            raise InputError(f"--test-data {test_data.name!r} has no cases")
        if test_data.num_classes != data.num_classes:
            raise InputError(f"test data has {test_data.num_classes} classes, training data {data.num_classes}")
        check_disjoint(data.training, test_data.test, "--test-data set")
        sets.append(("test", test_data, test_data.test))
    return sets


def run_pipeline(config: PipelineConfig, data: Manifest, store: Store, *, test_data: Manifest | None = None,
                 progress: ProgressFn | None = None, cancel: CancelFlag | None = None) -> PipelineResult:
    """Run the three stages and the evaluations; see the module docstring. Returns the report."""
    if not data.labeled:
        raise InputError(f"dataset {data.name!r} has no labeled case")
    if not data.unlabeled:
        raise InputError(f"dataset {data.name!r} has no unlabeled case: CFR needs unlabeled volumes")
    sets = _test_sets(data, test_data)
    earlier = store.exists("pipeline_config.json")
    if earlier and not config.finetune.resume:
        raise ConfigError(f"{store!r} already holds a pipeline run; pass --resume to continue or reuse it (only "
                          f"with the same data, settings and code), or write to a fresh --out")
    # an earlier run's record is rewritten only once its fine-tune stage accepted the inputs
    fingerprint, plan = fingerprint_and_plan(data, store, write=not earlier, progress=progress, cancel=cancel)
    config.finetune.window(plan)   # a window the plan cannot give (crop 'auto' / crop_mm) fails before any record
    if not earlier:
        put_json(store, "pipeline_config.json", config.to_dict())
    t_all = time.monotonic()
    timings: dict[str, float] = {}
    peaks: dict[str, float] = {}

    def stage_done(name: str, t0: float) -> None:
        timings[name] = round(time.monotonic() - t0, 1)
        peaks[name] = round(_peak_rss_mb(), 1)

    t0 = time.monotonic()
    ft_store = store.sub("finetune")
    ft = run_finetune(config.finetune, data, ft_store, plan=plan, progress=progress, cancel=cancel)
    stage_done("finetune", t0)
    if earlier:
        save_plan(store, fingerprint, plan)
        put_json(store, "pipeline_config.json", config.to_dict())

    t0 = time.monotonic()
    pl_store = store.sub("pseudolabel")
    pl = run_pseudolabel(config.pseudolabel, data, pl_store, finetuned=ft_store, progress=progress, cancel=cancel)
    files = _LocalFiles()
    paths = {cid: files.path(pl_store, key) for cid, key in pl.labels.items()}
    data_pl = data.with_pseudo_labels({c.case_id: paths[c.case_id] for c in data.unlabeled if c.case_id in paths})
    pl_quality = _pseudo_label_quality(data_pl)
    stage_done("pseudolabel", t0)

    sam_metrics: dict[str, Any] = {}
    if config.evaluate_sam and sets:
        t0 = time.monotonic()
        for name, man, cases in sets:
            res = evaluate_sam(config.pseudolabel, man, ft_store, case_ids=[c.case_id for c in cases],
                               class_weights=pl.class_weights, progress=progress, cancel=cancel)
            sam_metrics[name] = res
        stage_done("evaluate_sam", t0)

    t0 = time.monotonic()
    rt_store = store.sub("retrain")
    rt = run_retrain(config.retrain, data_pl, rt_store, plan=plan, progress=progress, cancel=cancel)
    stage_done("retrain", t0)

    final_metrics: dict[str, Any] = {}
    if sets:
        t0 = time.monotonic()
        for name, man, cases in sets:
            final_metrics[name] = evaluate_model(rt_store, cases, man, device=config.retrain.device,
                                                 progress=progress, cancel=cancel)
        stage_done("evaluate", t0)

    emit(progress, ProgressEvent("report", 0, 1, message="writing report"))
    pictures = _pictures(config, data_pl, store, rt_store, ft_store)
    report = {
        "profile": config.profile,
        "config": config.to_dict(),
        "dataset": {"name": data.name, "num_classes": data.num_classes, "labeled": len(data.labeled),
                    "unlabeled": len(data.unlabeled), "test": {n: len(c) for n, _, c in sets},
                    "class_names": list(data.names), "modality": data.modality},
        "plan": plan.to_dict(),
        "distance_unit": distance_unit(fingerprint),
        "timings_s": dict(timings, total=round(time.monotonic() - t_all, 1)),
        "peak_rss_mb": dict(peaks, overall=round(_peak_rss_mb(), 1)),
        "finetune": {"iterations": ft.iterations, "final_loss": ft.final_loss, "resumed_from": ft.resumed_from,
                     "window": ft.window},
        "pseudolabel": {"cases": len(pl.labels), "skipped": len(pl.skipped), "quality": pl_quality,
                        "calibration": pl.calibration},
        "retrain": {"iterations": rt.iterations, "final_losses": rt.final_losses, "ssl": config.retrain.ssl,
                    "evaluated_weights": config.retrain.evaluate},
        "metrics": {
            "CFR_FT": {n: {"summary": r["summary"], "cases": r["cases"]} for n, r in sam_metrics.items()},
            "final": {n: {"summary": r["summary"], "cases": r["cases"]} for n, r in final_metrics.items()},
        },
        "student_vs_teacher": _student_vs_teacher(final_metrics, sam_metrics),
        "pictures": pictures,
    }
    put_json(store, "report.json", _clean(report))
    md = _report_md(report, config, _fg_names(data))
    store.put_bytes("report.md", md.encode())
    emit(progress, ProgressEvent("report", 1, 1, message="done"))
    return PipelineResult(report, _summary_text(report), store)


def _student_vs_teacher(final: Mapping[str, Any], sam: Mapping[str, Any]) -> dict[str, Any]:
    """Per evaluation set that both were measured on: the paired per-case Dice comparison of the re-trained 3D
    model (A) against the fine-tuned SAM alone (B), ``cfrseg.metrics.paired_difference``. A negative mean
    difference means the student did not reach its teacher on that set (the report says so)."""
    from cfrseg.metrics import paired_difference

    return {n: paired_difference(final[n]["cases"], sam[n]["cases"]) for n in final if n in sam}


def _student_vs_teacher_md(report: Mapping[str, Any], model_name: str) -> list[str]:
    comp = report.get("student_vs_teacher") or {}
    if not comp:
        return []
    lines = ["", "## The 3D model against its teacher", "",
             f"Paired per case (Dice averaged over the foreground classes of a case): {model_name} - CFR_FT "
             "(the fine-tuned SAM alone).", "",
             "| set | cases | 3D model | SAM alone | mean difference | wins / losses / ties | Wilcoxon p |",
             "|---|---|---|---|---|---|---|"]
    for name, c in comp.items():
        lines.append(f"| {name} | {c['n_cases']} | {c['mean_a']:.4f} | {c['mean_b']:.4f} | {c['mean_diff']:+.4f} | "
                     f"{c['wins']} / {c['losses']} / {c['ties']} | {c['wilcoxon_p']:.3g} |")
    behind = [n for n, c in comp.items() if c["mean_diff"] < 0]
    if behind:
        lines += ["", f"**The 3D model is below the fine-tuned SAM on {', '.join(behind)}.** The 3D model is what "
                  "`cfrseg segment` and the services serve. With few cases the difference may be noise (see the "
                  "p-value); if it holds on a larger held-out set, a larger `retrain.pl_weight` carries more of "
                  "the SAM labels into the student (docs/results.md, ACDC)."]
    return lines


def _window_md(window: dict[str, Any] | None) -> str:
    """" on (X, Y, D) windows (mode mode)" for the report, or "" (runs that did not record it)."""
    if not window:
        return ""
    return f" on {tuple(window['crop'])} windows ({window['mode']} mode)"


def _pseudo_label_quality(data: Manifest) -> dict[str, Any] | None:
    """Dice etc. of the SAM pseudo-labels on unlabeled cases that happen to have labels (e.g. LA)."""
    from cfrseg.data.datasets import load_case, load_pseudo_label
    from cfrseg.metrics import compute_case, summarize

    res = {}
    for c in data.unlabeled:
        if not c.label or not c.pseudo_label:
            continue
        image, gt = load_case(c, data, check_pseudo=False)
        if gt is None:
            continue
        pl = load_pseudo_label(c, data, image)
        res[c.case_id] = compute_case(pl.array, gt.array, image.spacing, data.num_classes)
    if not res:
        return None
    return {"summary": summarize(list(res.values())), "cases": res}


def _pictures(config: PipelineConfig, data: Manifest, store: Store, rt_store: Store, ft_store: Store) -> list[str]:
    from cfrseg.data.datasets import load_case, load_pseudo_label
    from cfrseg.report import loss_curves_png, overlay_png
    from cfrseg.stages.infer import InferConfig, load_model, segment_volume

    out: list[str] = []
    with tempfile.TemporaryDirectory(prefix="cfrseg-report-") as tmp:
        hist = {}
        for name, st in (("finetune", ft_store), ("retrain", rt_store)):
            if st.exists("history.json"):
                h = get_json(st, "history.json")
                hist[name] = h if isinstance(h, list) else h.get("history", [])
        p = loss_curves_png(Path(tmp) / "loss_curves.png", hist)
        store.put_file("loss_curves.png", p)
        out.append("loss_curves.png")
        cases = [c for c in data.unlabeled if c.pseudo_label][: config.overlays]
        if cases:
            net, meta = load_model(rt_store.get_bytes("model.pt"), device=config.retrain.device)
            icfg = InferConfig.from_dict(dict(meta.get("infer", {}), device=config.retrain.device))
            for c in cases:
                image, gt = load_case(c, data, check_pseudo=False)
                pl = load_pseudo_label(c, data, image)
                pred = segment_volume(net, image, icfg, meta["preprocess"])
                panels = [("ground truth", gt.array if gt is not None else None), ("SAM pseudo-label", pl.array),
                          ("final 3D model", pred.array)]
                p = overlay_png(Path(tmp) / f"{c.case_id}.png", image.array, panels, title=c.case_id,
                                num_classes=data.num_classes, class_names=_fg_names(data))
                store.put_file(f"overlays/{c.case_id}.png", p)
                out.append(f"overlays/{c.case_id}.png")
    return out


def _row(summary: Mapping[str, Any]) -> str:
    f = _fg(summary)

    def cell(m: str) -> str:
        v = f[m]
        txt = f"{v['mean']:.4f} ± {v['std']:.4f}" if v["mean"] == v["mean"] else "nan"
        return txt + (f" (n_nan {v['n_nan']})" if m in ("asd", "hd95") else "")

    return " | ".join(cell(m) for m in ("dice", "jaccard", "asd", "hd95")) + f" | {f['n']}"


def _report_md(report: Mapping[str, Any], config: PipelineConfig, class_names: Any = None) -> str:
    lines = [f"# CFR run report ({report['profile'] or 'custom profile'})", ""]
    d = report["dataset"]
    lines += [f"Dataset `{d['name']}` ({d['modality']}, classes {', '.join(d['class_names'])}): {d['labeled']} "
              f"labeled, {d['unlabeled']} unlabeled, test sets {d['test']}.",
              f"Plan: {Plan.from_dict(report['plan']).describe()}.",
              f"SAM `{config.finetune.model}` fine-tuned {report['finetune']['iterations']} iterations"
              f"{_window_md(report['finetune'].get('window'))}; "
              f"3D network `{config.retrain.network}` re-trained with `{config.retrain.ssl}` for "
              f"{report['retrain']['iterations']} iterations (evaluated: {config.retrain.evaluate} weights).", ""]
    unit = report.get("distance_unit", "mm")
    lines += [f"## Metrics (mean over foreground classes; ASD/HD95 in {unit}; n_nan = case-class pairs without a "
              "defined distance, left out of the mean)", "",
              "| model | set | Dice | Jaccard | ASD | HD95 | cases |", "|---|---|---|---|---|---|---|"]
    q = report["pseudolabel"]["quality"]
    if q:
        lines.append(f"| SAM pseudo-labels | unlabeled | {_row(q['summary'])} |")
    for model_name, key in (("CFR_FT (SAM alone)", "CFR_FT"), (f"CFR_{config.retrain.ssl.upper()}", "final")):
        for set_name, r in report["metrics"][key].items():
            lines.append(f"| {model_name} | {set_name} | {_row(r['summary'])} |")
    lines += _per_class_md(report, config, class_names)
    lines += _student_vs_teacher_md(report, f"CFR_{config.retrain.ssl.upper()}")
    lines += ["", "## Time and memory", "", "| stage | wall (s) | peak RSS so far (MB) |", "|---|---|---|"]
    for k, v in report["timings_s"].items():
        lines.append(f"| {k} | {v} | {report['peak_rss_mb'].get(k, report['peak_rss_mb']['overall'])} |")
    lines += ["", "## Pictures", ""] + [f"![{p}]({p})" for p in report["pictures"]]
    return "\n".join(lines) + "\n"


def _per_class_md(report: Mapping[str, Any], config: PipelineConfig, class_names: Any = None) -> list[str]:
    """Multi-class data: per-class Dice and HD95 tables (every model and set as a column)."""
    from cfrseg.report import per_class_md

    if report["dataset"]["num_classes"] <= 2:
        return []
    cols: dict[str, Any] = {}
    q = report["pseudolabel"]["quality"]
    if q:
        cols["SAM pseudo-labels (unlabeled)"] = q["summary"]
    for model_name, key in (("CFR_FT", "CFR_FT"), (f"CFR_{config.retrain.ssl.upper()}", "final")):
        for set_name, r in report["metrics"][key].items():
            cols[f"{model_name} ({set_name})"] = r["summary"]
    if not cols:
        return []
    return ["", "## Per class", "", per_class_md(cols, class_names, units=report.get("distance_unit", "mm"))]


def _summary_text(report: Mapping[str, Any]) -> str:
    unit = report.get("distance_unit", "mm")
    parts = [f"total {report['timings_s']['total']:.0f} s, peak RSS {report['peak_rss_mb']['overall']:.0f} MB"]
    for key, name in (("CFR_FT", "SAM alone"), ("final", "final 3D model")):
        for set_name, r in report["metrics"][key].items():
            f = _fg(r["summary"])
            parts.append(f"{name} on {set_name}: Dice {f['dice']['mean']:.4f}, HD95 {f['hd95']['mean']:.2f} {unit} "
                         f"(n_nan {f['hd95']['n_nan']})")
    for set_name, c in (report.get("student_vs_teacher") or {}).items():
        parts.append(f"final 3D model - SAM alone on {set_name}: Dice {c['mean_diff']:+.4f} over {c['n_cases']} "
                     f"cases ({c['wins']} / {c['losses']} / {c['ties']} wins / losses / ties)"
                     + ("; the 3D model is below its teacher" if c["mean_diff"] < 0 else ""))
    q = report["pseudolabel"]["quality"]
    if q:
        parts.append(f"pseudo-labels: Dice {_fg(q['summary'])['dice']['mean']:.4f}")
    return "\n".join(parts)


def load_report(store: Store) -> dict[str, Any]:
    return json.loads(store.get_bytes("report.json"))


def _fg_names(data: Any) -> list[str] | None:
    """The foreground class names the dataset declares (None: tables and overlays say "class c")."""
    names = getattr(data, "class_names", None)
    return list(names)[1:] if names else None
