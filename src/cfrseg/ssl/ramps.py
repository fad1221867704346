"""Ramp-up schedules (Laine & Aila 2017, as used by Mean Teacher / UA-MT / ACMT).

``sigmoid_rampup(t, length) = exp(-5 (1 - clip(t / length, 0, 1))^2)``: 0.00674 at t = 0, exp(-1.25) = 0.2865 at
half the length and exactly 1 at (and after) the end. A length of 0 means "no ramp" (always 1).
"""

from __future__ import annotations

import math


def sigmoid_rampup(current: float, length: float) -> float:
    """Sigmoid-shaped ramp from exp(-5) to 1 over ``length`` (same unit as ``current``)."""
    if length <= 0:
        return 1.0
    t = min(max(float(current), 0.0), float(length)) / float(length)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def linear_rampup(current: float, length: float) -> float:
    """Linear ramp from 0 to 1 over ``length``."""
    if length <= 0:
        return 1.0
    return float(min(max(float(current), 0.0), float(length)) / float(length))
