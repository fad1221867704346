"""Quality of CFR on LA 2018 under the evaluation protocol (docs/protocol.md): one JSON record per run.

A run is (L, method, seed) evaluated on a split (``val`` for every tuning decision, ``test`` for the reported
figures). Splits are fixed by case id (bench/protocol.py): validation = train.list[64:80], test = [48:64],
training pool = [0:48] with the first L labeled and the rest unlabeled (their labels are never read).
Methods: ``supervised`` (the 3D network on the labeled cases only), any SSL method of the re-train stage
(``mt``, ``uamt``, ``acmt``, ``st``), and ``cfr_<ssl>`` (the whole CFR pipeline: fine-tune SAM, pseudo-label,
re-train with <ssl>; it also scores SAM alone, the CFR_FT row). ``--labeled all`` is the ceiling: the whole
pool labeled (supervised only).

Each (L, method, seed) trains once in its own process (so wall time, CPU time and peak RSS are its own) and is
evaluated on each requested split; the record of a split is reused only if its whole spec (profile, resolved
settings, overrides, seed, split and case ids, code version, threads: bench/run_records.py) is the same, and a
record stored under that key with other fields is refused. The Markdown summary (mean ± std over seeds, paired
per-case comparison of CFR_MT against MT) comes from bench/quality_summary.py.

  nice -n 10 .venv/bin/python bench/quality_la.py --split val --labeled 4 --methods supervised mt cfr_mt \
      --seeds 0 1 2 --threads 2 [--set retrain.iterations=600]
  .venv/bin/python bench/quality_la.py --split val --summary-only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol
from _common import default_data
from run_records import (EVAL_ONLY, StaleRecord, code_tag, code_version, finetune_key, load_cached, load_records,
                         teacher_key, train_key, write_record)

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results" / "quality_la"
TIMING = "bench_timing.json"
TEACHER_STAGES = ("finetune", "pseudolabel")


def model_names(method: str) -> list[str]:
    """Model rows a method's run produces (the CFR pipeline also scores SAM alone)."""
    if method == "supervised":
        return ["supervised"]
    if method.startswith("cfr_"):
        return ["CFR_FT", f"CFR_{method[4:].upper()}"]
    return [method.upper()]


def check_method(method: str) -> None:
    from cfrseg.ssl.methods import METHODS

    ssl = method.removeprefix("cfr_")
    if method != "supervised" and (ssl not in METHODS or (ssl == "none" and not method.startswith("cfr_"))):
        raise SystemExit(f"unknown method {method!r}: use supervised, one of "
                         f"{[m for m in METHODS if m != 'none']} or cfr_<ssl> (cfr_none: CFR without SSL)")


def resolved_profile(profile: str, sets: list[str], seed: int) -> dict[str, Any]:
    """The profile's sections after ``--set`` overrides, with the seed of both trained stages set."""
    from cfrseg.config import apply_overrides, load_profile

    prof = apply_overrides(load_profile(profile), sets)
    prof.setdefault("retrain", {})["seed"] = seed
    prof.setdefault("finetune", {})["seed"] = seed
    return json.loads(json.dumps(prof))


