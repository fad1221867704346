"""Adapters to the core: ``cfrseg.stages.retrain.run_retrain`` (imported lazily) and segmentation with a model.

Input ``pseudo_labels``: prefix of the pseudo-label files (``runs/{run_id}/pseudolabel/labels/``), named
``{case_id}.nii.gz``; they are downloaded and set as the unlabeled cases' ``pseudo_label``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from services.common.inputs import fetch_prefix
from services.common.stage import StageContext, stage_config

SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


def case_id_of(name: str) -> str:
    for s in SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)]
    return name


def run(ctx: StageContext) -> Any:
    manifest = ctx.manifest
    if "pseudo_labels" in ctx.inputs:
        src = ctx.inputs["pseudo_labels"]
        files = fetch_prefix(src, "", ctx.workdir / "pseudo_labels")
        manifest = manifest.with_pseudo_labels({case_id_of(Path(k).name): p for k, p in files.items()})
    core = importlib.import_module("cfrseg.stages.retrain")
    cfg = stage_config(core.RetrainConfig, ctx)
    return core.run_retrain(cfg, manifest, ctx.store, progress=ctx.progress, cancel=ctx.cancel)


def segment(model_dir: Path, image: Path, out: Path, overrides: dict[str, Any], device: str) -> dict[str, Any]:
    """Segment ``image`` with the model in ``model_dir`` (``model.pt``) and write the label map to ``out``."""
    infer = importlib.import_module("cfrseg.stages.infer")
    cio = importlib.import_module("cfrseg.data.io")
    model, meta = infer.load_model(model_dir, device or "auto")
    cfg = infer.InferConfig.from_dict({**(meta.get("infer") or {}), **overrides})
    label = infer.segment_volume(model, cio.read_volume(image), cfg, meta.get("preprocess"))
    cio.write_volume(label, out, label=True)
    return {"num_classes": int(meta.get("num_classes", 0))}
