"""Fine-tune stage: valid-pixel loss, orientation family, learning on real LA crops, exact resume, artifact."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from cfrseg.data.manifest import Case, Manifest
from cfrseg.errors import Cancelled, ConfigError, InputError, NotFoundError
from cfrseg.sam import concat
from cfrseg.sam.losses import masked_ce_dice
from cfrseg.sam.mosaic import MosaicSpec, make_batch, orient, orientation_family, prepare_volume, unorient
from cfrseg.stages.finetune import FinetuneConfig, load_finetuned, read_artifact, run_finetune
from cfrseg.store import LocalStore, get_json

# tiny SAM (random ViT, 128 px): LA zoomed x0.25 -> ~(46, 35, 22); windows 30x30x16 on a 4x4 grid of 32 px
TINY = dict(model="tiny", image_size=128, crop=(30, 30, 16), zoom=(0.25, 0.25, 0.25), batch_size=2,
            lr=3e-3, weight_decay=0.0, warmup_iterations=2, checkpoint_interval_s=3600)


def la_manifest(la_dir: Path, ids: list[str], n_labeled: int, n_unlabeled: int = 0) -> Manifest:
    cases = []
    for k, cid in enumerate(ids[: n_labeled + n_unlabeled]):
        f = str(la_dir / cid / "mri_norm2.h5")
        cases.append(Case(cid, f, f, "labeled" if k < n_labeled else "unlabeled"))
    return Manifest("la2018", 2, tuple(cases), (0.625, 0.625, 0.625))


# ------------------------------------------------------------------------------------------------ loss

def test_loss_ignores_invalid_pixels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 16, 16, generator=g)
    target = torch.randint(0, 3, (2, 16, 16), generator=g)
    valid = torch.zeros(2, 16, 16, dtype=torch.bool)
    valid[:, 2:12, 3:14] = True
    a = logits.clone().requires_grad_(True)
    loss_a, _ = masked_ce_dice(a, target, valid)
    loss_a.backward()
    b = logits.clone()
    b[~valid.unsqueeze(1).expand_as(b)] = float("nan")          # garbage where nothing lives
    t2 = target.clone()
    t2[~valid] = 7                                               # out-of-range labels there too
    b.requires_grad_(True)
    loss_b, _ = masked_ce_dice(b, t2, valid)
    loss_b.backward()
    assert torch.equal(loss_a, loss_b)
    inv = ~valid.unsqueeze(1).expand_as(logits)
    assert torch.all(a.grad[inv] == 0) and torch.all(b.grad[inv] == 0)
    assert torch.equal(a.grad, b.grad)
    assert a.grad[~inv].abs().sum() > 0


def test_loss_perfect_prediction_is_small():
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, 2:5, 2:5] = 1
    logits = torch.nn.functional.one_hot(target, 2).permute(0, 3, 1, 2).float() * 40 - 20
    loss, parts = masked_ce_dice(logits, target, torch.ones(8, 8, dtype=torch.bool))
    assert loss < 1e-4 and parts["dice"] < 1e-4


def test_batch_validity_excludes_padding_and_empty_slots():
    spec = MosaicSpec(image_size=64, crop=(14, 14, 14), tile_pad=1)       # 4x4 grid, 2 empty slots, 64 = 4 * 16
    img = torch.rand(20, 10, 30)                                          # Y smaller than the crop -> padded
    lab = (img > 0.5).to(torch.uint8)
    pv = prepare_volume(img.numpy(), lab.numpy(), spec, 2, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    images, target, valid = make_batch([pv], spec, 3, g, bezier_p=1.0)
    assert images.shape == (3, 3, 64, 64) and target.shape == valid.shape == (3, 64, 64)
    lay = spec.layout()
    assert int(valid.sum(dim=(1, 2)).max()) <= int(concat.validity_mask(lay).sum())
    # every sample has exactly 14 x 10 real voxels per slice (the window is padded in one in-plane axis)
    assert all(int(v.sum()) == 14 * 10 * 14 for v in valid)
    assert float(images.min()) >= 0 and float(images.max()) <= 1


# ------------------------------------------------------------------------------------------------ orientation

def test_orientation_family_same_at_train_and_predict_and_invertible():
    spec = FinetuneConfig(**TINY).spec()
    fam = spec.orientations()
    assert fam == orientation_family(True, True) and len(set(fam)) == 8 and fam[0] == (0, False)
    assert MosaicSpec.from_dict(spec.to_dict()).orientations() == fam     # as stored in finetune.pt
    # the 8 elements are distinct maps and form a group (closed under composition)
    x = torch.arange(5 * 5 * 2).reshape(5, 5, 2)
    images = {o: orient(x, o) for o in fam}
    assert len({tuple(v.flatten().tolist()) for v in images.values()}) == 8
    for o1 in fam:
        for o2 in fam:
            comp = tuple(orient(orient(x, o1), o2).flatten().tolist())
            assert comp in {tuple(v.flatten().tolist()) for v in images.values()}
    # rot/flip then inverse is the identity on a predicted probability map (K, X, Y, D), also non-square
    p = torch.rand(2, 7, 5, 3)
    for o in fam:
        assert torch.equal(unorient(orient(p, o), o), p)
    # the fine-tune sampler draws every member of the family
    g = torch.Generator().manual_seed(0)
    drawn = {fam[int(torch.randint(len(fam), (1,), generator=g))] for _ in range(200)}
    assert drawn == set(fam)
    # with the flags off, training and TTA both use the identity only
    assert FinetuneConfig(**dict(TINY, augment_rot90=False, augment_flip=False)).spec().orientations() == [(0, False)]


# ------------------------------------------------------------------------------------------------ bad inputs

def test_config_rejects_bad_values():
    with pytest.raises(ConfigError):
        FinetuneConfig(**dict(TINY, crop=(30, 20, 16)))                 # rot90 needs a square in-plane crop
    with pytest.raises(ConfigError):
        FinetuneConfig(**dict(TINY, warmup_iterations=5, iterations=5))
    with pytest.raises(ConfigError):
        FinetuneConfig.from_dict({"nope": 1})


def test_no_labeled_cases(tmp_path):
    m = Manifest("x", 2, (Case("a", str(tmp_path / "a.nii.gz"), None, "unlabeled"),))
    with pytest.raises(InputError, match="no labeled case"):
        run_finetune(FinetuneConfig(**TINY, iterations=3), m, LocalStore(tmp_path / "out"))


def test_missing_checkpoint_and_sha_mismatch(tmp_path):
    m = Manifest("x", 2, (Case("a", "a.nii.gz", "a.nii.gz", "labeled"),))
    with pytest.raises(NotFoundError, match="not found"):
        run_finetune(FinetuneConfig(**dict(TINY, checkpoint=str(tmp_path / "nope.pth"))), m, LocalStore(tmp_path))
    ck = tmp_path / "base.pth"
    ck.write_bytes(b"not really weights")
    with pytest.raises(InputError, match="sha256"):
        run_finetune(FinetuneConfig(**dict(TINY, checkpoint=str(ck), checkpoint_sha256="0" * 64)), m,
                     LocalStore(tmp_path / "o"))


# ------------------------------------------------------------------------------------------------ real LA

@pytest.mark.la
def test_finetune_learns_on_la(la_dir, la_ids, tmp_path):
    m = la_manifest(la_dir, la_ids, 2)
    events = []
    res = run_finetune(FinetuneConfig(**dict(TINY, iterations=40, lr=5e-3)), m, LocalStore(tmp_path),
                       progress=events.append)
    losses = [h["loss"] for h in res.history]
    assert len(losses) == 40
    assert sum(losses[-8:]) / 8 < 0.85 * sum(losses[:4]) / 4
    assert events[-1].stage == "finetune" and events[-1].step == 40
    for key in ("finetune.pt", "checkpoint.pt", "config.json", "history.json", "loss.png"):
        assert LocalStore(tmp_path).exists(key), key
    # a second call is refused without resume, and a no-op with it (same data, settings, code)
    cfg = FinetuneConfig(**dict(TINY, iterations=40, lr=5e-3))
    with pytest.raises(ConfigError, match="already holds a finetune run.*--resume"):
        run_finetune(cfg, m, LocalStore(tmp_path))
    again = run_finetune(cfg.replace(resume=True), m, LocalStore(tmp_path))
    assert again.skipped and again.history == get_json(LocalStore(tmp_path), "history.json")
    art = read_artifact(tmp_path)
    assert art["class_names"] == ["background", "class_1"] and art["plan"]["orientation"] == "LPS"
    assert art["provenance"]["manifest"] and art["provenance"]["code"]["version"]


class CancelAfter:
    """A cancel flag that becomes set once ``n`` progress events with a training step were seen."""

    def __init__(self, n: int) -> None:
        self.n, self.flag = n, threading.Event()

    def progress(self, ev) -> None:
        if ev.losses and ev.step >= self.n:
            self.flag.set()

    def is_set(self) -> bool:
        return self.flag.is_set()


@pytest.mark.la
def test_resume_is_bit_exact(la_dir, la_ids, tmp_path):
    m = la_manifest(la_dir, la_ids, 2)
    cfg = FinetuneConfig(**dict(TINY, iterations=8, lora_dropout=0.1))
    full = run_finetune(cfg, m, LocalStore(tmp_path / "full"))
    stop = CancelAfter(3)
    with pytest.raises(Cancelled):
        run_finetune(cfg, m, LocalStore(tmp_path / "part"), progress=stop.progress, cancel=stop)
    part = LocalStore(tmp_path / "part")
    assert part.exists("checkpoint.pt") and not part.exists("finetune.pt")
    resumed = run_finetune(cfg.replace(resume=True), m, part)
    assert resumed.resumed_from == 3
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    a, b = read_artifact(tmp_path / "full")["delta"], read_artifact(part)["delta"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match=r"cannot resume.*settings: iterations 8->9, lr"):
        run_finetune(cfg.replace(resume=True, lr=1e-2, iterations=9), m, part)


@pytest.mark.la
def test_artifact_small_and_reloads_on_base(la_dir, la_ids, tmp_path):
    from cfrseg.sam.model import build_base_sam

    base, _ = build_base_sam("tiny", image_size=128)
    ck = tmp_path / "tiny_base.pth"
    torch.save(base.state_dict(), ck)
    m = la_manifest(la_dir, la_ids, 1)
    cfg = FinetuneConfig(**dict(TINY, iterations=3, checkpoint=str(ck)))
    store = LocalStore(tmp_path / "ft")
    run_finetune(cfg, m, store)
    art = read_artifact(store)
    n_delta = sum(t.numel() for t in art["delta"].values())
    n_base = sum(t.numel() for t in base.state_dict().values())
    assert n_delta < 0.8 * n_base and not any("image_encoder" in k and "lora_" not in k for k in art["delta"])

    # same outputs as the trained model (its trainable tensors are the checkpoint's)
    ckpt = torch.load(store.path("checkpoint.pt"), weights_only=True)  # only tensors and plain metadata
    sam = load_finetuned(store)
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    from cfrseg.stages.finetune import build_model, load_trainable_state

    ref = build_model("tiny", 2, ck, 128, lora_rank=4, lora_alpha=4.0, lora_dropout=0.0)
    load_trainable_state(ref, ckpt["trainable"])
    ref.eval()
    with torch.no_grad():
        assert torch.equal(sam(x), ref(x))
        from cfrseg.sam.lora import merge_lora

        assert torch.allclose(merge_lora(sam)(x), ref(x), atol=1e-4)

    # the recorded base must match: a different file with the same name fails clearly
    other, _ = build_base_sam("tiny", image_size=128)
    torch.save({k: v + 1 for k, v in other.state_dict().items()}, ck)
    with pytest.raises(InputError, match="sha256"):
        load_finetuned(store)
    ck.unlink()
    with pytest.raises(NotFoundError):
        load_finetuned(store)


# ------------------------------------------------------------------------------------------------ head init, cache mode

@pytest.mark.la
def test_negated_head_starts_at_ln2(la_dir, la_ids, tmp_path):
    import math

    m = la_manifest(la_dir, la_ids, 1)
    res = run_finetune(FinetuneConfig(**dict(TINY, iterations=3)), m, LocalStore(tmp_path / "neg"))
    assert abs(res.history[0]["ce"] - math.log(2)) < 0.1           # opposite small logits: p ~ 0.5
    with pytest.raises(ConfigError):
        FinetuneConfig(**dict(TINY, head_init="zeros"))


def test_cache_mode_config_checks():
    with pytest.raises(ConfigError, match="lora_rank 0"):
        FinetuneConfig(**dict(TINY, embedding_cache=4))            # cache needs a frozen encoder
    with pytest.raises(ConfigError):
        FinetuneConfig(**dict(TINY, lora_rank=-1))
    FinetuneConfig(**dict(TINY, embedding_cache=4, lora_rank=0))


@pytest.mark.la
def test_cache_mode_trains_reloads_predicts_and_resumes(la_dir, la_ids, tmp_path):
    from cfrseg.stages.pseudolabel import predict_volume

    m = la_manifest(la_dir, la_ids, 2)
    cfg = FinetuneConfig(**dict(TINY, lora_rank=0, embedding_cache=3, iterations=30, lr=5e-3, foreground_prob=0.5))
    events = []
    full = run_finetune(cfg, m, LocalStore(tmp_path / "full"), progress=events.append)
    losses = [h["loss"] for h in full.history]
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:3]) / 3
    assert any("embedding cache" in (e.message or "") for e in events)
    art = read_artifact(tmp_path / "full")
    assert art["lora"]["rank"] == 0 and not any("image_encoder" in k for k in art["delta"])
    sam = load_finetuned(tmp_path / "full")
    from cfrseg.data.datasets import load_case

    img, _ = load_case(m.cases[0], m)
    probs = predict_volume(sam, sam.cfr_spec, img.array, 2, batch_size=4)
    assert probs.shape == (2, *img.array.shape) and torch.allclose(probs.sum(0), torch.ones(()), atol=1e-4)

    stop = CancelAfter(7)
    with pytest.raises(Cancelled):
        run_finetune(cfg, m, LocalStore(tmp_path / "part"), progress=stop.progress, cancel=stop)
    resumed = run_finetune(cfg.replace(resume=True), m, LocalStore(tmp_path / "part"))
    assert resumed.resumed_from == 7
    assert [h["loss"] for h in resumed.history] == losses
    b = read_artifact(tmp_path / "part")["delta"]
    assert all(torch.equal(art["delta"][k], b[k]) for k in b)


def test_bf16_cache_mode_learns_resumes_exactly_and_predicts_close_to_fp32(la_dir, la_ids, tmp_path):
    """finetune.precision bf16: encoder (cache) and decoder under autocast, fp32 delta, exact resume; the
    pseudo-label forward in bf16 gives probabilities close to fp32 (same fine-tuned model)."""
    from cfrseg.data.datasets import load_case
    from cfrseg.stages.pseudolabel import predict_volume

    m = la_manifest(la_dir, la_ids, 1)
    cfg = FinetuneConfig(**dict(TINY, lora_rank=0, embedding_cache=1, iterations=6, lr=5e-3, precision="bf16"))
    full = run_finetune(cfg, m, LocalStore(tmp_path / "full"))
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in full.history)
    delta = read_artifact(tmp_path / "full")["delta"]
    assert all(v.dtype == torch.float32 for v in delta.values() if v.is_floating_point())
    stop = CancelAfter(3)
    with pytest.raises(Cancelled):
        run_finetune(cfg, m, LocalStore(tmp_path / "part"), progress=stop.progress, cancel=stop)
    resumed = run_finetune(cfg.replace(resume=True), m, LocalStore(tmp_path / "part"))
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    with pytest.raises(ConfigError, match="precision"):
        run_finetune(cfg.replace(resume=True, precision="fp32", iterations=7), m, LocalStore(tmp_path / "part"))
    fp32 = run_finetune(cfg.replace(precision="fp32", iterations=2, warmup_iterations=1), m,
                        LocalStore(tmp_path / "fp32"))
    assert fp32.history[0]["loss"] != full.history[0]["loss"]
    sam = load_finetuned(tmp_path / "full")
    img, _ = load_case(m.cases[0], m)
    sub = img.array[:96, :96, :32]            # a part of the volume: the same path, less time
    p32 = predict_volume(sam, sam.cfr_spec, sub, 2, batch_size=4)
    p16 = predict_volume(sam, sam.cfr_spec, sub, 2, batch_size=4, precision="bf16")
    assert p16.dtype == torch.float32 and (p16 - p32).abs().max() < 0.05 and not torch.equal(p16, p32)
    with pytest.raises(ConfigError, match="precision"):
        FinetuneConfig(**dict(TINY, precision="fp16"))


_CACHE_MEMORY_SCRIPT = '''
import json
import torch
torch.set_num_threads(1)
from cfrseg.stages import finetune as ft

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

def batch(vols, spec, n, g, **kw):              # the mosaics themselves are not what is measured
    return torch.rand(n, 3, 8, 8, generator=g), torch.ones(n, 8, 8), torch.ones(n, 8, 8, dtype=torch.bool)

class Encoder:
    def embed(self, images):                     # 1 MiB of float32 per mosaic, every page written
        return torch.full((len(images), 64, 64, 64), 0.5)

ft.make_batch = batch
ft.build_embedding_cache(Encoder(), [None], None, 8, seed=0, bezier_p=0.0, foreground_prob=0.0)   # warm up
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
cache = ft.build_embedding_cache(Encoder(), [None] * 8, None, 32, seed=0, bezier_p=0.0, foreground_prob=0.0)
print(json.dumps({"peak": status("VmHWM") - base, "cache": cache.embeddings.numel() * 4,
                  "filled": float(cache.embeddings.min()), "n": len(cache.target)}))
'''


def test_embedding_cache_is_held_once(tmp_path):
    """The frozen-encoder cache (8 volumes x 32 mosaics of 1 MiB) is filled in place: peak RSS growth stays
    under 1.4x its size (a list of chunks and a torch.cat, as before, held it twice: at least 2x)."""
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "cache_mem.py"
    script.write_text(_CACHE_MEMORY_SCRIPT)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["n"] == 256 and r["filled"] == 0.5 and r["cache"] == 256 * 2**20
    assert r["cache"] <= r["peak"] < 1.4 * r["cache"], r
