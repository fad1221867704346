"""LoRA: exact qkv split, zero delta at injection, trainable set, counts, save/load, merge."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from cfrseg.errors import ConfigError, InputError
from cfrseg.sam.lora import (
    SplitQKV,
    inject_lora,
    load_lora_state_dict,
    lora_parameter_count,
    lora_state_dict,
    merge_lora,
    trainable_parameters,
)
from cfrseg.sam.model import build_sam


def _model(name, k=3, seed=0):
    torch.manual_seed(seed)
    return build_sam(name, k).eval()


def _randomise_lora_b(m, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("layout,heads", [("fused", 1), ("per_head", 4)])
def test_split_qkv_exact_and_fuse(layout, heads):
    torch.manual_seed(0)
    lin = nn.Linear(16, 48)
    s = SplitQKV(lin, layout, heads)
    x = torch.randn(3, 5, 16)
    assert torch.equal(s(x), lin(x))
    back = s.fuse()
    assert torch.equal(back.weight, lin.weight) and torch.equal(back.bias, lin.bias)


@pytest.mark.parametrize("name", ["tiny", "tiny_lite"])
def test_inject_identity_trainable_merge(name):
    m = _model(name)
    x = torch.rand(2, 3, m.image_size, m.image_size)
    with torch.no_grad():
        before = m(x)
    inject_lora(m, rank=4, alpha=8)
    with torch.no_grad():
        assert torch.equal(m(x), before)                            # exact split + zero LoRA delta
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert names == {n for n, p in m.named_parameters() if id(p) in {id(q) for q in trainable_parameters(m)}}
    lora = {n for n in names if "lora_" in n}
    assert lora and all(".qkv.q." in n or ".qkv.v." in n for n in lora)
    rest = names - lora
    assert "prompt_encoder.no_mask_embed.weight" in rest
    assert all(n.startswith("mask_decoder.") or n == "prompt_encoder.no_mask_embed.weight" for n in rest)
    assert not any("iou_prediction_head" in n for n in names)
    assert not any(n.startswith("image_encoder.") and "lora_" not in n for n in names)
    with pytest.raises(ConfigError):
        inject_lora(m)
    _randomise_lora_b(m)
    with torch.no_grad():
        adapted = m(x)
    assert not torch.allclose(adapted, before)
    sd = lora_state_dict(m)
    assert set(sd) == names
    # a fresh copy of the same base gets the same outputs from the saved state
    fresh = inject_lora(_model(name), rank=4, alpha=8)   # same config as m.lora_config
    load_lora_state_dict(fresh, sd)
    with torch.no_grad():
        assert torch.allclose(fresh(x), adapted, atol=1e-6)
    with pytest.raises(InputError):
        load_lora_state_dict(inject_lora(_model(name), rank=2), sd)
    merge_lora(m)
    assert lora_parameter_count(m) == 0
    assert not any(isinstance(mod, SplitQKV) for mod in m.modules())
    with torch.no_grad():
        assert torch.allclose(m(x), adapted, atol=1e-5)


def test_vit_b_lora_count():
    m = build_sam("vit_b", 2, pretrained=False)        # random init at 1024: counting only, no forward
    assert sum(p.numel() for p in m.image_encoder.parameters()) == 89_670_912
    inject_lora(m, rank=4)
    assert lora_parameter_count(m) == 147_456
    assert m.lora_config == {"rank": 4, "alpha": 4.0, "dropout": 0.0}
    decoder = sum(p.numel() for n, p in m.mask_decoder.named_parameters() if "iou_prediction_head" not in n)
    assert sum(p.numel() for p in trainable_parameters(m)) == 147_456 + decoder + 256
