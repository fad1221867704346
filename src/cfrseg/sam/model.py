"""SAM-family models for the fine-tune and pseudo-label stages, and the prompt-free multi-class head.

Registry ``SAM_MODELS`` (name -> :class:`SamSpec`):

- ``vit_b``, ``vit_l``, ``vit_h``: Meta's SAM built with ``segment_anything.modeling``; weights from a checkpoint
  file the user gives (e.g. ``sam_vit_b_01ec64.pth``). Input 1024 by default; another size (multiple of 16)
  resizes the absolute position embedding (bicubic) and the global-attention relative position tables (linear).
- ``lite_medsam``: LiteMedSAM = :class:`cfrseg.sam.tinyvit.TinyViT` (256x256 input, 256x64x64 embedding) +
  segment-anything's PromptEncoder and MaskDecoder. Default checkpoint: the cached file of
  :func:`cfrseg.sam.weights.fetch` (``python -m cfrseg.sam.weights fetch lite_medsam``). Strict key matching.
- ``tiny`` (ViT encoder) and ``tiny_lite`` (TinyViT encoder): small random models built by the same code paths,
  for tests only (never presented as results).

Input normalisation (all models): :class:`CfrSam` takes images (B, 3, S, S) with values in [0, 1] (a mosaic of
per-volume min-max scaled intensities, replicated to 3 channels), then applies the model's own pixel mean/std
expressed in [0, 1] units: LiteMedSAM was trained on [0, 1] images without mean/std, so mean 0 / std 1;
Meta's SAM was trained on 0..255 RGB normalised by ImageNet mean/std, so (x*255 - mean)/std, i.e.
mean = (123.675, 116.28, 103.53)/255, std = (58.395, 57.12, 57.375)/255.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn

from cfrseg.errors import ConfigError, InputError, NotFoundError
from cfrseg.sam.tinyvit import TinyViT
from cfrseg.sam.weights import WEIGHTS, cached_path, sha256_file

SAM_MEAN01 = (123.675 / 255, 116.28 / 255, 103.53 / 255)
SAM_STD01 = (58.395 / 255, 57.12 / 255, 57.375 / 255)
ZERO_MEAN = (0.0, 0.0, 0.0)
UNIT_STD = (1.0, 1.0, 1.0)


@dataclass(frozen=True)
class SamSpec:
    """How to build one registry entry. ``build(image_size)`` returns a segment-anything ``Sam`` with the
    standard 4-token (3 multimask + 1) mask decoder, randomly initialised."""

    name: str
    build: Callable[[int], Sam]
    default_size: int
    size_multiple: int
    pixel_mean: tuple[float, float, float]   # in [0, 1] units
    pixel_std: tuple[float, float, float]
    weights: str | None = None                # cfrseg.sam.weights name of the default checkpoint
    pretrainable: bool = True                 # False: random only (test models)


def _decoder(dim: int, mlp_dim: int, heads: int, iou_depth: int) -> MaskDecoder:
    return MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=mlp_dim, num_heads=heads),
        transformer_dim=dim,
        iou_head_depth=iou_depth,
        iou_head_hidden_dim=dim,
    )


def _sam(encoder: nn.Module, size: int, stride: int, dim: int, mask_chans: int, decoder: MaskDecoder) -> Sam:
    pe = PromptEncoder(embed_dim=dim, image_embedding_size=(size // stride, size // stride),
                       input_image_size=(size, size), mask_in_chans=mask_chans)
    return Sam(encoder, pe, decoder, pixel_mean=[0.0, 0.0, 0.0], pixel_std=[1.0, 1.0, 1.0])


def _vit(embed: int, depth: int, heads: int, global_idx: tuple[int, ...]) -> Callable[[int], Sam]:
    def build(size: int) -> Sam:
        enc = ImageEncoderViT(
            img_size=size, patch_size=16, embed_dim=embed, depth=depth, num_heads=heads, mlp_ratio=4,
            out_chans=256, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True,
            window_size=14, global_attn_indexes=global_idx,
        )
        return _sam(enc, size, 16, 256, 16, _decoder(256, 2048, 8, 3))
    return build


def _lite(size: int) -> Sam:
    return _sam(TinyViT(img_size=size), size, 4, 256, 16, _decoder(256, 2048, 8, 3))


def _tiny(size: int) -> Sam:
    enc = ImageEncoderViT(
        img_size=size, patch_size=16, embed_dim=48, depth=2, num_heads=2, mlp_ratio=4, out_chans=32,
        qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=4,
        global_attn_indexes=(1,),
    )
    return _sam(enc, size, 16, 32, 4, _decoder(32, 64, 2, 2))


def _tiny_lite(size: int) -> Sam:
    enc = TinyViT(img_size=size, embed_dims=(16, 32, 32, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4),
                  window_sizes=(4, 4, 4, 4), out_chans=32)
    return _sam(enc, size, 4, 32, 4, _decoder(32, 64, 2, 2))


SAM_MODELS: dict[str, SamSpec] = {
    "vit_b": SamSpec("vit_b", _vit(768, 12, 12, (2, 5, 8, 11)), 1024, 16, SAM_MEAN01, SAM_STD01),
    "vit_l": SamSpec("vit_l", _vit(1024, 24, 16, (5, 11, 17, 23)), 1024, 16, SAM_MEAN01, SAM_STD01),
    "vit_h": SamSpec("vit_h", _vit(1280, 32, 16, (7, 15, 23, 31)), 1024, 16, SAM_MEAN01, SAM_STD01),
    "lite_medsam": SamSpec("lite_medsam", _lite, 256, 4, ZERO_MEAN, UNIT_STD, weights="lite_medsam"),
    "tiny": SamSpec("tiny", _tiny, 128, 16, ZERO_MEAN, UNIT_STD, pretrainable=False),
    "tiny_lite": SamSpec("tiny_lite", _tiny_lite, 64, 4, ZERO_MEAN, UNIT_STD, pretrainable=False),
}


# ---------------------------------------------------------------- checkpoints

def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (restricted unpickler / zip errors: a bad or hostile file)
        raise InputError(f"{path}: not a loadable SAM checkpoint (only tensors and state dicts are loaded, "
                         f"torch.load weights_only=True): {type(e).__name__}: {' '.join(str(e).split())[:200]}"
                         ) from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise InputError(f"{path}: not a state dict checkpoint")
    return obj


def _resize_positional(sd: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> None:
    """In place: resize ViT ``pos_embed`` (1, H, W, C) and ``rel_pos_h/w`` (2L-1, hd) to the model's sizes."""
    for k, v in list(sd.items()):
        if k not in target or target[k].shape == v.shape:
            continue
        want = target[k].shape
        if k.endswith("pos_embed") and v.dim() == 4:
            t = F.interpolate(v.permute(0, 3, 1, 2).float(), size=tuple(want[1:3]), mode="bicubic",
                              align_corners=False)
            sd[k] = t.permute(0, 2, 3, 1).to(v.dtype)
        elif k.endswith(("rel_pos_h", "rel_pos_w")) and v.dim() == 2:
            t = F.interpolate(v.t()[None].float(), size=want[0], mode="linear", align_corners=False)
            sd[k] = t[0].t().to(v.dtype)


