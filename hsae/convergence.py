"""The convergence verdict every trial carries (docs/training.md, "When is an SAE trained?").

Two checks, both on the held-out MSE, both pure functions of (step, val_mse) pairs so anyone can
recompute the verdict from ``curves.parquet``. Each reads a window's change between its two ends, where an end's
level is the median of the ``END_POINTS`` logged points nearest it: one held-out evaluation that lands on a
transient (a resampling, a jump of the assignment) neither fails a flat curve nor passes a falling one.

- the plateau: over the last ``WINDOW`` of the constant-rate steps before the learning-rate decay (of all the
  steps when there is no decay), the MSE changed by less than ``TOLERANCE`` per ``WINDOW`` of the steps, and so
  did the L0 controller's coefficient where it still acts there (a fixed objective in effect, at a fixed rate).
  A decay schedule cannot pass it: it is read before the decay starts;
- the end: over the last ``WINDOW`` of the steps it did not rise by ``TOLERANCE`` or more (no instability or
  over-fitting at the end). One-sided: a learning-rate decay there is meant to lower it, and how much a decay
  gains says nothing about whether more tokens would help (the plateau says that).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

WINDOW = 0.2  # the last fifth of the steps
TOLERANCE = 0.02  # |relative change of held-out MSE| over the window
MAX_LOG_GAP = 0.025  # held-out MSE logged at least every 2.5% of the steps: 9 points in a window, 3 at each end
MIN_PLATEAU = 0.1  # a plateau window shorter than this fraction of the steps gives no verdict
END_POINTS = 3  # an end's level: the median of this many logged points (at most half the window's points)


def val_mse_rel_change(steps: Sequence[float], val_mse: Sequence[float], total_steps: int) -> float:
    """(level at the window's end - level at its start) / level at its start, the levels read by ``end_levels``.

    The window starts at the last logged step at or before ``(1 - WINDOW) * total_steps``; NaN when the
    curve has no point there or none at ``total_steps``.
    """
    points = _finite_points(steps, val_mse)
    start_limit = (1.0 - WINDOW) * total_steps
    starts = [s for s in points if s <= start_limit + 1e-9]
    if not starts or float(total_steps) not in points:
        return float("nan")
    levels = end_levels(points, (max(starts), float(total_steps)))
    if levels is None or levels[0][1] <= 0:
        return float("nan")
    (_, start), (_, end) = levels
    return (end - start) / start


def is_converged(rel_change: float) -> bool:
    return math.isfinite(rel_change) and abs(rel_change) < TOLERANCE


def log_every_for(steps: int) -> int:
    """The largest log interval that still logs held-out MSE every ``MAX_LOG_GAP`` of ``steps``."""
    return max(1, math.floor(steps * MAX_LOG_GAP))


def _finite_points(steps: Sequence[float], val_mse: Sequence[float]) -> dict[float, float]:
    return {float(s): float(v) for s, v in zip(steps, val_mse, strict=True) if v is not None and math.isfinite(v)}


def plateau_window(steps: Sequence[float], val_mse: Sequence[float], total_steps: int, warm_until: int,
                   decay_start: int) -> tuple[float, float] | None:
    """The logged steps (start, end) the plateau is read between: the last ``WINDOW`` of the steps before
    ``decay_start``, starting no earlier than ``warm_until`` (the end of the warm-ups); None when the logged
    points inside that span are less than ``MIN_PLATEAU`` of the steps apart."""
    points = _finite_points(steps, val_mse)
    lo = max(float(warm_until), decay_start - WINDOW * total_steps)
    inside = sorted(s for s in points if lo - 1e-9 <= s <= decay_start + 1e-9)
    if len(inside) < 2 or inside[-1] - inside[0] < MIN_PLATEAU * total_steps - 1e-9:
        return None
    return inside[0], inside[-1]


def end_levels(points: dict[float, float], window: tuple[float, float]
               ) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """((step, level) at the window's start, (step, level) at its end): each end's level is the median of its
    ``END_POINTS`` nearest logged points inside the window (fewer when the window holds fewer than twice that),
    its step the median of theirs. None when an end of the window is not a logged point."""
    if window[0] not in points or window[1] not in points:
        return None
    inside = sorted(s for s in points if window[0] - 1e-9 <= s <= window[1] + 1e-9)
    k = max(1, min(END_POINTS, len(inside) // 2))

    def level(chosen: list[float]) -> tuple[float, float]:
        return statistics.median(chosen), statistics.median(points[s] for s in chosen)

    return level(inside[:k]), level(inside[-k:])


def _window_change(points: dict[float, float], window: tuple[float, float], total_steps: int) -> float:
    """Relative change of a curve between the levels of the window's ends, scaled to ``WINDOW`` of the steps
    (a change over a shorter span is extrapolated at its rate); NaN where the curve lacks an end or starts at
    <= 0."""
    levels = end_levels(points, window)
    if levels is None or levels[0][1] <= 0:
        return float("nan")
    (start_step, start), (end_step, end) = levels
    return (end - start) / start * (WINDOW * total_steps) / (end_step - start_step)


def convergence_verdict(steps: Sequence[float], val_mse: Sequence[float], total_steps: int, warm_until: int,
                        decay_start: int, multiplier: Sequence[float] | None = None) -> dict[str, float | bool | None]:
    """The row's convergence columns: both checks, the window the plateau was read on and the verdict.

    ``multiplier`` is the L0 controller's curve (None: no controller). Where the controller still acts in the
    plateau window, the objective is fixed only if the coefficient held still: its change across the window
    (``plateau_multiplier_change``, same scaling) must be under ``TOLERANCE`` too.
    """
    end_change = val_mse_rel_change(steps, val_mse, total_steps)
    window = plateau_window(steps, val_mse, total_steps, warm_until, decay_start)
    plateau = float("nan") if window is None else _window_change(_finite_points(steps, val_mse), window, total_steps)
    coeff_change = None
    if multiplier is not None:
        coeff_change = float("nan") if window is None else _window_change(_finite_points(steps, multiplier), window,
                                                                           total_steps)
    steady = coeff_change is None or is_converged(coeff_change)
    return {"val_mse_rel_change": end_change, "plateau_rel_change": plateau,
            "plateau_multiplier_change": coeff_change,
            "plateau_start_step": None if window is None else int(window[0]),
            "plateau_end_step": None if window is None else int(window[1]),
            "converged": is_stable_at_end(end_change) and is_converged(plateau) and steady}


def is_stable_at_end(rel_change: float) -> bool:
    """The end check: held-out MSE did not rise by TOLERANCE over the last WINDOW (falling is fine)."""
    return math.isfinite(rel_change) and rel_change < TOLERANCE
