"""TinyViT image encoder in the layout of LiteMedSAM (MobileSAM's TinyViT-5M variant at 256x256 input).

Written for cfrseg; parameter and buffer names match the LiteMedSAM checkpoint (``image_encoder.*`` keys of
``lite_medsam.pth``) so it loads with strict key matching.

Shape walk-through for the default (LiteMedSAM) configuration, input (B, 3, 256, 256):
  patch_embed (two 1x1 Conv+BN, stride 1)            -> (B, 64, 256, 256)
  stage 0: 2 MBConv blocks, merge stride 2           -> (B, 128, 128, 128)
  stage 1: 2 attention blocks (window 7), stride 2   -> (B, 160, 64, 64)
  stage 2: 6 attention blocks (window 14), stride 1  -> (B, 320, 64, 64)
  stage 3: 2 attention blocks (window 7)             -> (B, 320, 64, 64)
  neck (1x1 conv, LN2d, 3x3 conv, LN2d)              -> (B, 256, 64, 64)
The resolution is taken from the input, so any side divisible by 4 works (windows are zero-padded, as in
the original code, where padded tokens take part in attention as keys); the weights were trained at 256.

Attention blocks keep a fused ``qkv`` Linear whose output is laid out per head ([q_h, k_h, v_h] for each
head h); :mod:`cfrseg.sam.lora` splits it exactly using ``qkv_layout = "per_head"``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d


class ConvBN(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d, children named ``c`` and ``bn``."""

    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1, bn_init: float = 1.0):
        conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        bn = nn.BatchNorm2d(cout)
        nn.init.constant_(bn.weight, bn_init)
        nn.init.zeros_(bn.bias)
        super().__init__(OrderedDict(c=conv, bn=bn))


class PatchEmbed(nn.Module):
    """(B, in, H, W) -> (B, dim, H, W): two pointwise Conv+BN with a GELU between (keys ``seq.0``, ``seq.2``)."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(ConvBN(in_chans, dim // 2), nn.GELU(), ConvBN(dim // 2, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, residual, GELU. (B, C, H, W) -> same."""

    def __init__(self, dim: int, expand: float) -> None:
        super().__init__()
        hidden = int(dim * expand)
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = ConvBN(hidden, dim, bn_init=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.conv1(x))
        y = F.gelu(self.conv2(y))
        return F.gelu(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """(B, dim, H, W) -> (B, out, H/stride, W/stride): 1x1, depthwise 3x3 with stride, 1x1."""

    def __init__(self, dim: int, out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(dim, out)
        self.conv2 = ConvBN(out, out, 3, stride=stride, groups=out)
        self.conv3 = ConvBN(out, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))


def _offset_index(window: int) -> torch.Tensor:
    """(N, N) index into the per-head bias table for N = window**2 positions: |dy| * window + |dx| (the order
    in which TinyViT enumerates distinct offsets)."""
    r = torch.arange(window)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    yy, xx = yy.flatten(), xx.flatten()
    return (yy[:, None] - yy[None, :]).abs() * window + (xx[:, None] - xx[None, :]).abs()


class Attention(nn.Module):
    """Multi-head self-attention on windows of tokens (B', N, C) with a learned bias per head and offset."""

    qkv_layout = "per_head"

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))
        self.register_buffer("attention_bias_idxs", _offset_index(window), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3 * self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.split(self.head_dim, dim=-1))   # (B', heads, N, hd)
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)     # (heads, N, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """LayerNorm, Linear, GELU, Linear on tokens (..., C)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Windowed attention + residual, depthwise 3x3 conv, MLP + residual. (B, C, H, W) -> same."""

    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: float) -> None:
        super().__init__()
        self.window = window
        self.attn = Attention(dim, num_heads, window)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = ConvBN(dim, dim, 3, groups=dim)

    def _window_attention(self, t: torch.Tensor) -> torch.Tensor:
        b, h, w, c = t.shape
        ws = self.window
        ph, pw = (ws - h % ws) % ws, (ws - w % ws) % ws
        if ph or pw:
            t = F.pad(t, (0, 0, 0, pw, 0, ph))
        hh, ww = h + ph, w + pw
        win = t.view(b, hh // ws, ws, ww // ws, ws, c).transpose(2, 3).reshape(-1, ws * ws, c)
        out = self.attn(win).view(b, hh // ws, ww // ws, ws, ws, c).transpose(2, 3).reshape(b, hh, ww, c)
        return out[:, :h, :w] if (ph or pw) else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.permute(0, 2, 3, 1)                                   # (B, H, W, C)
        t = t + self._window_attention(t)
        t = self.local_conv(t.permute(0, 3, 1, 2).contiguous()).permute(0, 2, 3, 1)
        t = t + self.mlp(t)
        return t.permute(0, 3, 1, 2).contiguous()


class Stage(nn.Module):
    """A list of blocks then an optional downsample (keys ``blocks.i``, ``downsample``)."""

    def __init__(self, blocks: list[nn.Module], downsample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class TinyViT(nn.Module):
    """TinyViT image encoder for SAM: images (B, 3, S, S) -> embeddings (B, out_chans, S/4, S/4).

    Stage 0 is convolutional (MBConv); the others are windowed attention. Merges between stages have stride 2
    except the last one (stride 1), as in MobileSAM/LiteMedSAM.
    """

    def __init__(
        self,
        img_size: int = 256,
        in_chans: int = 3,
        embed_dims: tuple[int, ...] = (64, 128, 160, 320),
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (2, 4, 5, 10),
        window_sizes: tuple[int, ...] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        mbconv_expand: float = 4.0,
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        n = len(depths)
        self.layers = nn.ModuleList()
        for i in range(n):
            dim = embed_dims[i]
            if i == 0:
                blocks: list[nn.Module] = [MBConv(dim, mbconv_expand) for _ in range(depths[i])]
            else:
                blocks = [TinyViTBlock(dim, num_heads[i], window_sizes[i], mlp_ratio) for _ in range(depths[i])]
            down = None
            if i < n - 1:
                down = PatchMerging(dim, embed_dims[i + 1], stride=2 if i < n - 2 else 1)
            self.layers.append(Stage(blocks, down))
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, 1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.neck(x)