def load_checkpoint(model: nn.Module, path: str | Path, expected_sha256: str | None = None) -> str:
    """Load a SAM-family checkpoint into ``model`` with strict key matching; returns the file's sha256.

    Raises NotFoundError for a missing file, InputError for a hash mismatch or keys/shapes that do not fit.
    """
    p = Path(path)
    if not p.is_file():
        raise NotFoundError(f"SAM checkpoint {p} not found")
    digest = sha256_file(p)
    if expected_sha256 and digest != expected_sha256.lower():
        raise InputError(f"SAM checkpoint {p}: sha256 {digest} does not match the expected {expected_sha256}")
    sd = _read_state_dict(p)
    _resize_positional(sd, model.state_dict())
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise InputError(f"SAM checkpoint {p} does not fit this model: {str(e)[:800]}") from None
    return digest


def build_base_sam(
    name: str,
    checkpoint: str | Path | None = None,
    image_size: int | None = None,
    *,
    pretrained: bool = True,
    expected_sha256: str | None = None,
) -> tuple[Sam, dict[str, Any]]:
    """A segment-anything ``Sam`` (standard 4-token decoder) and its info dict (name, image_size, checkpoint,
    sha256, pretrained). ``checkpoint`` None: lite_medsam uses the weight cache; vit_* need a file unless
    ``pretrained=False`` (random weights: for tests and counting only); tiny models are always random."""
    if name not in SAM_MODELS:
        raise ConfigError(f"unknown SAM model {name!r}; choose one of {sorted(SAM_MODELS)}")
    spec = SAM_MODELS[name]
    size = int(image_size or spec.default_size)
    if size < spec.size_multiple or size % spec.size_multiple:
        raise ConfigError(f"{name}: image_size must be a positive multiple of {spec.size_multiple}, got {size}")
    model = spec.build(size)
    info: dict[str, Any] = {"name": name, "image_size": size, "checkpoint": None, "sha256": None,
                            "pretrained": False}
    if checkpoint is None and pretrained and spec.pretrainable:
        if spec.weights is None:
            raise ConfigError(
                f"{name} needs a checkpoint file (e.g. sam_{name}_*.pth from Meta's segment-anything release): "
                f"pass checkpoint=<path>, or pretrained=False for random weights (tests only)"
            )
        cp = cached_path(spec.weights)
        if cp is None:
            raise NotFoundError(
                f"{name} checkpoint is not in the weight cache; run: python -m cfrseg.sam.weights fetch {spec.weights}"
            )
        checkpoint = cp
        expected_sha256 = expected_sha256 or WEIGHTS[spec.weights].sha256
    if checkpoint is not None:
        info["sha256"] = load_checkpoint(model, checkpoint, expected_sha256)
        info["checkpoint"] = str(Path(checkpoint).absolute())
        info["pretrained"] = True
    return model, info


