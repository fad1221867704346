"""LoRA on q and v of every image-encoder attention block (SAMed/CFR layout), with ``peft``.

SAM's ViT and TinyViT attention use one fused ``qkv`` Linear. :func:`split_qkv` replaces it by an exact
:class:`SplitQKV` (children ``q``, ``k``, ``v``: rows copied from the fused weight; the forward re-assembles
the fused output layout, so outputs are unchanged). peft then puts LoRA on ``q`` and ``v`` only:
``delta = (alpha / r) * B(A(dropout(x)))``, A Kaiming-uniform, B zero (zero delta at injection). Default
alpha = r (scale 1, as the reference code, which has no scaling).

Trainable set (:func:`trainable_parameters`): LoRA A/B, the whole mask decoder except its IoU head, and the
prompt encoder's ``no_mask_embed``; plus, where :func:`cfrseg.sam.tail.mark_tail_trainable` set them, the
encoder parts named by ``model.cfr_trainable_prefixes`` (``finetune.encoder_tail``). :func:`lora_state_dict`
holds exactly those tensors (keys as in ``model.state_dict()``); the frozen base comes from the base checkpoint
(recorded by hash in ``model.info``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from cfrseg.errors import ConfigError, InputError

LORA_TARGETS = r"image_encoder\..*\.qkv\.(q|v)"


class SplitQKV(nn.Module):
    """Drop-in for a fused qkv Linear (in -> 3*dim): x (..., in) -> (..., 3*dim), computed by three Linears.

    ``layout``: "fused" = output [q | k | v] (SAM ViT); "per_head" = [q_h, k_h, v_h] per head (TinyViT).
    """

    def __init__(self, fused: nn.Linear, layout: str = "fused", num_heads: int = 1) -> None:
        super().__init__()
        if layout not in ("fused", "per_head"):
            raise ConfigError(f"unknown qkv layout {layout!r}")
        out = fused.out_features
        if out % 3 or (layout == "per_head" and out % (3 * num_heads)):
            raise ConfigError(f"cannot split a qkv Linear with {out} outputs ({num_heads} heads)")
        self.layout, self.num_heads = layout, num_heads
        rows = self._rows(out, layout, num_heads)
        has_bias = fused.bias is not None
        w = fused.weight.detach()
        for name, idx in zip("qkv", rows):
            lin = nn.Linear(fused.in_features, out // 3, bias=has_bias).to(w)
            with torch.no_grad():
                lin.weight.copy_(w[idx])
                if has_bias:
                    lin.bias.copy_(fused.bias.detach()[idx])
            setattr(self, name, lin)

    @staticmethod
    def _rows(out: int, layout: str, heads: int) -> list[torch.Tensor]:
        if layout == "fused":
            return [torch.arange(i * out // 3, (i + 1) * out // 3) for i in range(3)]
        hd = out // (3 * heads)
        base = torch.arange(heads)[:, None] * 3 * hd + torch.arange(hd)[None, :]
        return [(base + i * hd).flatten() for i in range(3)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.layout == "fused":
            return torch.cat([q, k, v], dim=-1)
        h = self.num_heads
        parts = [t.unflatten(-1, (h, t.shape[-1] // h)) for t in (q, k, v)]
        return torch.cat(parts, dim=-1).flatten(-2)

    def fuse(self) -> nn.Linear:
        """The equivalent fused Linear (q, k, v must be plain Linears: merge LoRA first)."""
        q, k, v = self.q, self.k, self.v
        out = 3 * q.out_features
        lin = nn.Linear(q.in_features, out, bias=q.bias is not None).to(q.weight)
        rows = self._rows(out, self.layout, self.num_heads)
        with torch.no_grad():
            for part, idx in zip((q, k, v), rows):
                lin.weight[idx] = part.weight
                if part.bias is not None:
                    lin.bias[idx] = part.bias
        return lin


def split_qkv(encoder: nn.Module) -> int:
    """Replace every attention module's fused ``qkv`` Linear under ``encoder`` by :class:`SplitQKV`. Returns the
    number replaced (0 when already split)."""
    n = 0
    for mod in encoder.modules():
        qkv = getattr(mod, "qkv", None)
        if isinstance(qkv, nn.Linear):
            mod.qkv = SplitQKV(qkv, getattr(mod, "qkv_layout", "fused"), getattr(mod, "num_heads", 1))
            n += 1
    return n


def _is_trainable(name: str, extra: tuple[str, ...] = ()) -> bool:
    if "lora_" in name or (extra and name.startswith(extra)):
        return True
    if name.startswith("mask_decoder."):
        return not name.startswith("mask_decoder.iou_prediction_head.")
    return name == "prompt_encoder.no_mask_embed.weight"


def _extra(model: nn.Module) -> tuple[str, ...]:
    return tuple(getattr(model, "cfr_trainable_prefixes", ()) or ())


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Set ``requires_grad`` so that only LoRA, the mask decoder (minus the IoU head) and ``no_mask_embed``
    train; return those parameters (for the optimizer)."""
    out = []
    extra = _extra(model)
    for name, p in model.named_parameters():
        p.requires_grad_(_is_trainable(name, extra))
        if p.requires_grad:
            out.append(p)
    return out


