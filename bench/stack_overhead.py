"""Stack overhead: the same tiny pipeline in-process vs through the local stack, and gateway upload throughput.

    python bench/stack_overhead.py [--la-dir DIR] [--profile tiny] [--upload-mb 100] [--repeat 1]

1. In-process: ``cfrseg.stages.pipeline.run_pipeline`` on 3 LA cases cropped to 48x48x32 (1 labeled, 1 unlabeled,
   1 test) into a local folder.
2. Through the stack (``services.stack.LocalStack``: redis-server, nanio, 4 services, worker; started before the
   clock starts): upload the 6 files, create the dataset, submit, watch until SUCCEEDED.
3. Upload of a ~100 MB uncompressed NIfTI volume through the gateway (client stream of 1 MiB chunks, sha256
   checked, volume validated, stored in S3), in MB/s (10^6 bytes/s).

Targets (issue): overhead <= 10 % + 15 s; upload >= 50 MB/s on loopback. Results: bench/results/stack_overhead.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import write_json


def in_process(data: Path, profile: str, out: Path) -> float:
    from cfrseg.config import load_profile
    from cfrseg.data.datasets import build_manifest
    from cfrseg.stages.pipeline import PipelineConfig, run_pipeline
    from cfrseg.store import LocalStore

    cfg = PipelineConfig.from_profile(load_profile(profile), ssl="mt", profile=profile)
    m = build_manifest(data, labeled=1, holdout=1, num_classes=2)
    t0 = time.monotonic()
    run_pipeline(cfg, m, LocalStore(out))
    return time.monotonic() - t0


def through_stack(stack, data: Path, profile: str) -> tuple[float, dict]:
    from services.sdk import Client, state_name

    with Client(stack.addr("gateway"), stack.token) as c:
        t0 = time.monotonic()
        ds = c.create_dataset(data, labeled=1, holdout=1, name="bench", num_classes=2)
        t_up = time.monotonic() - t0
        run = c.submit_run(ds.dataset_id, profile=profile, ssl_method="mt")
        final = c.wait_run(run.run_id, timeout=3600)
        wall = time.monotonic() - t0
        if state_name(final.state) != "SUCCEEDED":
            raise SystemExit(f"run failed: {final.error}")
        stages = {s.stage: round(s.finished.ToNanoseconds() / 1e9 - s.started.ToNanoseconds() / 1e9, 2)
                  for s in final.stages if s.started.seconds and s.finished.seconds}
        return wall, {"dataset_upload_s": round(t_up, 2), "stage_s": stages, "metrics": dict(final.metrics)}


def upload_throughput(stack, mb: int, tmp: Path) -> dict:
    from cfrseg.data.io import write_volume
    from cfrseg.data.volume import Volume
    from services.sdk import Client, sha256_file

    z = max(2, int(mb * 1e6 / (256 * 256 * 4)))
    v = Volume(np.random.default_rng(0).normal(size=(256, 256, z)).astype(np.float32), (1.0, 1.0, 1.0),
               (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    p = tmp / "big.nii"
    write_volume(v, p)
    size = p.stat().st_size
    digest = sha256_file(p)
    with Client(stack.addr("gateway"), stack.token) as c:
        times = []
        for _ in range(2):
            t0 = time.monotonic()
            up = c.upload_volume(p, "image", sha256=digest)
            times.append(time.monotonic() - t0)
            assert up.ref.size == size
    best = min(times)
    return {"bytes": size, "seconds": [round(t, 3) for t in times], "mb_per_s": round(size / best / 1e6, 1),
            "note": "client sha256 computed before the clock; includes server hashing, volume check and S3 put"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--la-dir", default=os.environ.get("CFRSEG_LA_DIR", str(ROOT.parent / "shared/data/la2018")))
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--upload-mb", type=int, default=100)
    a = ap.parse_args(argv)

    from services.stack import LocalStack
    from tests.test_stack_e2e import crop_la_cases

    la = Path(a.la_dir)
    ids = [x.strip() for x in (la / "train.list").read_text().splitlines() if x.strip()][:3]
    with tempfile.TemporaryDirectory(prefix="cfrseg-bench-") as t:
        tmp = Path(t)
        data = crop_la_cases(la, ids, tmp / "la3")
        t_in = in_process(data, a.profile, tmp / "inproc")
        print(f"in-process pipeline: {t_in:.1f} s")
        stack = LocalStack(tmp / "stack", env={"CFRSEG_DEVICE": "cpu"})
        t0 = time.monotonic()
        stack.up()
        t_startup = time.monotonic() - t0
        try:
            t_stack, detail = through_stack(stack, data, a.profile)
            print(f"through the stack: {t_stack:.1f} s (stack start-up {t_startup:.1f} s, not counted)")
            up = upload_throughput(stack, a.upload_mb, tmp)
            print(f"upload {up['bytes'] / 1e6:.0f} MB: {up['mb_per_s']} MB/s")
        finally:
            stack.down()
    overhead = t_stack - t_in
    budget = 0.10 * t_in + 15.0
    res = {"profile": a.profile, "in_process_s": round(t_in, 2), "stack_s": round(t_stack, 2),
           "overhead_s": round(overhead, 2), "overhead_budget_s": round(budget, 2),
           "overhead_ok": overhead <= budget, "stack_startup_s": round(t_startup, 2), "stack_detail": detail,
           "upload": up, "upload_ok": up["mb_per_s"] >= 50}
    print(f"overhead {overhead:.1f} s (budget {budget:.1f} s): {'OK' if res['overhead_ok'] else 'OVER'}; "
          f"upload {'OK' if res['upload_ok'] else 'BELOW 50 MB/s'}")
    print(f"results: {write_json('stack_overhead', res)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
