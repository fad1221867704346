"""A test double of the three core stages for orchestration tests (``CFRSEG_STAGE_IMPL=tests.fake_stages:run``,
``CFRSEG_SEGMENT_IMPL=tests.fake_stages:segment``): seconds-long, checkpointing every step, resuming from the
checkpoint, honouring cancel, and recording each execution's first step in ``executions.json`` so tests can
check that a finished stage never ran twice and that a resumed one started from its checkpoint.

Steps and step time come from the stage service's environment: ``CFRSEG_FAKE_STEPS`` (default 5) and
``CFRSEG_FAKE_STEP_S`` (default 0.2).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from cfrseg.data.io import read_volume, write_volume
from cfrseg.errors import Cancelled, InputError
from cfrseg.progress import ProgressEvent
from cfrseg.store import get_json, put_json

ARTIFACT = {"finetune": "finetune.pt", "pseudolabel": "done.json", "retrain": "model.pt"}


def run(ctx: Any) -> dict[str, Any]:
    steps = int(os.environ.get("CFRSEG_FAKE_STEPS", "5"))
    step_s = float(os.environ.get("CFRSEG_FAKE_STEP_S", "0.2"))
    store = ctx.store
    execs = get_json(store, "executions.json") if store.exists("executions.json") else []
    if store.exists(ARTIFACT[ctx.stage]):
        return {"steps": steps, "resumed": True}
    start = get_json(store, "checkpoint.json")["step"] if store.exists("checkpoint.json") else 0
    execs.append({"start": start, "time": time.time()})
    put_json(store, "executions.json", execs)
    for step in range(start, steps):
        if ctx.cancel.is_set():
            raise Cancelled(f"{ctx.stage} cancelled")
        time.sleep(step_s)
        put_json(store, "checkpoint.json", {"step": step + 1})
        ctx.progress(ProgressEvent(ctx.stage, step + 1, steps, {"loss": 1.0 / (step + 1)}, "",
                                   step_s * (steps - step - 1)))
    if ctx.stage == "pseudolabel":
        for c in ctx.manifest.unlabeled:
            v = read_volume(c.image)
            lab = v.with_array((v.array > np.median(v.array)).astype(np.uint8))
            out = Path(ctx.workdir) / f"{c.case_id}.nii.gz"
            write_volume(lab, out, label=True)
            store.put_file(f"labels/{c.case_id}.nii.gz", out)
    if ctx.stage == "retrain":
        have = {Path(k).name.split(".")[0] for k in ctx.inputs["pseudo_labels"].list()}
        missing = [c.case_id for c in ctx.manifest.unlabeled if c.case_id not in have]
        if missing:
            raise InputError(f"retrain: no pseudo-labels for {missing}")
    store.put_bytes(ARTIFACT[ctx.stage], json.dumps({"stage": ctx.stage}).encode())
    return {"steps": steps, "network": "fake", "num_classes": ctx.manifest.num_classes}


def segment(model_dir: Path, image: Path, out: Path, overrides: dict[str, Any], device: str) -> dict[str, Any]:
    time.sleep(float(os.environ.get("CFRSEG_FAKE_SEGMENT_S", "0")))  # a slow segmentation (worker-kill tests)
    v = read_volume(image)
    write_volume(v.with_array((v.array > np.median(v.array)).astype(np.uint8)), out, label=True)
    return {"num_classes": 2}
