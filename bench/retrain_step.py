"""Re-training cost per iteration of each SSL method at lite settings, on synthetic multi-class volumes.

The lite profile's re-training (V-Net n_filters 8 with dropout, patch 64x64x48, batch 2 labeled + 2 unlabeled,
channels-last on CPU) on synthetic K-class volumes (tests/synth.py boxes, 128x128x64), pseudo-labels given
(so L_pl is computed, as in CFR runs). Per method: seconds per iteration (min and median over the timed
iterations, after one warm-up iteration) and peak RSS of the subprocess. Numbers are for planning run lengths,
not quality.

    .venv/bin/python bench/retrain_step.py [--classes 4] [--iterations 6] [--methods mt magicnet ...]

Results: a table on stdout and bench/results/retrain_step_k<K>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from _common import format_rows, write_json

ROOT = Path(__file__).resolve().parents[1]

_CHILD = textwrap.dedent('''
    import json, resource, sys, tempfile, time
    from pathlib import Path
    import numpy as np, torch
    sys.path.insert(0, sys.argv[5])
    torch.set_num_threads(int(sys.argv[4]))
    from tests.synth import synthetic_manifest
    from cfrseg.stages.retrain import RetrainConfig, run_retrain
    from cfrseg.store import LocalStore

    ssl, k, iters = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    with tempfile.TemporaryDirectory() as d:
        m = synthetic_manifest(Path(d) / "data", k, 6, labeled=2, holdout=0, shape=(128, 128, 64))
        m = m.with_pseudo_labels({c.case_id: c.label for c in m.unlabeled})
        cfg = RetrainConfig(network="vnet", network_kwargs={"n_filters": 8, "has_dropout": True}, ssl=ssl,
                            iterations=iters + 1, patch=(64, 64, 48), batch_labeled=2, batch_unlabeled=2,
                            lr_schedule="poly", uamt_T=4, device="cpu", checkpoint_interval_s=3600.0)
        stamps = []
        run_retrain(cfg, m, LocalStore(Path(d) / "rt"), progress=lambda ev: stamps.append(time.perf_counter()))
    steps = np.diff(stamps)        # iteration i + 1 duration = stamp(i + 1) - stamp(i); the first is warm-up
    print(json.dumps({"s_per_it_min": float(steps.min()), "s_per_it_median": float(np.median(steps)),
                      "timed": len(steps), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
''')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--iterations", type=int, default=6, help="timed iterations per method (after 1 warm-up)")
    ap.add_argument("--methods", nargs="*", default=["none", "mt", "magicnet"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    script = Path(os.environ.get("TMPDIR", "/tmp")) / f"cfrseg_retrain_step_{os.getpid()}.py"
    script.write_text(_CHILD)
    rows = [["method", "s/it (min)", "s/it (median)", "timed its", "peak RSS (MB)"]]
    results = {}
    try:
        for ssl in args.methods:
            p = subprocess.run([sys.executable, str(script), ssl, str(args.classes), str(args.iterations),
                                str(args.threads), str(ROOT)], capture_output=True, text=True, check=False)
            if p.returncode != 0:
                raise SystemExit(f"{ssl} failed:\n{p.stderr[-3000:]}")
            r = json.loads(p.stdout.strip().splitlines()[-1])
            results[ssl] = r
            rows.append([ssl, f"{r['s_per_it_min']:.2f}", f"{r['s_per_it_median']:.2f}", str(r["timed"]),
                         f"{r['peak_rss_mb']:.0f}"])
            print(rows[-1], flush=True)
    finally:
        script.unlink(missing_ok=True)
    print(format_rows(rows))
    path = write_json(f"retrain_step_k{args.classes}", {"classes": args.classes, "threads": args.threads,
                                                        "settings": "lite: vnet n_filters 8, patch 64x64x48, 2+2",
                                                        "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
