"""Pseudo-label quality of the fine-tuned SAM alone on LA 2018 (the paper's CFR_FT row), with timings.

Fine-tunes with the profile's "finetune" section (default `lite`, overridable with --set finetune.key=value) on
the first --labeled cases of train.list, then runs `evaluate_sam` (exactly the pseudo-label path) on --eval
cases taken from the unlabeled part (default ids 20..25 of train.list). Prints Dice / HD95 (foreground),
fine-tune time, per-volume pseudo-label time and peak RSS; appends the run to bench/results/sam_quality_la.json
(one entry per --tag). Uses 2 torch threads unless --threads says otherwise.

  .venv/bin/python bench/sam_quality_la.py --tag cache48 --set finetune.embedding_cache=48 \
      --set finetune.lora_rank=0 --set finetune.iterations=600 --set pseudolabel.tta=false
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, _clean, default_data, host_info, peak_rss_mb  # noqa: E402


def _apply_sets(prof: dict, sets: list[str]) -> None:
    for item in sets:
        k, _, v = item.partition("=")
        st, _, name = k.partition(".")
        if not name:
            raise SystemExit(f"--set wants stage.key=value, got {item!r}")
        try:
            prof.setdefault(st, {})[name] = json.loads(v)
        except json.JSONDecodeError:
            prof.setdefault(st, {})[name] = v


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=default_data("CFRSEG_LA_DIR", "la2018"))
    ap.add_argument("--profile", default="lite")
    ap.add_argument("--labeled", type=int, default=4, help="first L cases of train.list are fine-tuned on")
    ap.add_argument("--eval", type=int, default=6, help="number of evaluated cases")
    ap.add_argument("--eval-start", type=int, default=20, help="index in train.list of the first evaluated case")
    ap.add_argument("--set", action="append", default=[], help="stage.key=JSON value (finetune / pseudolabel)")
    ap.add_argument("--tta", default=None, help="comma list of extra pseudolabel.tta values to evaluate too, "
                    "e.g. 'true' (the same fine-tuned model, one evaluation each)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="run")
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from cfrseg.config import load_profile
    from cfrseg.data.manifest import Case, Manifest
    from cfrseg.stages.finetune import FinetuneConfig, run_finetune
    from cfrseg.stages.pseudolabel import PseudolabelConfig, evaluate_sam
    from cfrseg.store import LocalStore

    la = Path(args.data)
    ids = (la / "train.list").read_text().split()
    prof = load_profile(args.profile)
    _apply_sets(prof, args.set)
    ft_cfg = FinetuneConfig.from_dict({k: v for k, v in prof["finetune"].items() if not k.startswith("_")})
    pl_sec = {k: v for k, v in prof.get("pseudolabel", {}).items() if not k.startswith("_")}
    ev_ids = ids[args.eval_start : args.eval_start + args.eval]
    cases = [Case(c, str(la / c / "mri_norm2.h5"), str(la / c / "mri_norm2.h5"), "labeled")
             for c in ids[: args.labeled]]
    cases += [Case(c, str(la / c / "mri_norm2.h5"), str(la / c / "mri_norm2.h5"), "test") for c in ev_ids]
    data = Manifest("la2018", 2, tuple(cases), (0.625, 0.625, 0.625))

    tmp = tempfile.TemporaryDirectory() if args.out is None else None
    work = Path(args.out or tmp.name)
    t0 = time.perf_counter()
    res_ft = run_finetune(ft_cfg, data, LocalStore(work / "finetune"))
    ft_s = time.perf_counter() - t0
    hist = res_ft.history
    runs = {}
    ttas = [pl_sec.get("tta", False)] + [json.loads(t) for t in (args.tta.split(",") if args.tta else [])]
    for tta in ttas:
        pl_cfg = PseudolabelConfig.from_dict(dict(pl_sec, tta=tta))
        ev = evaluate_sam(pl_cfg, data, LocalStore(work / "finetune"), case_ids=ev_ids)
        fg = {m: ev["summary"][m] for m in ev["summary"]} if isinstance(ev["summary"], dict) else ev["summary"]
        dices = [c["dice"][0] if isinstance(c["dice"], (list, tuple)) else c["dice"] for c in ev["cases"].values()]
        hd = [c["hd95"][0] if isinstance(c["hd95"], (list, tuple)) else c["hd95"] for c in ev["cases"].values()]
        runs[f"tta={tta}"] = {
            "dice_per_case": dices, "dice": sum(dices) / len(dices),
            "hd95": (sum(h for h in hd if h == h) / max(1, sum(1 for h in hd if h == h))),
            "seconds_per_volume": sum(ev["seconds"].values()) / len(ev["seconds"]), "summary": fg,
        }
    out = {
        "tag": args.tag, "profile": args.profile, "labeled": args.labeled, "eval_ids": ev_ids, "sets": args.set,
        "finetune_config": ft_cfg.to_dict(), "pseudolabel": pl_sec, "finetune_s": ft_s,
        "first_ce": hist[0]["ce"] if hist else None, "last_loss": hist[-1]["loss"] if hist else None,
        "last10_ce": sum(h["ce"] for h in hist[-10:]) / max(1, len(hist[-10:])),
        "last10_dice_loss": sum(h["dice"] for h in hist[-10:]) / max(1, len(hist[-10:])),
        "eval": runs, "peak_rss_mb": peak_rss_mb(), "host": host_info(),
    }
    for k, r in runs.items():
        print(f"[{args.tag}] {k}: Dice {r['dice']:.4f} HD95 {r['hd95']:.2f} mm | fine-tune {ft_s:.0f} s | "
              f"{r['seconds_per_volume']:.1f} s/volume | first CE {out['first_ce']:.3f} | "
              f"peak RSS {out['peak_rss_mb']:.0f} MiB | per case {[round(d, 3) for d in r['dice_per_case']]}")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / "sam_quality_la.json"
    allr = json.loads(path.read_text()) if path.is_file() else {}
    allr[args.tag] = _clean(out)
    path.write_text(json.dumps(allr, indent=2) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return out


if __name__ == "__main__":
    main()
