"""Training the end of SAM's image encoder on cached activations (``finetune.encoder_tail``).

Lite fine-tunes the mask decoder on embeddings of a frozen encoder, cached once (docs/finetune.md). A stronger
teacher can also adapt the encoder's last parts while keeping the cache: the cache then holds the activations
*before* those parts (the "head" of the encoder runs once per mosaic), and every step runs the trainable tail
forward and backward. Tails, from cheapest:

- ``"none"``: frozen encoder (the cache holds embeddings);
- ``"neck"``: the neck (1x1 and 3x3 convolutions with LayerNorms) trains;
- ``"last_stage"``: the last stage too (TinyViT: its attention blocks; ViT: the last block) and the neck.

``encode_head(sam, images, tail)`` followed by ``apply_tail(sam, acts, tail)`` is exactly ``sam.embed(images)``
(tests/test_finetune_tail.py checks it for both encoder families). :func:`mark_tail_trainable` adds the tail's
parameters to the trainable set that :mod:`cfrseg.sam.lora` saves and loads (the fine-tune delta).
Cost on this project's CPU (bench/sam_speed.py --cached-steps, LiteMedSAM, batch 4): a step trains 1.6x
(neck) and 5x (last stage) slower than the decoder alone.
"""

from __future__ import annotations

import torch
from torch import nn

from cfrseg.errors import ConfigError
from cfrseg.sam.tinyvit import TinyViT

TAILS = ("none", "neck", "last_stage")


def _check(tail: str) -> None:
    if tail not in TAILS:
        raise ConfigError(f"encoder tail must be one of {list(TAILS)}, got {tail!r}")


def _is_vit(encoder: nn.Module) -> bool:
    return all(hasattr(encoder, a) for a in ("patch_embed", "blocks", "neck")) and not isinstance(encoder, TinyViT)


def tail_prefixes(sam: nn.Module, tail: str) -> tuple[str, ...]:
    """State-dict key prefixes (of ``sam``) of the encoder parts that ``tail`` trains."""
    _check(tail)
    if tail == "none":
        return ()
    enc = sam.image_encoder
    out = ["image_encoder.neck."]
    if tail == "last_stage":
        if isinstance(enc, TinyViT):
            out.insert(0, f"image_encoder.layers.{len(enc.layers) - 1}.")
        elif _is_vit(enc):
            out.insert(0, f"image_encoder.blocks.{len(enc.blocks) - 1}.")
        else:
            raise ConfigError(f"encoder_tail 'last_stage' does not know the encoder {type(enc).__name__}")
    elif not (isinstance(enc, TinyViT) or _is_vit(enc)):
        raise ConfigError(f"encoder_tail 'neck' does not know the encoder {type(enc).__name__}")
    return tuple(out)


def mark_tail_trainable(sam: nn.Module, tail: str) -> list[nn.Parameter]:
    """Make the tail's parameters trainable and remember them on ``sam`` (``cfr_trainable_prefixes``, read by
    the delta's save/load in :mod:`cfrseg.sam.lora`). Returns the tail's parameters."""
    prefixes = tail_prefixes(sam, tail)
    sam.cfr_trainable_prefixes = prefixes
    params = []
    for name, p in sam.named_parameters():
        if name.startswith(prefixes) and prefixes:
            p.requires_grad_(True)
            params.append(p)
    return params


def encode_head(sam: nn.Module, images: torch.Tensor, tail: str) -> torch.Tensor:
    """Images (B, 3, S, S) in [0, 1] -> the activations that enter the tail (the embeddings for ``"none"``)."""
    _check(tail)
    if tail == "none":
        return sam.embed(images)
    enc = sam.image_encoder
    x = enc.patch_embed(sam.preprocess(images))
    if isinstance(enc, TinyViT):
        for layer in enc.layers[:-1]:
            x = layer(x)
        return enc.layers[-1](x) if tail == "neck" else x
    if getattr(enc, "pos_embed", None) is not None:
        x = x + enc.pos_embed
    blocks = enc.blocks if tail == "neck" else enc.blocks[:-1]
    for blk in blocks:
        x = blk(x)
    return x.permute(0, 3, 1, 2) if tail == "neck" else x


def apply_tail(sam: nn.Module, acts: torch.Tensor, tail: str) -> torch.Tensor:
    """The activations of :func:`encode_head` -> image embeddings (B, C, h, w)."""
    _check(tail)
    if tail == "none":
        return acts
    enc = sam.image_encoder
    x = acts
    if tail == "last_stage":
        if isinstance(enc, TinyViT):
            x = enc.layers[-1](x)
        else:
            x = enc.blocks[-1](x).permute(0, 3, 1, 2)
    return enc.neck(x)
