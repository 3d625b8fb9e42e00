"""Training an L1-penalised SAE to a target L0 (docs/training.md, "Target L0").

The controller multiplies the variant's shared sparsity coefficient by ``multiplier``. During the
calibration phase it reads the training batch's L0, smooths it (EMA) and moves the multiplier
proportionally in log space, ``log m += gain * log(L0_ema / target)``: too many active latents raise the
penalty, too few lower it. After the phase the multiplier is frozen, so the rest of training optimises
one fixed objective. Its state is three floats, saved with every checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

# A single step never moves the coefficient by more than this factor (e^0.05 ~ 5%), whatever the error.
MAX_LOG_STEP = 0.05
# A trial meets its target when its held-out L0 is within this fraction of it.
TARGET_TOLERANCE = 0.05


@dataclass
class L0Controller:
    """Proportional control of log(multiplier) on the batch-L0 EMA, active on steps [start, end)."""

    target: float
    start: int
    end: int
    gain: float
    ema_decay: float
    log_multiplier: float = 0.0
    l0_ema: float | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.target, (int, float)) and self.target > 0):
            raise ValueError(f"target_l0 must be > 0, got {self.target!r}")

    @property
    def multiplier(self) -> float:
        return math.exp(self.log_multiplier)

    def observe(self, step: int, batch_l0: float) -> None:
        """Update after step ``step`` (0-based) whose training batch had mean L0 ``batch_l0``."""
        if not self.start <= step < self.end:
            return
        d = self.ema_decay
        self.l0_ema = batch_l0 if self.l0_ema is None else d * self.l0_ema + (1 - d) * batch_l0
        error = math.log(max(self.l0_ema, 1e-3) / self.target)
        self.log_multiplier += max(-MAX_LOG_STEP, min(MAX_LOG_STEP, self.gain * error))

    def state(self) -> dict[str, Any]:
        return asdict(self)

    def load(self, state: dict[str, Any]) -> None:
        self.log_multiplier = float(state["log_multiplier"])
        self.l0_ema = None if state["l0_ema"] is None else float(state["l0_ema"])


def target_met(l0: float | None, target: float | None) -> bool | None:
    """Whether the held-out ``l0`` is within ``TARGET_TOLERANCE`` of ``target`` (None: no target)."""
    if target is None:
        return None
    return l0 is not None and math.isfinite(l0) and abs(l0 - target) <= TARGET_TOLERANCE * target
