"""How much a working grid coarser than the data costs by itself: labels taken to the grid and back.

For each frame of ACDC's validation split (bench/acdc_protocol.py) the one-hot label map is resampled
(trilinear) to a grid ``--factor`` times coarser in-plane (the slice axis kept, as ACDC's plan keeps it), then
back to the source grid, and argmax'd. The Dice of that map against the label is an upper bound on what a
perfect network working on that grid could score (softmax probabilities are resampled the same way at
inference). Prints per-class and mean Dice and writes bench/results/label_roundtrip.json.

    .venv/bin/python bench/label_roundtrip.py [--factor 2 1.5]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import acdc_protocol as ap_  # noqa: E402
from _common import default_data, write_json  # noqa: E402


def roundtrip_dice(label: np.ndarray, num_classes: int, factor: float, slice_axis: int = 2) -> list[float]:
    """Dice per foreground class of ``label`` after one-hot -> coarser grid -> source grid -> argmax."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.moveaxis(label, slice_axis, 0).astype(np.int64))     # (Z, X, Y)
    onehot = F.one_hot(t, num_classes).permute(3, 0, 1, 2).float()[None]           # (1, K, Z, X, Y)
    z, x, y = t.shape
    small = F.interpolate(onehot, size=(z, max(1, round(x / factor)), max(1, round(y / factor))),
                          mode="trilinear", align_corners=False)
    back = F.interpolate(small, size=(z, x, y), mode="trilinear", align_corners=False).argmax(1)[0]
    out = []
    for k in range(1, num_classes):
        a, b = back == k, t == k
        denom = int(a.sum() + b.sum())
        out.append(float(2 * (a & b).sum() / denom) if denom else 1.0)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=default_data("CFRSEG_ACDC_DIR", "acdc"))
    ap.add_argument("--factor", type=float, nargs="+", default=[2.0, 1.5])
    a = ap.parse_args(argv)
    from cfrseg.data.io import read_volume

    data = Path(a.data)
    meta = json.loads((data / "dataset.json").read_text(encoding="utf-8"))
    names = [n for n, _ in sorted(((n, int(v)) for n, v in meta["labels"].items()), key=lambda t: t[1])]
    k = len(names)
    train, _ = ap_.read_train(data)
    by_patient = ap_.patients(train)
    ids = [cid for pat in ap_.split_patients(train)["val"] for cid in by_patient[pat]]
    rows = []
    for f in a.factor:
        per = np.array([roundtrip_dice(read_volume(data / "labelsTr" / f"{cid}.nii.gz").array, k, f) for cid in ids])
        row = {"factor": f, "frames": len(ids), "dice": dict(zip(names[1:], per.mean(0).round(4).tolist())),
               "dice_mean": round(float(per.mean()), 4), "dice_min_frame": round(float(per.mean(1).min()), 4)}
        rows.append(row)
        print(f"x{f:g} in-plane and back, {len(ids)} val frames: "
              + ", ".join(f"{n} {v:.4f}" for n, v in row["dice"].items())
              + f"; mean {row['dice_mean']:.4f} (worst frame {row['dice_min_frame']:.4f})")
    res = {"dataset": "acdc", "split": "val", "rows": rows}
    write_json("label_roundtrip", res)
    return res


if __name__ == "__main__":
    main()
