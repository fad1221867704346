"""GPU smoke test of the `paper` path: SAM ViT-B at 1024 with LoRA (forward+backward, batch 2, fp32 and bf16
autocast), 50 fine-tune iterations, one volume pseudo-labelled, 50 re-train iterations of the 16-filter V-Net
at 112x112x80 -- through the real stage functions, on a synthetic LA-like dataset (0.625 mm, 144x144x96).

Prints a table (time per phase, per step, peak memory) and writes JSON (``--json PATH``, default
bench/results/gpu_smoke.json). ``--checkpoint sam_vit_b_01ec64.pth`` uses real SAM weights; without it the
ViT-B is RANDOMLY initialised and every output says "random weights: timing only". ``--tiny`` runs the same
phases with the tiny models of the `tiny` profile on CPU in seconds (what the tests run).

    python bench/gpu_smoke.py [--tiny] [--checkpoint PATH] [--json PATH] [--device auto]
        [--finetune-iterations 50] [--retrain-iterations 50] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, format_rows, host_info, peak_rss_mb  # noqa: E402

RANDOM_NOTE = "random weights: timing only"


def environment(device: Any) -> dict[str, Any]:
    import torch

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None}
    env["bf16"] = bool(torch.cuda.is_bf16_supported()) if device.type == "cuda" else True
    return env


def reset_peak(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: Any) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()          # CPU: the process's peak RSS so far (never goes down)


def synthetic_dataset(root: Path, shape: tuple[int, int, int], n: int = 2) -> Any:
    """``n`` LA-like volumes (0.625 mm, an off-centre bright ellipsoid + noise): the first labeled."""
    import numpy as np

    from cfrseg.data.io import write_volume
    from cfrseg.data.manifest import Case, Manifest
    from cfrseg.data.volume import Volume

    rng = np.random.default_rng(0)
    cases = []
    for i in range(n):
        g = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
        lab = (((g[0] - 0.1 * i) / 0.45) ** 2 + (g[1] / 0.35) ** 2 + (g[2] / 0.5) ** 2 <= 1).astype(np.uint8)
        img = (lab * 2.0 + rng.normal(size=shape)).astype(np.float32)
        write_volume(Volume(img, (0.625,) * 3), root / f"case{i}.nii.gz")
        write_volume(Volume(lab, (0.625,) * 3), root / f"case{i}_label.nii.gz", label=True)
        cases.append(Case(f"case{i}", str(root / f"case{i}.nii.gz"), str(root / f"case{i}_label.nii.gz"),
                          "labeled" if i == 0 else "unlabeled"))
    return Manifest("smoke", 2, tuple(cases))


def random_checkpoint(model: str, path: Path) -> Path:
    """A randomly initialised base SAM written as a checkpoint file (so the stage code path is the real
    one)."""
    import torch

    from cfrseg.sam.model import build_base_sam

    torch.manual_seed(0)
    base, _ = build_base_sam(model, None, pretrained=False)
    torch.save(base.state_dict(), path)
    return path


def sam_steps(args: argparse.Namespace, ft_cfg: Any, checkpoint: Path | None, device: Any) -> dict[str, Any]:
    """Median time of LoRA-SAM forward+backward at batch 2, fp32 and (when supported) bf16 autocast."""
    import torch
    import torch.nn.functional as F

    from cfrseg.stages.finetune import build_model

    sam = build_model(ft_cfg.model, 2, checkpoint, ft_cfg.image_size, lora_rank=ft_cfg.lora_rank or 4,
                      lora_alpha=ft_cfg.lora_alpha, lora_dropout=0.0).to(device)
    sam.train()
    s = ft_cfg.image_size
    x = torch.rand(2, 3, s, s, device=device)
    y = torch.randint(0, 2, (2, s, s), device=device)
    out: dict[str, Any] = {"image_size": s, "batch": 2,
                           "trainable_params": sum(p.numel() for p in sam.parameters() if p.requires_grad)}
    for prec in ("fp32", "bf16"):
        if prec == "bf16" and not environment(device)["bf16"]:
            out[prec] = {"skipped": "bf16 autocast not supported on this device"}
            continue
        try:
            reset_peak(device)
            times = []
            for k in range(args.steps + 1):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t = time.perf_counter()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=prec == "bf16"):
                    loss = F.cross_entropy(sam(x).float(), y)
                loss.backward()
                sam.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if k:                                  # the first step warms up (kernels, allocator)
                    times.append(time.perf_counter() - t)
            out[prec] = {"step_s": statistics.median(times), "steps": len(times), "peak_mb": peak_mb(device),
                         "loss": float(loss.detach())}
        except Exception as e:  # noqa: BLE001 - a smoke test reports what failed and goes on
            out[prec] = {"error": f"{type(e).__name__}: {e}"}
    del sam
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from cfrseg.config import apply_overrides, load_profile
    from cfrseg.stages.finetune import FinetuneConfig, run_finetune
    from cfrseg.stages.infer import resolve_device
    from cfrseg.stages.pseudolabel import PseudolabelConfig, run_pseudolabel
    from cfrseg.stages.retrain import RetrainConfig, run_retrain
    from cfrseg.store import LocalStore

    device = resolve_device("cpu" if args.tiny and args.device == "auto" else args.device)
    dev = str(device)
    profile = "tiny" if args.tiny else "paper"
    sets = [f"finetune.iterations={args.finetune_iterations}",
            f"retrain.iterations={args.retrain_iterations}",
            f'finetune.device="{dev}"', f'pseudolabel.device="{dev}"', f'retrain.device="{dev}"',
            "finetune.checkpoint_interval_s=36000", "retrain.checkpoint_interval_s=36000"]
    if args.tiny:
        sets += ["finetune.warmup_iterations=0"]
    prof = apply_overrides(load_profile(profile), sets)
    res: dict[str, Any] = {"profile": profile, "tiny": args.tiny, "environment": environment(device),
                           "host": host_info(), "phases": {}}
    random_weights = args.checkpoint is None
    res["weights"] = RANDOM_NOTE if random_weights else f"checkpoint {args.checkpoint}"
    print(f"gpu_smoke: profile {profile} on {res['environment']['device_name']} (torch {torch.__version__}, "
          f"cuda {torch.version.cuda}); " + ("*** RANDOM WEIGHTS: TIMING ONLY ***" if random_weights else
                                             f"weights {args.checkpoint}"), flush=True)
    with tempfile.TemporaryDirectory(prefix="cfrseg-gpu-smoke-") as tmp:
        root = Path(tmp)
        data = synthetic_dataset(root / "data", (48, 44, 24) if args.tiny else (144, 144, 96))
        ft_sec = dict(prof["finetune"])
        checkpoint = None
        if ft_sec["model"] != "tiny":
            checkpoint = (Path(args.checkpoint) if args.checkpoint
                          else random_checkpoint(ft_sec["model"], root / "random_sam.pth"))
            ft_sec["checkpoint"] = str(checkpoint)
        ft_cfg = FinetuneConfig.from_dict(ft_sec)

        def phase(name: str, fn) -> Any:
            reset_peak(device)
            t = time.perf_counter()
            try:
                out = fn()
                rec = {"seconds": time.perf_counter() - t, "peak_mb": peak_mb(device)}
                if isinstance(out, dict):
                    rec.update(out)
            except Exception as e:  # noqa: BLE001
                rec = {"seconds": time.perf_counter() - t, "error": f"{type(e).__name__}: {e}",
                       "traceback": traceback.format_exc(limit=4)}
                out = None
            res["phases"][name] = rec
            err = f"  ERROR {rec['error']}" if "error" in rec else ""
            print(f"  {name}: {rec.get('seconds', 0):.1f} s{err}", flush=True)
            return out

        phase("sam_fwd_bwd", lambda: sam_steps(args, ft_cfg, checkpoint, device))
        ft_store = LocalStore(root / "finetune")
        ft = phase("finetune", lambda: _ft(run_finetune(ft_cfg, data, ft_store), args.finetune_iterations))
        one = data.__class__(data.name, data.num_classes, data.cases[:1] + data.cases[1:2], data.spacing)
        pl_cfg = PseudolabelConfig.from_dict(dict(prof["pseudolabel"],
                                                  checkpoint=str(checkpoint) if checkpoint else None))
        pl = phase("pseudolabel_1_volume", lambda: _pl(run_pseudolabel(pl_cfg, one, LocalStore(root / "pl"),
                                                                       finetuned=ft_store)) if ft else None)
        rt_cfg = RetrainConfig.from_dict(dict(prof["retrain"]))
        data_pl = data.with_pseudo_labels(pl["paths"]) if pl else data
        phase("retrain", lambda: _rt(run_retrain(rt_cfg, data_pl, LocalStore(root / "retrain")),
                                     args.retrain_iterations, root / "retrain"))
    res["peak_rss_mb"] = peak_rss_mb()
    return res


def _ft(r: Any, n: int) -> dict[str, Any]:
    return {"iterations": r.iterations, "train_s": r.elapsed_s, "s_per_iteration": r.elapsed_s / max(n, 1),
            "final_loss": r.final_loss}


def _pl(r: Any) -> dict[str, Any]:
    return {"cases": len(r.labels), "stage_s": r.elapsed_s, "paths": r.paths}


def _rt(r: Any, n: int, store: Path) -> dict[str, Any]:
    cfg = json.loads((store / "config.json").read_text())
    return {"iterations": r.iterations, "train_s": r.wall_s, "s_per_iteration": r.wall_s / max(n, 1),
            "patch": cfg["patch"], "network": cfg["network"], "n_filters": cfg["network_kwargs"].get("n_filters"),
            "final_loss": r.final_losses.get("loss")}


def table(res: dict[str, Any]) -> str:
    rows = [["phase", "wall (s)", "per step (s)", "peak memory (MB)", "note"]]
    ph = res["phases"]
    sam = ph.get("sam_fwd_bwd", {})
    for prec in ("fp32", "bf16"):
        r = sam.get(prec, {})
        if "step_s" in r:
            rows.append([f"SAM fwd+bwd {sam['image_size']} px, batch 2, LoRA ({prec})", "",
                         f"{r['step_s']:.3f}", f"{r['peak_mb']:.0f}", ""])
        elif r:
            rows.append([f"SAM fwd+bwd ({prec})", "", "", "", r.get("skipped") or r.get("error", "")])
    for name, key in (("fine-tune", "finetune"), ("pseudo-label 1 volume", "pseudolabel_1_volume"),
                      ("re-train", "retrain")):
        r = ph.get(key, {})
        if "error" in r:
            rows.append([name, f"{r['seconds']:.1f}", "", "", r["error"][:60]])
            continue
        per = f"{r['s_per_iteration']:.3f}" if "s_per_iteration" in r else ""
        net = r.get("network", "vnet") + (f" ({r['n_filters']} filters)" if r.get("n_filters") else "")
        note = (f"{r.get('iterations')} it" + (f", patch {r['patch']}, {net}" if "patch" in r else "")
                if "iterations" in r else "")
        rows.append([name, f"{r.get('seconds', 0):.1f}", per, f"{r.get('peak_mb', 0):.0f}", note])
    env = res["environment"]
    head = (f"torch {env['torch']}, cuda {env['cuda']}, device {env['device_name']}, bf16 {env['bf16']}; "
            f"weights: {res['weights']}")
    return head + "\n" + format_rows(rows) + ("\n*** RANDOM WEIGHTS: TIMING ONLY (no quality meaning) ***"
                                               if res["weights"] == RANDOM_NOTE else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true",
                    help="tiny models on CPU, a few iterations (seconds; tests)")
    ap.add_argument("--checkpoint", default=None, help="SAM ViT-B checkpoint (sam_vit_b_01ec64.pth); "
                    "without it: random weights, timing only")
    ap.add_argument("--json", default=None,
                    help="write the results here (default bench/results/gpu_smoke.json)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--finetune-iterations", type=int, default=None)
    ap.add_argument("--retrain-iterations", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed SAM forward+backward steps (median)")
    a = ap.parse_args(argv)
    a.finetune_iterations = a.finetune_iterations or (3 if a.tiny else 50)
    a.retrain_iterations = a.retrain_iterations or (3 if a.tiny else 50)
    a.steps = a.steps or (2 if a.tiny else 5)
    if a.tiny:
        import torch

        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    res = run(a)
    print(table(res))
    path = Path(a.json) if a.json else RESULTS_DIR / "gpu_smoke.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    for ph in res["phases"].values():
        ph.pop("paths", None)
    from _common import _clean

    path.write_text(json.dumps(_clean(res), indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return 1 if any("error" in p for p in res["phases"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