def inject_lora(model: nn.Module, rank: int = 4, alpha: float | None = None, dropout: float = 0.0) -> nn.Module:
    """Split qkv and add LoRA (rank ``rank``, scale alpha/rank; alpha None = rank) to q and v of every attention
    block of ``model.image_encoder`` (a CfrSam or segment-anything Sam), in place; sets the trainable set."""
    if rank < 1 or dropout < 0 or dropout >= 1:
        raise ConfigError(f"LoRA needs rank >= 1 and 0 <= dropout < 1 (got {rank}, {dropout})")
    if getattr(model, "lora_config", None):
        raise ConfigError("LoRA is already injected into this model")
    if split_qkv(model.image_encoder) == 0 and not any(isinstance(m, SplitQKV) for m in model.modules()):
        raise ConfigError("no fused qkv attention found in the image encoder")
    alpha = float(rank if alpha is None else alpha)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS, bias="none")
    inject_adapter_in_model(cfg, model)
    model.lora_config = {"rank": rank, "alpha": alpha, "dropout": dropout}
    trainable_parameters(model)
    return model


def lora_parameter_count(model: nn.Module) -> int:
    """Number of LoRA parameters (A and B matrices)."""
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The fine-tuned tensors: LoRA A/B, mask decoder (minus IoU head) and ``no_mask_embed`` (detached)."""
    extra = _extra(model)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if _is_trainable(k, extra)}


def load_lora_state_dict(model: nn.Module, sd: dict[str, Any]) -> None:
    """Load what :func:`lora_state_dict` saved into a model with LoRA injected the same way (same base, rank and
    num_classes). Raises InputError naming missing/unexpected keys or shape mismatches."""
    own = model.state_dict()
    extra = _extra(model)
    want = {k for k in own if _is_trainable(k, extra)}
    unexpected = sorted(set(sd) - want)
    missing = sorted(want - set(sd))
    bad = sorted(k for k in set(sd) & want if tuple(sd[k].shape) != tuple(own[k].shape))
    if unexpected or missing or bad:
        raise InputError(
            f"fine-tune weights do not fit this model (LoRA rank / encoder tail / num_classes / base model "
            f"differ?): "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatch {bad[:5]}"
        )
    model.load_state_dict(sd, strict=False)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold LoRA into the base weights and restore plain fused ``qkv`` Linears (in place; returns model). The
    merged model has the base model's structure and the same outputs (up to float rounding)."""
    for mod in list(model.modules()):
        qkv = getattr(mod, "qkv", None)
        if not isinstance(qkv, SplitQKV):
            continue
        for part in ("q", "k", "v"):
            sub = getattr(qkv, part)
            if isinstance(sub, LoraLayer):
                sub.merge()
                setattr(qkv, part, sub.get_base_layer())
        mod.qkv = qkv.fuse()
    if hasattr(model, "lora_config"):
        model.lora_config = None
    return model
