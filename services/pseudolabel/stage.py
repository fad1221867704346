"""Adapter to the core ``cfrseg.stages.pseudolabel.run_pseudolabel`` (imported lazily).

Input ``finetuned``: the fine-tune stage's prefix (``runs/{run_id}/finetune/``), given to the core as a Store.
"""

from __future__ import annotations

import importlib
from typing import Any

from cfrseg.errors import InputError
from services.common.stage import StageContext, stage_config


def run(ctx: StageContext) -> Any:
    if "finetuned" not in ctx.inputs:
        raise InputError("pseudolabel needs input 'finetuned' (the fine-tune stage's prefix)")
    core = importlib.import_module("cfrseg.stages.pseudolabel")
    cfg = stage_config(core.PseudolabelConfig, ctx)
    return core.run_pseudolabel(cfg, ctx.manifest, ctx.store, finetuned=ctx.inputs["finetuned"],
                                progress=ctx.progress, cancel=ctx.cancel)
