"""Pictures and summaries of a run: mid-slice overlays (one colour per class, with a legend for multi-class
maps), loss curves, report.md tables (foreground means, and per class for multi-class data).

Uses matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

OVERLAY_COLORS = ("#00000000", "#ff3b30", "#34c759", "#0a84ff", "#ffd60a", "#bf5af2", "#64d2ff", "#ff9f0a")


def class_colors(num_classes: int) -> list[str]:
    """One colour per class (index 0 = background, transparent): :data:`OVERLAY_COLORS` first, then
    matplotlib's tab20 palette (its light shades first, then the hues the first colours do not have), cycling,
    so classes 1..K-1 get distinct colours up to K = 28."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    tab = colormaps["tab20"].colors
    extra = [to_hex(tab[i]) for i in (1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 10, 12, 14, 16, 0, 2, 4, 6, 8, 18)]
    return [OVERLAY_COLORS[c] if c < len(OVERLAY_COLORS) else extra[(c - len(OVERLAY_COLORS)) % len(extra)]
            for c in range(max(num_classes, 2))]


def class_name(c: int, class_names: Mapping[int, str] | Sequence[str] | None) -> str:
    """Display name of class ``c``: ``class_names`` is a mapping class -> name or a sequence of the foreground
    names (index c - 1); "class c" when missing."""
    from cfrseg.metrics import class_label

    return class_label(c, class_names)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mid_slice(label: np.ndarray | None, depth: int) -> int:
    """The slice (last axis) with the most foreground, else the middle one."""
    if label is not None and label.any():
        return int(np.argmax((label > 0).reshape(-1, label.shape[-1]).sum(0)))
    return depth // 2


def _save(fig, path: str | Path) -> Path:
    """Lay out, write and close a figure."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    _plt().close(fig)
    return path


def overlay_png(path: str | Path, image: np.ndarray, panels: Sequence[tuple[str, np.ndarray | None]],
                title: str = "", z: int | None = None, num_classes: int | None = None,
                class_names: Mapping[int, str] | Sequence[str] | None = None) -> Path:
    """One row: the image, then the image with each label map (X, Y, Z arrays) drawn over it at slice ``z``.

    Slices are shown with x down and y across, like a radiology viewer's transverse view of the LA data. Each
    class has its own colour (:func:`class_colors`; ``num_classes`` defaults to the largest label + 1); with
    more than one foreground class a legend names the classes present in the shown slice.
    """
    plt = _plt()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    ref = next((p for _, p in panels if p is not None), None)
    k = num_classes or max([2] + [int(p.max()) + 1 for _, p in panels if p is not None and p.size])
    colors = class_colors(k)
    z = _mid_slice(ref, image.shape[-1]) if z is None else z
    img = image[:, :, z]
    lo, hi = np.percentile(img, [1, 99])
    n = 1 + len(panels)
    fig, axes = plt.subplots(1, n, figsize=(3.0 * n, 3.2), dpi=100)
    axes[0].imshow(img, cmap="gray", vmin=lo, vmax=hi)
    axes[0].set_title(f"image (z={z})", fontsize=9)
    cmap = ListedColormap(colors)
    shown: set[int] = set()
    for ax, (name, lab) in zip(axes[1:], panels):
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
        if lab is not None:
            sl = lab[:, :, z].astype(float)
            shown |= {int(v) for v in np.unique(lab[:, :, z]) if v > 0}
            ax.imshow(np.ma.masked_where(sl == 0, sl), cmap=cmap, vmin=-0.5, vmax=k - 0.5,
                      alpha=0.45, interpolation="nearest")
            ax.set_title(name, fontsize=9)
        else:
            ax.set_title(f"{name}: n/a", fontsize=9)
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    if k > 2 and shown:
        handles = [Patch(color=colors[c], label=class_name(c, class_names)) for c in sorted(shown) if c < k]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize=7, frameon=False)
        fig.tight_layout(rect=(0, 0.06 * (1 + (len(handles) - 1) // 7), 1, 1))
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        plt.close(fig)
        return path
    return _save(fig, path)


def loss_curves_png(path: str | Path, histories: Mapping[str, Sequence[Mapping[str, Any]]]) -> Path:
    """One panel per stage; each history is a list of {"step": int, <loss name>: float, ...}."""
    plt = _plt()
    items = [(k, h) for k, h in histories.items() if h]
    n = max(1, len(items))
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 3.5), dpi=100, squeeze=False)
    for ax, (stage, hist) in zip(axes[0], items):
        steps = [r.get("step", i) for i, r in enumerate(hist)]
        keys = [k for k in hist[-1] if k not in ("step", "lr", "time", "t") and isinstance(hist[-1][k], (int, float))]
        for k in keys:
            vals = np.array([r.get(k, math.nan) for r in hist], dtype=float)
            xs = np.asarray(steps, dtype=float)
            win = max(1, len(vals) // 50)
            if win > 1:  # trailing moving average for readability (no zero padding at the ends)
                vals = np.convolve(np.nan_to_num(vals), np.ones(win) / win, mode="valid")
                xs = xs[win - 1:]
            ax.plot(xs, vals, label=k, lw=1)
        ax.set_title(stage)
        ax.set_xlabel("iteration")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def metrics_table_md(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """rows: name -> {"dice": {"mean", "std"}, ...} (a cfrseg.metrics summary of the foreground classes)."""
    head = "| model | Dice | Jaccard | ASD (mm) | HD95 (mm) | cases |\n|---|---|---|---|---|---|\n"
    out = []
    for name, s in rows.items():
        cells = []
        for m in ("dice", "jaccard", "asd", "hd95"):
            v = s.get(m, {})
            cells.append(f"{_fmt(v.get('mean', math.nan))} ± {_fmt(v.get('std', math.nan))}" if v else "n/a")
        out.append(f"| {name} | " + " | ".join(cells) + f" | {s.get('n', '')} |")
    return head + "\n".join(out) + "\n"


def _num(v: Any) -> str:
    return _fmt(math.nan if v is None else float(v))


def per_class_md(summaries: Mapping[str, Mapping[str, Any]],
                 class_names: Mapping[int, str] | Sequence[str] | None = None,
                 metrics: Sequence[str] = ("dice", "hd95"), units: str = "mm") -> str:
    """Markdown tables, one per metric: a row per foreground class and a last "mean over classes" row, a column
    per named :func:`cfrseg.metrics.summarize` result ("mean ± std" over cases; NaN means are shown as nan)."""
    if not summaries:
        return ""
    names = list(summaries)
    classes = list(next(iter(summaries.values()))["classes"])
    out = []
    for m in metrics:
        unit = f" ({units})" if m in ("asd", "hd95") else ""
        out += [f"**{m}{unit}**", "", "| class | " + " | ".join(names) + " |",
                "|---|" + "---|" * len(names)]
        for j, c in enumerate(classes):
            cells = []
            for n in names:
                v = summaries[n]["metrics"][m]
                cells.append(f"{_num(v['mean'][j])} ± {_num(v['std'][j])}")
            out.append(f"| {class_name(c, class_names)} | " + " | ".join(cells) + " |")
        out.append("| mean over classes | "
                   + " | ".join(_num(summaries[n]["metrics"][m]["class_mean"]) for n in names) + " |")
        out.append("")
    return "\n".join(out)