# ---------------------------------------------------------------- prompt-free multi-class head

HEAD_INITS = ("pretrained", "negated")


def _blend_plan(pool: list[int], count: int) -> list[tuple[int, int, float]]:
    """``count`` distinct points (a, b, t) on the segments between pairs of pretrained tokens of ``pool``:
    pairs in order (1,2), (1,3), (2,3), ...; positions t from the van der Corput sequence 1/2, 1/4, 3/4, 1/8,
    ... (one round of pairs per position), so no two points coincide and none is a pretrained token."""
    pairs = [(a, b) for i, a in enumerate(pool) for b in pool[i + 1:]]
    out = []
    r = 1
    while len(out) < count:
        t, f, n = 0.0, 0.5, r   # van der Corput (base 2) of r
        while n:
            t += f * (n & 1)
            n >>= 1
            f /= 2
        out += [(a, b, t) for a, b in pairs][: count - len(out)]
        r += 1
    return out


def _blend_module(a: nn.Module, b: nn.Module, t: float) -> nn.Module:
    """A copy of ``a`` whose parameters are (1 - t) a + t b (same architecture)."""
    m = copy.deepcopy(a)
    with torch.no_grad():
        for pm, pb in zip(m.parameters(), b.parameters(), strict=True):
            pm.mul_(1.0 - t).add_(pb, alpha=t)
    return m


