"""Adapter from the service's StageContext to the core ``cfrseg.stages.finetune.run_finetune`` (imported lazily).

The base checkpoint is server-side: a config without ``checkpoint`` gets the registry weight of its SAM model from
the weights folder (``lite_medsam`` -> ``lite_medsam.pth``, ``vit_b`` -> ``sam_vit_b_01ec64.pth``), which the
service checked at Start; nothing is downloaded.
"""

from __future__ import annotations

import importlib
from typing import Any

from cfrseg.sam.weights import WEIGHTS, weight_for_model
from services.common.stage import StageContext, stage_config


def with_default_checkpoint(ctx: StageContext) -> dict[str, Any]:
    """``ctx.config`` with ``checkpoint`` set to the weights folder's file of its model, when it names none."""
    cfg = dict(ctx.config)
    name = weight_for_model(cfg.get("model"))
    if not cfg.get("checkpoint") and name and ctx.weights is not None:
        cfg["checkpoint"] = str(ctx.weights / WEIGHTS[name].filename)
    return cfg


def run(ctx: StageContext) -> Any:
    core = importlib.import_module("cfrseg.stages.finetune")
    ctx.config = with_default_checkpoint(ctx)
    cfg = stage_config(core.FinetuneConfig, ctx)
    return core.run_finetune(cfg, ctx.manifest, ctx.store, progress=ctx.progress, cancel=ctx.cancel)