def platform_info() -> dict[str, Any]:
    """What the numbers depend on besides the code: torch version, GPU (what device "auto" picks), and
    whether this CPU runs bfloat16 natively."""
    import torch

    from cfrseg.stages.precision import cpu_bf16_native

    return {"torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "cpu_bf16_native": cpu_bf16_native()}


def make_spec(args: argparse.Namespace, L: str, method: str, seed: int, split: str,
              code: dict[str, Any], ids: list[str], list_sha: str) -> dict[str, Any]:
    pool = protocol.split_ids(ids)["pool"]
    n = protocol.resolve_labeled(L, len(pool))
    r = protocol.roles(ids, n, [split])
    return {"bench": "quality_la", "profile": args.profile, "resolved": resolved_profile(args.profile, args.set, seed),
            "overrides": list(args.set), "seed": seed, "L": n, "ceiling": n == len(pool), "method": method,
            "split": split, "split_ids": r["test"], "labeled_ids": r["labeled"], "unlabeled_ids": r["unlabeled"],
            "data_list_sha256": list_sha, "code": code, "platform": platform_info(), "threads": args.threads}


# ------------------------------------------------------------------------------------------ one run (child)
def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class _Progress:
    """Prints one line per stage change and at most one a minute otherwise (the benchmark's log)."""

    def __init__(self, tag: str) -> None:
        self.tag, self.stage, self.last = tag, None, 0.0

    def __call__(self, ev) -> None:
        now = time.monotonic()
        if ev.stage != self.stage or now - self.last >= 60:
            self.stage, self.last = ev.stage, now
            print(f"[{self.tag}] {ev.stage} {ev.step}/{ev.total} {ev.message or ''}", flush=True)


def _evaluate(spec: dict[str, Any], data: str, store) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train (or reuse) and evaluate one spec; returns ({model: {case: metrics}}, extra)."""
    return evaluate_manifest(spec, protocol.manifest(data, spec["L"], [spec["split"]]), store)


def trained(spec: dict[str, Any], store) -> bool:
    """Whether ``store`` holds the finished training of ``spec`` (the CFR pipeline's report, or the re-train
    stage's model)."""
    return _finished_at(store.root, spec)


def _finished_at(run: Path, spec: dict[str, Any]) -> bool:
    """:func:`trained` for a run folder given by its path (nothing is created)."""
    done = (run / "retrain" / "model.pt").is_file()
    return done and (run / "report.json").is_file() if spec["method"].startswith("cfr_") else done


def evaluate_manifest(spec: dict[str, Any], man, store) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train (or reuse) ``spec``'s method on manifest ``man`` and evaluate it on ``man.test`` (the split). A run
    already trained (for another split) is only evaluated: :func:`evaluate_trained`."""
    from cfrseg.stages.pipeline import PipelineConfig, run_pipeline
    from cfrseg.stages.retrain import RetrainConfig, evaluate_model, run_retrain

    assert [c.case_id for c in man.test] == spec["split_ids"], "manifest and spec disagree on the split"
    method, prof = spec["method"], spec["resolved"]
    prog = _Progress(f"{method} L={spec['L']} seed={spec['seed']} {spec['split']}")
    if trained(spec, store):
        return evaluate_trained(spec, man, store, prog)
    if method.startswith("cfr_"):
        cfg = PipelineConfig.from_profile(prof, ssl=method[4:], resume=True, profile=spec["profile"])
        rep = run_pipeline(cfg, man, store, progress=prog).report
        names = model_names(method)
        models = {names[0]: rep["metrics"]["CFR_FT"]["holdout"]["cases"],
                  names[1]: rep["metrics"]["final"]["holdout"]["cases"]}
        cal = rep["pseudolabel"].get("calibration") or {}
        extra = {"stage_s": rep["timings_s"], "stage_peak_rss_mb": rep["peak_rss_mb"],
                 "calibration_threshold": cal.get("threshold"), "calibration_reason": cal.get("reason")}
        return models, extra
    sec = dict(prof.get("retrain", {}), ssl="none" if method == "supervised" else method, resume=True)
    if "infer" in prof:
        sec["infer"] = dict(prof["infer"], **sec.get("infer", {}))
    rt = store.sub("retrain")
    res = run_retrain(RetrainConfig.from_dict(sec), man, rt, progress=prog)
    ev = evaluate_model(rt, man, progress=prog)
    return {model_names(method)[0]: ev["cases"]}, {"train_wall_s": res.wall_s, "final_losses": res.final_losses}


def evaluate_trained(spec: dict[str, Any], man, store, progress=None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Evaluate the models of a finished run in ``store`` on ``man.test``, running no stage: the stages'
    provenance covers the manifest they were trained with, whose evaluation cases were another split, so they
    would (rightly) refuse to resume on this one. The 3D model as the pipeline evaluates it; for ``cfr_*`` also
    SAM alone (CFR_FT) with the class weights its pseudo-labels got (calibration.json)."""
    from cfrseg.stages.pipeline import PipelineConfig
    from cfrseg.stages.pseudolabel import CALIBRATION, evaluate_sam
    from cfrseg.stages.retrain import evaluate_model
    from cfrseg.store import get_json

    method, prof = spec["method"], spec["resolved"]
    cfg = PipelineConfig.from_profile(prof, profile=spec["profile"])   # for the devices and SAM's settings
    names = model_names(method)
    final = evaluate_model(store.sub("retrain"), man, device=cfg.retrain.device, progress=progress)
    if not method.startswith("cfr_"):
        return {names[0]: final["cases"]}, {"evaluated_only": True}
    pl_store = store.sub("pseudolabel")
    calib = get_json(pl_store, CALIBRATION) if pl_store.exists(CALIBRATION) else {}
    sam = evaluate_sam(cfg.pseudolabel, man, store.sub("finetune"), case_ids=spec["split_ids"],
                       class_weights=calib.get("weights"), progress=progress)
    return {names[0]: sam["cases"], names[1]: final["cases"]}, {"evaluated_only": True}


def run_one(job_file: str, evaluate=None) -> None:
    """Child process: train one (L, method, seed) and write one record per split of the job (``evaluate``:
    (spec, data, store) -> (models, extra), default LA's)."""
    import torch

    from cfrseg.store import LocalStore

    job = json.loads(Path(job_file).read_text())
    specs = job["specs"]
    if code_version() != specs[0].get("evaluated_with", specs[0]["code"]):
        raise SystemExit("the code changed since the run was planned; plan it again")
    torch.set_num_threads(specs[0]["threads"] or torch.get_num_threads())
    store_dir = Path(job["work"]) / store_name(specs[0])
    teacher = job.get("teacher")
    if teacher and not (store_dir / "finetune").exists():
        for stage in teacher.get("stages", TEACHER_STAGES):   # copies, not links: the source run stays as it is
            shutil.copytree(Path(job["work"]) / teacher["from"] / stage, store_dir / stage)
    store = LocalStore(store_dir)
    tfile = store_dir / TIMING
    for spec in specs:
        assert train_key(spec) == train_key(specs[0])
        if "evaluated_with" in spec and not trained(spec, store):
            raise SystemExit(f"{store_dir}: not a finished run; an adopted run is only evaluated, never trained")
        fresh = not tfile.is_file()
        w0, c0 = time.perf_counter(), _cpu_s()
        models, extra = (evaluate or _evaluate)(spec, job["data"], store)
        this = {"wall_s": round(time.perf_counter() - w0, 1), "cpu_s": round(_cpu_s() - c0, 1),
                "peak_rss_mb": round(_peak_rss_mb(), 1), "threads": torch.get_num_threads(),
                "load_avg_1m": os.getloadavg()[0], "split": spec["split"]}
        if fresh:     # the training process's figures, and the teacher it copied (later splits need its cost)
            tfile.write_text(json.dumps({**this, **({"teacher": teacher} if teacher else {})}))
        tr = json.loads(tfile.read_text())
        teacher = teacher or tr.get("teacher") or _teacher_of(Path(job["results"]), spec)
        timing = {"pipeline_wall_s": tr["wall_s"], "pipeline_cpu_s": tr["cpu_s"],
                  "peak_rss_mb": tr["peak_rss_mb"], "threads": tr["threads"],
                  "trained_with_split": tr["split"], "load_avg_1m": tr.get("load_avg_1m"),
                  "this_process": this}
        if teacher:   # the whole pipeline's cost: the teacher's stages (measured in its run) plus this run
            timing.update(teacher=teacher, own_wall_s=tr["wall_s"],
                          pipeline_wall_s=round(tr["wall_s"] + teacher["stage_s"], 1),
                          peak_rss_mb=max(tr["peak_rss_mb"], teacher["peak_rss_mb"]))
        p = write_record(Path(job["results"]), spec, models, timing, extra)
        print(f"wrote {p}", flush=True)


def _teacher_of(results: Path, spec: dict[str, Any]) -> dict[str, Any] | None:
    """The copied teacher of the training behind ``spec``, from a record of another split of that training
    (runs trained before ``bench_timing.json`` kept it); None when it copied none."""
    key = train_key(spec)
    for rec in load_records(results):
        if train_key(rec["spec"]) == key and rec.get("timing", {}).get("teacher"):
            return rec["timing"]["teacher"]
    return None


# ---------------------------------------------------------------------------------------------- driver
def store_name(spec: dict[str, Any]) -> str:
    """The folder under ``<results>/runs`` holding the stores of one training."""
    return f"{spec['method']}_L{spec['L']}_seed{spec['seed']}_{train_key(spec)[:16]}"


def find_teacher(results: Path, spec: dict[str, Any]) -> dict[str, Any] | None:
    """For a ``cfr_*`` spec: a finished CFR run under ``results`` whose teacher this spec can reuse, as
    {"from": its run folder, "origin": the run that trained it, "stages": the stage folders to copy,
    "stage_s": their seconds, "peak_rss_mb": the peak RSS up to their end}; None when there is none.

    A run with an equal :func:`run_records.teacher_key` gives the fine-tuned SAM and its pseudo-labels; failing
    that, one with an equal :func:`run_records.finetune_key` gives the fine-tuned SAM alone (this run then
    pseudo-labels with its own ``pseudolabel`` settings). A run that itself reused a teacher passes on the
    origin's figures. Runs whose stages were made by other cfrseg sources (their ``provenance.json``) are
    passed over: the stage would refuse them."""
    if not spec["method"].startswith("cfr_") or not (results / "records").is_dir():
        return None
    from cfrseg.provenance import code_version as core_code

    core, recs = core_code(), load_records(results / "records")
    for key, stages in ((teacher_key, TEACHER_STAGES), (finetune_key, TEACHER_STAGES[:1])):
        want = key(spec)
        for rec in recs:
            s = rec["spec"]
            if not s["method"].startswith("cfr_") or key(s) != want:
                continue
            run = results / "runs" / store_name(s)
            if not all((run / st).is_dir() for st in stages) or not (run / "report.json").is_file():
                continue
            if any(_stage_code(run / st) != core for st in stages):
                continue
            prior = rec["timing"].get("teacher")
            if prior and tuple(prior.get("stages", TEACHER_STAGES)) != stages:
                continue   # its own stages were partly made in its own run: the origin's seconds do not apply
            if prior:
                return dict(prior, **{"from": run.name, "stages": list(stages)})
            rep = json.loads((run / "report.json").read_text())
            return {"from": run.name, "origin": run.name, "stages": list(stages),
                    "stage_s": round(sum(rep["timings_s"][st] for st in stages), 1),
                    "peak_rss_mb": rep["peak_rss_mb"][stages[-1]]}
    return None


def adopt_trained(results: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """``spec``, or, when ``results`` holds no training of it but a finished one that differs only in the bench's
    commit (same core: :func:`run_records.code_tag`, both clean commits) and in the evaluated split, the spec of
    scoring that run: its training ``code``, plus ``evaluated_with`` = this code. So a run trained before the
    benchmark's own code changed (for example to add a split) is scored on another split without training it
    again; the record says which code scored it (``--score-trained``)."""
    if _finished(results, spec) or not code_tag(spec["code"]).startswith("core "):
        return spec
    skip = (*EVAL_ONLY, "code")
    want = {k: v for k, v in spec.items() if k not in skip}
    found = [r["spec"] for r in (load_records(results / "records") if (results / "records").is_dir() else [])
             if {k: v for k, v in r["spec"].items() if k not in skip} == want
             and code_tag(r["spec"]["code"]) == code_tag(spec["code"]) and _finished(results, r["spec"])]
    for s in found:          # the split was already scored (by the training run, or adopted before): that record
        if all(s.get(k) == spec.get(k) for k in ("split", "split_ids", "threads")):
            return s
    return dict(spec, code=found[0]["code"], evaluated_with=spec["code"]) if found else spec


def _finished(results: Path, spec: dict[str, Any]) -> bool:
    """:func:`trained` for the run folder of ``spec`` under ``results``."""
    return _finished_at(results / "runs" / store_name(spec), spec)


def _stage_code(stage_dir: Path) -> dict[str, Any] | None:
    """The cfrseg code version a stage's results were made with (None when it has no provenance record)."""
    p = stage_dir / "provenance.json"
    return json.loads(p.read_text()).get("code") if p.is_file() else None


def run_job(script: str, results: Path, specs: list[dict[str, Any]], data: str, name: str,
            reuse_teacher: bool = False) -> int:
    """Write the job file of ``specs`` (one training, its splits) under ``<results>/jobs`` and run it in a child
    process (``script --one JOB``); returns the child's exit status. ``reuse_teacher``: a ``cfr_*`` run starts
    from the teacher stages of a matching finished run (:func:`find_teacher`), when there is one."""
    job = results / "jobs" / f"{name}_{train_key(specs[0])[:16]}.json"
    job.parent.mkdir(parents=True, exist_ok=True)
    teacher = find_teacher(results, specs[0]) if reuse_teacher else None
    if teacher:
        print(f"   reusing the teacher stages {teacher['stages']} of {teacher['from']}", flush=True)
    job.write_text(json.dumps({"specs": specs, "data": str(data), "work": str(results / "runs"),
                               "results": str(results / "records"), "teacher": teacher}))
    return subprocess.run([sys.executable, script, "--one", str(job)], check=False).returncode


def add_run_arguments(ap: argparse.ArgumentParser, default_results: Path) -> None:
    """The options every quality benchmark shares: seeds, profile and overrides, threads, where records go,
    --summary-only, --plan and the internal --one (the child process of one run)."""
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--profile", default="lite")
    ap.add_argument("--set", action="append", default=[], help="profile override stage.key=JSON (all runs)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per run")
    ap.add_argument("--results", default=str(default_results), help="records in <results>/records, stores in "
                    "<results>/runs")
    ap.add_argument("--summary-only", action="store_true", help="only print the tables of stored records")
    ap.add_argument("--plan", action="store_true", help="print the runs and whether they are cached; run nothing")
    ap.add_argument("--reuse-teacher", action="store_true",
                    help="cfr_* runs copy the fine-tune and pseudo-label stages of a finished CFR run that differs "
                    "only in the re-train settings (failing that, the fine-tune stage of one that differs only in "
                    "the pseudo-label and re-train settings; the core's provenance check confirms them) and run "
                    "only the remaining stages; the record's wall time adds the copied stages' measured seconds")
    ap.add_argument("--score-trained", action="store_true",
                    help="a run trained by an earlier commit of the benchmarks (same cfrseg core, same settings) "
                    "is scored on the asked split instead of trained again; the record keeps the training "
                    "code and adds evaluated_with")
    ap.add_argument("--one", help=argparse.SUPPRESS)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--data", default=default_data("CFRSEG_LA_DIR", "la2018"))
    ap.add_argument("--split", nargs="+", default=["val"], choices=list(protocol.EVAL_SPLITS))
    ap.add_argument("--labeled", nargs="+", default=["4"], help="L values, or 'all' (the ceiling)")
    ap.add_argument("--methods", nargs="+", default=["supervised", "mt", "cfr_mt"])
    add_run_arguments(ap, DEFAULT_RESULTS)
    args = ap.parse_args(argv)
    if args.one:
        run_one(args.one)
        return 0
    results = Path(args.results)
    records_dir = results / "records"
    if not args.summary_only:
        ids, sha = protocol.read_ids(args.data)
        code = code_version()
        for m in args.methods:
            check_method(m)
        for L in args.labeled:
            n = protocol.resolve_labeled(L, len(protocol.split_ids(ids)["pool"]))
            for m in args.methods:
                if n == len(protocol.split_ids(ids)["pool"]) and m != "supervised":
                    print(f"== L={L} {m}: skipped (no unlabeled case left: the ceiling is supervised only)")
                    continue
                for seed in args.seeds:
                    specs = [make_spec(args, L, m, seed, s, code, ids, sha) for s in args.split]
                    if args.score_trained:
                        specs = [adopt_trained(results, s) for s in specs]
                    try:
                        todo = [s for s in specs if load_cached(records_dir, s) is None]
                    except StaleRecord as e:
                        print(f"error: {e}", file=sys.stderr)
                        return 2
                    tag = f"L={n} {m} seed={seed} split(s) {[s['split'] for s in specs]}"
                    if not todo:
                        print(f"== {tag}: cached")
                        continue
                    print(f"== {tag}: {'would run' if args.plan else 'running'} {[s['split'] for s in todo]}",
                          flush=True)
                    if args.plan:
                        continue
                    rc = run_job(__file__, results, todo, args.data, f"{m}_L{n}_seed{seed}",
                                 reuse_teacher=args.reuse_teacher)
                    if rc != 0:
                        print(f"== {tag}: failed (exit {rc})", file=sys.stderr)
                        return 1
    from quality_summary import summary_png, to_markdown

    try:
        recs = load_records(records_dir) if records_dir.is_dir() else []
    except StaleRecord as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for s in args.split:
        print(to_markdown(recs, s))
        png = summary_png(recs, s, results / f"quality_la_{s}.png")
        if png is not None:
            print(f"chart: {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
