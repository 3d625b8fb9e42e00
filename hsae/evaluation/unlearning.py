"""The unlearning score, following SAEBench's procedure.

1. Firing frequencies of every feature on forget and on retain text (BOS/pad never counted).
2. For each retain threshold: drop features whose retain frequency >= threshold, sort the rest by
   forget frequency (descending; ties by index), take the top N.
3. Clamp those features to -multiplier where they fire, at layer L, and re-answer the questions.
4. effect = forget accuracy if retain accuracy >= 0.99 else 1; score = 1 - min(effect) over the grid.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hsae.checks import check_finite_nonneg

RETAIN_BAR = 0.99


@dataclass(frozen=True)
class UnlearningConfig:
    retain_thresholds: tuple[float, ...] = (0.001, 0.01)
    n_features: tuple[int, ...] = (10, 20)
    multipliers: tuple[float, ...] = (25.0, 50.0, 100.0, 200.0)
    retain_bar: float = RETAIN_BAR
    min_forget_questions: int = 150
    min_retain_questions: int = 300
    # Stop re-answering retain questions once a setting has failed the retain bar: the score is the
    # same, forget accuracy stays exact, the retain accuracy becomes an upper bound (flagged).
    stop_retain_early: bool = True

    def __post_init__(self) -> None:
        for name in ("retain_thresholds", "multipliers"):
            values = getattr(self, name)
            if not values:
                raise ValueError(f"{name} must not be empty")
            for v in values:
                check_finite_nonneg(name, v)
        if not self.n_features or any(not isinstance(n, int) or n < 1 for n in self.n_features):
            raise ValueError(f"n_features must be positive integers, got {self.n_features!r}")
        if not 0 < self.retain_bar <= 1:
            raise ValueError(f"retain_bar must be in (0, 1], got {self.retain_bar!r}")

    def settings(self) -> list[tuple[float, int, float]]:
        return [(t, n, m) for t in self.retain_thresholds for n in self.n_features for m in self.multipliers]


def select_features(forget_freq: np.ndarray, retain_freq: np.ndarray, retain_threshold: float, n: int) -> np.ndarray:
    """Features with retain frequency below the threshold, top ``n`` by forget frequency (never-firing
    features are not candidates: clamping them cannot change anything)."""
    candidates = np.flatnonzero((retain_freq < retain_threshold) & (forget_freq > 0))
    order = np.lexsort((candidates, -forget_freq[candidates]))  # by -freq, then index
    return candidates[order][:n]


def unlearning_score(grid: Iterable[dict[str, Any]], retain_bar: float = RETAIN_BAR) -> float:
    effects = [g["forget_acc"] if g["retain_acc"] >= retain_bar else 1.0 for g in grid]
    if not effects:
        raise ValueError("an unlearning score needs at least one grid setting")
    return 1.0 - min(effects)


@dataclass
class GridResult:
    score: float
    grid: list[dict[str, Any]]
    n_forget: int
    n_retain: int
    baseline_forget_acc: float
    baseline_retain_acc: float
    ties: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"score": self.score, "grid": self.grid, "n_forget": self.n_forget, "n_retain": self.n_retain,
                "baseline_forget_acc": self.baseline_forget_acc, "baseline_retain_acc": self.baseline_retain_acc,
                "tied_settings": self.ties, **self.extra}


def run_grid(
    settings: Sequence[dict[str, Any]],
    make_intervention: Callable[[dict[str, Any]], Any],
    accuracy: Callable[[Any], tuple[float, float, int, bool]],
    n_forget: int,
    n_retain: int,
    retain_bar: float = RETAIN_BAR,
) -> GridResult:
    """Score every setting with one accuracy function; report the grid and how many settings tie."""
    grid = []
    for setting in settings:
        forget_acc, retain_acc, touched, exact = accuracy(make_intervention(setting))
        grid.append({**setting, "forget_acc": forget_acc, "retain_acc": retain_acc, "retain_acc_exact": exact,
                     "questions_touched": touched})
    outcomes = [(g["forget_acc"], g["retain_acc"]) for g in grid]
    ties = len(outcomes) - len(set(outcomes))
    return GridResult(unlearning_score(grid, retain_bar), grid, n_forget, n_retain, 1.0, 1.0, ties)


def firing_frequencies(encode: Callable[[torch.Tensor], torch.Tensor], x: Any, labels: np.ndarray,
                       batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of forget tokens and of retain tokens on which each feature fires (rows exclude BOS)."""
    counts = {0: None, 1: None}
    totals = {0: 0, 1: 0}
    n = len(labels)
    for start in range(0, n, batch):
        idx = np.arange(start, min(start + batch, n))
        with torch.no_grad():
            fired = (encode(torch.as_tensor(np.asarray(x[idx]), dtype=torch.float32)) > 0).numpy()
        lab = labels[idx]
        for d in (0, 1):
            rows = fired[lab == d].sum(axis=0)
            counts[d] = rows if counts[d] is None else counts[d] + rows
            totals[d] += int((lab == d).sum())
    if totals[0] == 0 or totals[1] == 0:
        raise ValueError("firing frequencies need both forget and retain tokens")
    return counts[1] / totals[1], counts[0] / totals[0]