def make_class_head(decoder: MaskDecoder, num_classes: int, init: str = "pretrained") -> list[int | str]:
    """Turn ``decoder`` into a K-class head in place (K = num_classes, background included): K mask tokens and
    K hypernetwork MLPs. The IoU head is kept but frozen (it is not used). Returns where each class's token
    and MLP come from: an int i = a copy of pretrained token/MLP i, -1 = the negated copy of token 1, and a
    string ``"a~b@t"`` = the blend (1 - t) * (token, MLP) a + t * (token, MLP) b.

    ``init``:
    - ``"pretrained"``: class c < T0 is a copy of pretrained token/MLP c (T0 = 4 for SAM: background gets the
      single-mask token 0, classes 1-3 the multimask tokens 1, 2, 3). With LiteMedSAM and no prompt, token 0
      gives background logits around -16 while token 1 gives ~0, so the first CE is ~15.
    - ``"negated"``: foreground classes 1..T0-1 copy pretrained tokens/MLPs 1..T0-1; background copies token 1
      with the last layer of its MLP negated, so for K = 2 the initial logits are exactly opposite (small,
      |l| ~ 0.2 for LiteMedSAM), every pixel starts at p = 0.5 and the first CE is ln 2.
    - Classes beyond the pretrained foreground tokens (K > 4) get blends of two pretrained foreground tokens
      and of their MLPs at distinct positions (:func:`_blend_plan`): every class has its own token and MLP, so
      no two classes start with identical logits (copies, as before, made classes c and c + 3 identical).
    """
    if num_classes < 2:
        raise ConfigError(f"num_classes counts background and must be >= 2, got {num_classes}")
    if init not in HEAD_INITS:
        raise ConfigError(f"head init must be one of {HEAD_INITS}, got {init!r}")
    old_tokens = decoder.mask_tokens.weight.detach()
    old_mlps = decoder.output_hypernetworks_mlps
    t0 = old_tokens.shape[0]
    if init == "pretrained" or t0 < 2:
        direct = list(range(min(num_classes, t0)))
    else:
        direct = [1] + list(range(1, min(num_classes, t0)))
    pool = list(range(1, t0)) if t0 >= 3 else list(range(t0))
    blends = _blend_plan(pool, num_classes - len(direct)) if len(pool) >= 2 else []
    if len(direct) + len(blends) < num_classes:
        raise ConfigError(f"a decoder with {t0} mask token(s) cannot start {num_classes} distinct classes")
    tokens = nn.Embedding(num_classes, old_tokens.shape[1]).to(old_tokens)
    mlps: list[nn.Module] = [copy.deepcopy(old_mlps[i]) for i in direct]
    src: list[int | str] = list(direct)
    with torch.no_grad():
        tokens.weight[: len(direct)].copy_(old_tokens[direct])
        for j, (a, b, t) in enumerate(blends, start=len(direct)):
            tokens.weight[j].copy_((1.0 - t) * old_tokens[a] + t * old_tokens[b])
            mlps.append(_blend_module(old_mlps[a], old_mlps[b], t))
            src.append(f"{a}~{b}@{t:g}")
    decoder.mask_tokens = tokens
    decoder.output_hypernetworks_mlps = nn.ModuleList(mlps)
    if init == "negated" and t0 >= 2:
        last = decoder.output_hypernetworks_mlps[0].layers[-1]
        with torch.no_grad():
            last.weight.neg_()
            if last.bias is not None:
                last.bias.neg_()
        src[0] = -1
    decoder.num_mask_tokens = num_classes
    decoder.num_multimask_outputs = num_classes - 1
    for p in decoder.iou_prediction_head.parameters():
        p.requires_grad_(False)
    return src


