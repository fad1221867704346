"""Numeric precision of network compute: fp32, or bfloat16 autocast where the hardware runs it fast.

``"bf16"`` runs the forward pass under ``torch.autocast(dtype=torch.bfloat16)`` (the backward pass follows the
forward's dtypes); parameters, optimizer state and accumulators stay float32, so no loss scaling is needed
(bfloat16 has float32's exponent range). ``"auto"`` picks bf16 only where it is native:

- CPU: the processor reports AVX512-BF16 or AMX-BF16 (``torch.cpu._is_avx512_bf16_supported`` /
  ``_is_amx_tile_supported``, else the ``avx512_bf16`` / ``amx_bf16`` flags of ``/proc/cpuinfo``). Without them
  oneDNN emulates bfloat16 with float32 instructions, and it is *slower* than fp32 (a V-Net forward ran 2.5x
  slower on an AVX-512 CPU without BF16: docs/results.md, "bf16");
- CUDA: ``torch.cuda.is_bf16_supported()``;
- anything else: fp32.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
PRECISIONS_AUTO = ("auto", *PRECISIONS)
_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_bf16_native() -> bool:
    """True when this CPU has bfloat16 arithmetic in hardware (AVX512-BF16 or AMX-BF16)."""
    cpu = getattr(torch, "cpu", None)
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(cpu, name, None)
        if callable(fn):
            try:
                if fn():
                    return True
            except RuntimeError:  # pragma: no cover - very old builds
                pass
    return _cpuinfo_has_bf16(Path("/proc/cpuinfo"))


def _cpuinfo_has_bf16(path: Path) -> bool:
    """True when the first ``flags`` line of a /proc/cpuinfo-style file names avx512_bf16 or amx_bf16."""
    try:
        text = path.read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return any(f in flags for f in _CPU_FLAGS)
    return False


def bf16_native(device: torch.device | str) -> bool:
    """True when bfloat16 compute is native (fast) on ``device``."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return cpu_bf16_native()
    if dev.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``"fp32"`` or ``"bf16"`` for ``precision`` in :data:`PRECISIONS_AUTO` on ``device`` ("auto": bf16 where
    :func:`bf16_native`)."""
    if precision not in PRECISIONS_AUTO:
        raise ValueError(f"precision must be one of {list(PRECISIONS_AUTO)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if bf16_native(device) else "fp32"
    return precision


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context for ``precision`` ("fp32": a no-op context) on ``device``'s type."""
    p = resolve_precision(precision, device)
    if p == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
