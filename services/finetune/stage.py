"""Adapter from the service's StageContext to the core ``cfrseg.stages.finetune.run_finetune`` (imported lazily)."""

from __future__ import annotations

import importlib
from typing import Any

from services.common.stage import StageContext, stage_config


def run(ctx: StageContext) -> Any:
    core = importlib.import_module("cfrseg.stages.finetune")
    cfg = stage_config(core.FinetuneConfig, ctx)
    return core.run_finetune(cfg, ctx.manifest, ctx.store, progress=ctx.progress, cancel=ctx.cancel)
