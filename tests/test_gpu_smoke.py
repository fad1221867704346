"""bench/gpu_smoke.py --tiny: every phase of the GPU smoke test runs on CPU with tiny models (seconds)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu_smoke.py"


def test_gpu_smoke_tiny_runs_every_phase_and_writes_json(tmp_path: Path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("gpu_smoke", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "smoke.json"
    rc = mod.main(["--tiny", "--json", str(out), "--finetune-iterations", "2", "--retrain-iterations", "2",
                   "--steps", "1"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    res = json.loads(out.read_text())
    env = res["environment"]
    assert env["torch"] and env["device"] == "cpu" and env["device_name"] == "cpu" and "bf16" in env
    assert res["weights"] == "random weights: timing only" and "RANDOM WEIGHTS: TIMING ONLY" in printed
    ph = res["phases"]
    assert set(ph) == {"sam_fwd_bwd", "finetune", "pseudolabel_1_volume", "retrain"}
    assert all("error" not in p and p["seconds"] > 0 and p["peak_mb"] > 0 for p in ph.values())
    assert ph["sam_fwd_bwd"]["fp32"]["step_s"] > 0 and ph["sam_fwd_bwd"]["bf16"]["step_s"] > 0
    assert ph["finetune"]["iterations"] == 2 and ph["retrain"]["iterations"] == 2
    assert ph["pseudolabel_1_volume"]["cases"] == 1
    assert "SAM fwd+bwd 128 px, batch 2, LoRA (fp32)" in printed and "re-train" in printed
