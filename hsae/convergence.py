"""The convergence verdict every trial carries (docs/training.md, "When is an SAE trained?").

A run is converged when its held-out MSE changed by less than ``TOLERANCE`` (relative) over the last
``WINDOW`` of its steps. Pure functions of (step, val_mse) pairs, so anyone can recompute the verdict
from ``curves.parquet``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

WINDOW = 0.2  # the last fifth of the steps
TOLERANCE = 0.02  # |relative change of held-out MSE| over the window
MAX_LOG_GAP = 0.05  # held-out MSE is logged at least every 5% of the steps


def val_mse_rel_change(steps: Sequence[float], val_mse: Sequence[float], total_steps: int) -> float:
    """(MSE at the last step - MSE at the window's start) / MSE at the window's start.

    The window starts at the last logged step at or before ``(1 - WINDOW) * total_steps``; NaN when the
    curve has no point there or none at ``total_steps``.
    """
    points = {float(s): float(v) for s, v in zip(steps, val_mse, strict=True) if v is not None and math.isfinite(v)}
    start_limit = (1.0 - WINDOW) * total_steps
    starts = [s for s in points if s <= start_limit + 1e-9]
    if not starts or float(total_steps) not in points:
        return float("nan")
    start = points[max(starts)]
    return (points[float(total_steps)] - start) / start if start > 0 else float("nan")


def is_converged(rel_change: float) -> bool:
    return math.isfinite(rel_change) and abs(rel_change) < TOLERANCE


def log_every_for(steps: int) -> int:
    """The largest log interval that still logs held-out MSE every ``MAX_LOG_GAP`` of ``steps``."""
    return max(1, math.floor(steps * MAX_LOG_GAP))
