"""Checkpoint files that load with ``torch.load(weights_only=True)``: tensors, state dicts and plain metadata only.

A stage checkpoint also holds RNG states, and NumPy's is a tuple with an ``ndarray``, which the restricted
unpickler refuses. :func:`dumps` therefore stores every ``ndarray`` (and NumPy scalar) as a tagged tensor and
:func:`loads` restores it, so nothing but the safe types reaches the file, and a file that holds anything else (a
pickled object that could run code when loaded) is refused with :class:`~cfrseg.errors.InputError`.

Checkpoints written before this module (NumPy arrays pickled as such) still load: for them the NumPy array
reconstructors alone are added to the allowed globals.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch

from cfrseg.errors import InputError

_TAG = "__ndarray__"


def to_safe(obj: Any) -> Any:
    """``obj`` with NumPy arrays/scalars replaced by tensors (arrays tagged with their dtype), recursively."""
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        wide = arr.astype(np.int64) if arr.dtype.kind == "u" else arr  # torch has no general uint32/64 tensors
        return {_TAG: torch.from_numpy(wide.copy()), "dtype": arr.dtype.str}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_safe(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_safe(v) for v in obj)
    return obj


def from_safe(obj: Any) -> Any:
    """The inverse of :func:`to_safe`."""
    if isinstance(obj, dict):
        if _TAG in obj and set(obj) == {_TAG, "dtype"}:
            return obj[_TAG].numpy().astype(np.dtype(obj["dtype"]))
        return {k: from_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_safe(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(from_safe(v) for v in obj)
    return obj


def dumps(obj: Any) -> bytes:
    """Serialise a checkpoint (``torch.save`` of :func:`to_safe` of ``obj``)."""
    buf = io.BytesIO()
    torch.save(to_safe(obj), buf)
    return buf.getvalue()


def _numpy_globals() -> list[Any]:
    core = getattr(np, "_core", None) or np.core  # numpy 2 / 1
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, *{type(np.dtype(t)) for t in np.typecodes["All"]}]


def loads(data: bytes, where: str) -> Any:
    """Load a checkpoint written by :func:`dumps` (or an older one with NumPy arrays) with
    ``weights_only=True``; anything else pickled in it is refused with InputError naming ``where``."""
    try:
        return from_safe(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
    except Exception as e:  # noqa: BLE001  (the restricted unpickler raises UnpicklingError; zip errors vary)
        first = e
    if "numpy" in str(first):
        try:
            with torch.serialization.safe_globals(_numpy_globals()):
                return from_safe(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
        except Exception as e:  # noqa: BLE001
            first = e
    raise InputError(f"{where}: refused to load: {_reason(first)}. Checkpoints may hold only tensors, state "
                     f"dicts and plain metadata (torch.load weights_only=True); delete the file or start the "
                     f"stage again") from None


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if "Unsupported global" in text or "weights_only" in text.lower() or "WeightsUnpickler" in text:
        start = text.find("Unsupported global")
        detail = text[start:start + 160].split(". ")[0] if start >= 0 else text[:160]
        return f"it contains pickled Python objects ({detail})"
    return f"not a readable checkpoint ({type(e).__name__}: {text[:200]})"
