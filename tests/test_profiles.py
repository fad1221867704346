"""The profiles: the `paper` profile is what it says (unscaled 9x9 mosaic at 1024, the reference's lr and
consistency settings), and the docs tables are the profile files."""

from __future__ import annotations

from pathlib import Path

import torch

from cfrseg.config import load_profile
from cfrseg.data.plan import Plan
from cfrseg.profiles.tables import main as tables_main
from cfrseg.profiles.tables import render, splice
from cfrseg.sam import concat
from cfrseg.stages.pipeline import PipelineConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "profiles.md"


def test_paper_mosaic_is_unscaled_and_the_label_round_trip_is_exact_at_1024() -> None:
    cfg = PipelineConfig.from_profile(load_profile("paper"), profile="paper")
    spec = cfg.finetune.spec()
    layout = spec.layout()
    assert (layout.canvas, layout.n_rows, layout.n_cols, layout.pad) == (1024, 9, 9, 0)
    assert not layout.scaled and layout.scale == 1.0 and layout.inner == 9 * 112 == 1008
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 2, (2, 112, 112, 80), generator=g, dtype=torch.uint8)
    image = torch.rand(2, 112, 112, 80, generator=g)
    m = concat.to_mosaic(label, layout)
    assert m.shape == (2, 1024, 1024)
    assert torch.equal(concat.from_mosaic(m, layout), label)                  # every row, no resizing
    assert torch.equal(concat.from_mosaic(concat.to_mosaic(image, layout), layout), image)
    assert int(concat.validity_mask(layout).sum()) == 112 * 112 * 80
    # rows 256 and 769 (dropped or duplicated by the old 1026 -> 1024 resize) hold slices 18..26 and 54..62
    row = label[:, 256 - 2 * 112, :, 18:27].permute(0, 2, 1)
    assert torch.equal(m[:, 256, :1008].reshape(2, 9, 112), row)


def test_paper_follows_the_reference_optimiser_and_consistency() -> None:
    cfg = PipelineConfig.from_profile(load_profile("paper"), profile="paper")
    ft, rt = cfg.finetune, cfg.retrain
    assert (ft.lr, ft.weight_decay, ft.warmup_iterations, ft.poly_power, ft.iterations, ft.batch_size) == (
        1e-3, 0.1, 0, 0.9, 6000, 2)
    assert (ft.lora_rank, ft.model, ft.image_size, ft.bezier_p) == (4, "vit_b", 1024, 0.5)
    assert rt.consistency_on_labeled
    assert (rt.consistency, rt.consistency_rampup, rt.pl_weight, rt.pl_ramp) == (0.1, 1.0, 1.0, "none")
    assert (rt.lr, rt.lr_schedule, rt.iterations, rt.evaluate) == (0.01, "step", 6000, "student")
    # on LA's grid (0.625 mm) the physical patch is the reference's 112x112x80 and the stride its 18/18/4
    la = Plan("MR", (0.625,) * 3, 2, median_shape=(192, 143, 88))
    r = rt.resolved(la)
    assert r.patch == (112, 112, 80) and r.infer_config().stride == (18, 18, 4)
    lite = PipelineConfig.from_profile(load_profile("lite"), profile="lite").retrain.resolved(la)
    assert lite.patch == (64, 64, 48) and lite.infer_config().stride == (32, 32, 24)


def test_docs_tables_are_generated_from_the_profile_files(tmp_path: Path) -> None:
    text = DOC.read_text(encoding="utf-8")
    assert splice(text, render()) == text, "stale: python -m cfrseg.profiles.tables docs/profiles.md"
    stale = tmp_path / "p.md"
    stale.write_text(text.replace("| `lr` |", "| `lr` | 1e-4 |", 1), encoding="utf-8")
    assert tables_main([str(stale), "--check"]) == 1
    assert tables_main([str(stale)]) == 0 and stale.read_text(encoding="utf-8") == text
