"""Progress bars for the command line: turns ProgressEvents into one tqdm bar per stage."""

from __future__ import annotations

import sys

from tqdm import tqdm

from cfrseg.progress import ProgressEvent


class Bars:
    """A ProgressFn that shows one bar per stage, with the latest losses in the postfix."""

    def __init__(self, disable: bool | None = None) -> None:
        self._bars: dict[str, tqdm] = {}
        self._disable = disable if disable is not None else not sys.stderr.isatty()
        self._last_print: dict[str, int] = {}

    def __call__(self, ev: ProgressEvent) -> None:
        bar = self._bars.get(ev.stage)
        if bar is None:
            bar = tqdm(total=ev.total or None, desc=ev.stage, unit="step", dynamic_ncols=True,
                       disable=self._disable, leave=True)
            self._bars[ev.stage] = bar
        if ev.total and bar.total != ev.total:
            bar.total = ev.total
        delta = ev.step - bar.n
        if delta > 0:
            bar.update(delta)
        post = {k: f"{v:.4g}" for k, v in list(ev.losses.items())[:4]}
        if ev.message:
            post["msg"] = ev.message[:40]
        if post:
            bar.set_postfix(post, refresh=False)
        if self._disable:  # no terminal (CI, logs): print a line every ~10 % and at the end
            tot = max(ev.total, 1)
            pct = int(100 * ev.step / tot) // 10
            if self._last_print.get(ev.stage) != pct or ev.step == ev.total:
                self._last_print[ev.stage] = pct
                loss = " ".join(f"{k}={v:.4g}" for k, v in list(ev.losses.items())[:3])
                print(f"[{ev.stage}] {ev.step}/{ev.total} {loss} {ev.message}".rstrip(), file=sys.stderr, flush=True)
        if ev.total and ev.step >= ev.total:
            bar.close()

    def close(self) -> None:
        for b in self._bars.values():
            b.close()
