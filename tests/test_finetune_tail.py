"""The end of SAM's encoder trained on cached activations (finetune.encoder_tail, cfrseg.sam.tail)."""

from __future__ import annotations

import pytest
import torch

from cfrseg.errors import ConfigError, InputError
from cfrseg.sam.lora import lora_state_dict, load_lora_state_dict
from cfrseg.sam.model import build_sam
from cfrseg.sam.tail import TAILS, apply_tail, encode_head, mark_tail_trainable, tail_prefixes
from cfrseg.stages.finetune import FinetuneConfig, build_model, load_finetuned, read_artifact, run_finetune
from cfrseg.store import LocalStore
from tests.synth import synthetic_manifest

SIZES = {"tiny": 128, "tiny_lite": 64}


@pytest.mark.parametrize("name", ["tiny", "tiny_lite"])
@pytest.mark.parametrize("tail", TAILS)
def test_head_then_tail_is_the_encoder(name, tail):
    torch.manual_seed(0)
    sam = build_sam(name, 3, pretrained=False).eval()
    x = torch.rand(2, 3, SIZES[name], SIZES[name])
    with torch.no_grad():
        want = sam.embed(x)
        acts = encode_head(sam, x, tail)
        got = apply_tail(sam, acts, tail)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    if tail == "none":
        assert acts is not None and torch.equal(acts, want)         # the cache holds embeddings, as before


@pytest.mark.parametrize("name", ["tiny", "tiny_lite"])
def test_tail_parameters_train_and_travel_with_the_delta(name):
    torch.manual_seed(0)
    sam = build_model(name, 3, None, SIZES[name], lora_rank=0, lora_alpha=4.0, lora_dropout=0.0,
                      encoder_tail="last_stage")
    trainable = {n for n, p in sam.named_parameters() if p.requires_grad}
    prefixes = tail_prefixes(sam, "last_stage")
    assert any(n.startswith(prefixes[0]) for n in trainable) and any(n.startswith(prefixes[1]) for n in trainable)
    enc = {n for n in trainable if n.startswith("image_encoder.")}
    assert enc and all(n.startswith(prefixes) for n in enc)        # nothing before the tail trains
    neck_only = build_model(name, 3, None, SIZES[name], lora_rank=0, lora_alpha=4.0, lora_dropout=0.0,
                            encoder_tail="neck")
    assert {n for n, p in neck_only.named_parameters() if p.requires_grad and n.startswith("image_encoder.")} \
        == {n for n, _ in neck_only.named_parameters() if n.startswith("image_encoder.neck.")}

    with torch.no_grad():
        for n, p in sam.named_parameters():
            if n.startswith(prefixes):
                p.add_(0.01)
    delta = lora_state_dict(sam)
    assert any(k.startswith("image_encoder.") for k in delta)
    fresh = build_model(name, 3, None, SIZES[name], lora_rank=0, lora_alpha=4.0, lora_dropout=0.0,
                        encoder_tail="last_stage")
    load_lora_state_dict(fresh, delta)
    x = torch.rand(1, 3, SIZES[name], SIZES[name])
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), sam.eval()(x))
    plain = build_model(name, 3, None, SIZES[name], lora_rank=0, lora_alpha=4.0, lora_dropout=0.0)
    with pytest.raises(InputError, match="encoder tail"):
        load_lora_state_dict(plain, delta)                          # a frozen-encoder model has no place for it


def test_unknown_tail_is_a_config_error():
    with pytest.raises(ConfigError, match="encoder_tail"):
        FinetuneConfig(encoder_tail="all")
    sam = build_sam("tiny", 2, pretrained=False)
    with pytest.raises(ConfigError, match="encoder tail"):
        mark_tail_trainable(sam, "stage2")


@pytest.mark.parametrize("tail", ["neck", "last_stage"])
def test_cached_tail_fine_tune_trains_only_the_tail_and_reloads(tmp_path, tail):
    m = synthetic_manifest(tmp_path / "data", 3, n_cases=3, labeled=2, holdout=0)
    cfg = FinetuneConfig(model="tiny", image_size=128, crop=(30, 30, 16), spacing_factor=(2.0, 2.0, 2.0),
                         batch_size=2, iterations=6, warmup_iterations=1, lr=1e-2, weight_decay=0.0,
                         lora_rank=0, embedding_cache=2, encoder_tail=tail, checkpoint_interval_s=3600,
                         device="cpu")
    run_finetune(cfg, m, LocalStore(tmp_path / "ft"))
    art = read_artifact(tmp_path / "ft")
    assert art["encoder_tail"] == tail
    base = build_model("tiny", 3, None, 128, lora_rank=0, lora_alpha=4.0, lora_dropout=0.0)
    base_sd = base.state_dict()
    prefixes = tail_prefixes(base, tail)
    enc_keys = [k for k in art["delta"] if k.startswith("image_encoder.")]
    assert enc_keys and all(k.startswith(prefixes) for k in enc_keys)
    assert any(not torch.equal(art["delta"][k], base_sd[k]) for k in enc_keys)    # the tail moved
    sam = load_finetuned(tmp_path / "ft")
    sd = sam.state_dict()
    for k, v in base_sd.items():                                     # everything before the tail is the base
        if k.startswith("image_encoder.") and not k.startswith(prefixes):
            assert torch.equal(sd[k], v), k
    for k in enc_keys:
        assert torch.equal(sd[k], art["delta"][k]), k
    # the same settings reuse the finished run; another tail is another run, refused in this store
    assert run_finetune(cfg.replace(resume=True), m, LocalStore(tmp_path / "ft")).skipped
    other = "neck" if tail == "last_stage" else "last_stage"
    with pytest.raises(ConfigError, match="encoder_tail"):
        run_finetune(cfg.replace(encoder_tail=other, resume=True), m, LocalStore(tmp_path / "ft"))