class CfrSam(nn.Module):
    """Prompt-free, deterministic K-class SAM: images (B, 3, S, S) in [0, 1] -> class logits (B, K, S, S).

    No prompts: the sparse prompt set is empty and the dense prompt is the learned ``no_mask_embed``. The
    decoder runs with its IoU token and K mask tokens (one per class, background included); all K masks are
    returned as logits (softmax over classes) and upsampled bilinearly from 4x the embedding size to S.
    ``info`` records name, image size, checkpoint path and sha256, num_classes and the token init.
    """

    def __init__(self, base: Sam, num_classes: int, pixel_mean: tuple[float, ...], pixel_std: tuple[float, ...],
                 info: dict[str, Any] | None = None, head_init: str = "pretrained") -> None:
        super().__init__()
        self.image_encoder = base.image_encoder
        self.prompt_encoder = base.prompt_encoder
        self.mask_decoder = base.mask_decoder
        src = make_class_head(self.mask_decoder, num_classes, head_init)
        self.num_classes = num_classes
        self.image_size = int(self.prompt_encoder.input_image_size[0])
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(1, 3, 1, 1), False)
        self.info = dict(info or {}, num_classes=num_classes, head_init=src,
                         pixel_mean=list(pixel_mean), pixel_std=list(pixel_std))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> the encoder's input scale."""
        s = self.image_size
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (s, s):
            raise InputError(f"CfrSam expects images (B, 3, {s}, {s}), got {tuple(images.shape)}")
        return (images - self.pixel_mean) / self.pixel_std

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) in [0, 1] -> image embeddings (B, C, h, w)."""
        return self.image_encoder(self.preprocess(images))

    def decode(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Embeddings (B, C, h, w) -> low-resolution class logits (B, K, 4h, 4w), without prompts."""
        dec = self.mask_decoder
        b, c, h, w = embeddings.shape
        sparse, dense = self.prompt_encoder(points=None, boxes=None, masks=None)   # (1, 0, C), (1, C, h, w)
        tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        tokens = torch.cat([tokens[None].expand(b, -1, -1), sparse.expand(b, -1, -1)], dim=1)
        src = embeddings + dense
        pos = self.prompt_encoder.get_dense_pe().expand(b, -1, -1, -1)
        hs, src = dec.transformer(src, pos, tokens)
        mask_out = hs[:, 1 : 1 + dec.num_mask_tokens]                               # (B, K, C)
        up = dec.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))           # (B, C/8, 4h, 4w)
        hyper = torch.stack([mlp(mask_out[:, i]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], 1)
        return (hyper @ up.flatten(2)).view(b, -1, up.shape[2], up.shape[3])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) in [0, 1] -> class logits (B, K, S, S)."""
        low = self.decode(self.embed(images))
        return F.interpolate(low, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)


def build_sam(
    name: str,
    num_classes: int,
    checkpoint: str | Path | None = None,
    image_size: int | None = None,
    *,
    pretrained: bool = True,
    expected_sha256: str | None = None,
    head_init: str = "pretrained",
) -> CfrSam:
    """Build the prompt-free K-class model ``name`` (see the module docstring for the checkpoint rules);
    ``head_init`` see :func:`make_class_head`."""
    base, info = build_base_sam(name, checkpoint, image_size, pretrained=pretrained,
                                expected_sha256=expected_sha256)
    spec = SAM_MODELS[name]
    return CfrSam(base, num_classes, spec.pixel_mean, spec.pixel_std, info, head_init=head_init)


@torch.no_grad()
def box_logits(model: Sam | CfrSam, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Classic box-prompted SAM on a model with the standard decoder: images (B, 3, S, S) already in the
    encoder's input scale, boxes (B, 4) as (x0, y0, x1, y1) pixels -> single-mask logits (B, 1, S, S)."""
    s = int(model.prompt_encoder.input_image_size[0])
    emb = model.image_encoder(images)
    pe = model.prompt_encoder.get_dense_pe()
    out = []
    for i in range(images.shape[0]):
        sparse, dense = model.prompt_encoder(points=None, boxes=boxes[i : i + 1].float(), masks=None)
        low, _ = model.mask_decoder(image_embeddings=emb[i : i + 1], image_pe=pe, sparse_prompt_embeddings=sparse,
                                    dense_prompt_embeddings=dense, multimask_output=False)
        out.append(F.interpolate(low, size=(s, s), mode="bilinear", align_corners=False))
    return torch.cat(out)
