"""The unlearning score, following SAEBench's procedure.

1. Firing frequencies of every feature on held-out forget and retain text of *select* documents
   (BOS/EOS/pad never counted).
2. For each retain threshold: drop features whose retain frequency >= threshold, sort the rest by
   forget frequency (descending; ties by index), take the top N.
3. Clamp those features to -multiplier where they fire, at layer L, and re-answer the questions.
4. effect = forget accuracy if retain accuracy >= 0.99 else 1; score = 1 - min(effect) over the grid, on
   all questions (SAEBench's definition). The matched-retain values choose the setting on one part of the
   questions and report its accuracy on the other (fold A; fold B, the reverse, is kept: ``hsae.scoring``).

Besides SAEBench's 16 settings (``grid = "saebench"``) an extended grid (more retain thresholds, feature
counts scaled to the dictionary) traces each SAE's forget-vs-retain trade-off; every setting keeps its
per-question outcomes (correct or not, and the probability of the correct option, quantised), and so does the
unmodified model (the ``baseline`` point), so every accuracy, probability and interval can be recomputed from
grid.parquet.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hsae.checks import check_finite_nonneg
from hsae.scoring import encode_p, mean_p

RETAIN_BAR = 0.99


@dataclass(frozen=True)
class UnlearningConfig:
    retain_thresholds: tuple[float, ...] = (0.001, 0.01)
    n_features: tuple[int, ...] = (10, 20)
    multipliers: tuple[float, ...] = (25.0, 50.0, 100.0, 200.0)
    # The extended grid: these thresholds too, a feature count that is this fraction of the dictionary, and
    # two multipliers (clamps of 25 and more already edit more than the residual's norm in our units, so
    # the multiplier axis barely moves a setting: docs/evaluation.md). Its cost is the prompts it re-runs.
    extended_thresholds: tuple[float, ...] = (0.003, 0.03)
    extended_feature_fractions: tuple[float, ...] = (1 / 32,)
    extended_multipliers: tuple[float, ...] = (25.0, 100.0)
    retain_bar: float = RETAIN_BAR
    min_forget_questions: int = 150
    min_retain_questions: int = 300
    # A speed path: stop re-answering retain questions once a setting has failed the retain bar (score and
    # forget accuracy unchanged, retain accuracy an upper bound, flagged). Off: reported retain is exact.
    stop_retain_early: bool = False

    def __post_init__(self) -> None:
        for name in ("retain_thresholds", "multipliers", "extended_thresholds", "extended_feature_fractions",
                     "extended_multipliers"):
            for v in getattr(self, name):
                check_finite_nonneg(name, v)
        if not self.retain_thresholds or not self.multipliers:
            raise ValueError("retain_thresholds and multipliers must not be empty")
        if not self.n_features or any(not isinstance(n, int) or n < 1 for n in self.n_features):
            raise ValueError(f"n_features must be positive integers, got {self.n_features!r}")
        if not 0 < self.retain_bar <= 1:
            raise ValueError(f"retain_bar must be in (0, 1], got {self.retain_bar!r}")

    def settings(self, d_sae: int | None = None) -> list[dict[str, Any]]:
        """SAEBench's settings, then (given the dictionary size) the extended grid's other settings."""
        base = [(t, n, m) for t in self.retain_thresholds for n in self.n_features for m in self.multipliers]
        out = [{"grid": "saebench", "retain_threshold": t, "n_features": n, "multiplier": m} for t, n, m in base]
        if d_sae is None:
            return out
        counts = sorted({*self.n_features, *(max(1, round(f * d_sae)) for f in self.extended_feature_fractions)})
        thresholds = sorted({*self.retain_thresholds, *self.extended_thresholds})
        out += [{"grid": "extended", "retain_threshold": t, "n_features": n, "multiplier": m}
                for t in thresholds for n in counts for m in self.extended_multipliers
                if (t, n) not in {(b[0], b[1]) for b in base}]
        return out


def select_features(forget_freq: np.ndarray, retain_freq: np.ndarray, retain_threshold: float, n: int) -> np.ndarray:
    """Features with retain frequency below the threshold, top ``n`` by forget frequency (never-firing
    features are not candidates: clamping them cannot change anything)."""
    candidates = np.flatnonzero((retain_freq < retain_threshold) & (forget_freq > 0))
    order = np.lexsort((candidates, -forget_freq[candidates]))  # by -freq, then index
    return candidates[order][:n]


def unlearning_score(grid: Sequence[dict[str, Any]], retain_bar: float = RETAIN_BAR) -> float:
    """SAEBench's score as SAEBench defines it (comparable with the field), on all questions:
    1 - min(forget_acc if retain_acc >= bar else 1). Setting and score share their questions here; the
    matched-retain values (``hsae.scoring.fold_metrics``) do not."""
    effects = [g["forget_acc"] if g["retain_acc"] >= retain_bar else 1.0 for g in grid]
    if not effects:
        raise ValueError("an unlearning score needs at least one grid setting")
    return 1.0 - min(effects)


@dataclass
class Outcome:
    """What one intervention did to the bank: which questions stay correct, and how hard it pushed."""

    correct: np.ndarray  # (n_questions,) bool, bank order
    touched: int  # prompts re-run (the intervention changed them)
    exact: bool  # False when retain questions were skipped (stop_retain_early): retain is an upper bound
    edit_ratio: float  # mean ||edit|| / ||residual|| over edited token positions (NaN: nothing edited)
    # (n_questions,) uint16, bank order: the softmax probability of the correct option over the options' scores,
    # quantised (hsae.scoring.quantise_p); None where the caller does not record it.
    p: np.ndarray | None = None


def bits(mask: np.ndarray) -> str:
    """A boolean vector as a '0'/'1' string (grid.parquet keeps per-question outcomes this way)."""
    return "".join("1" if v else "0" for v in np.asarray(mask, dtype=bool))


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


def grid_point(setting: dict[str, Any], outcome: Outcome, domains: np.ndarray, is_select: np.ndarray
               ) -> dict[str, Any]:
    """One setting's row: accuracies on all questions (``forget_acc``, ``retain_acc``), on select questions
    (``*_select``) and on test questions (``*_test``), the per-question outcomes of each domain in bank order
    (questions.parquet gives each position's role) and, where the outcome records them, the same for the
    probability of the correct option: its means (``forget_p``, ``forget_p_select``, ...) computed from the stored
    quantised values, and those values (``forget_p_correct``, ``hsae.scoring.encode_p``)."""
    correct, sel = outcome.correct, np.asarray(is_select, dtype=bool)
    point = {**setting}
    for name, d in (("forget", 1), ("retain", 0)):
        mine, mask = correct[domains == d], sel[domains == d]
        point[f"{name}_acc"] = float(mine.mean())
        point[f"{name}_acc_select"] = float(mine[mask].mean())
        point[f"{name}_acc_test"] = float(mine[~mask].mean())
    point.update({"retain_acc_exact": outcome.exact, "questions_touched": outcome.touched,
                  "edit_ratio": outcome.edit_ratio, "forget_correct": bits(correct[domains == 1]),
                  "retain_correct": bits(correct[domains == 0])})
    if outcome.p is not None:
        q = np.asarray(outcome.p, dtype=np.uint16)
        for name, d in (("forget", 1), ("retain", 0)):
            mine, mask = q[domains == d], sel[domains == d]
            point[f"{name}_p"] = float(mean_p(mine))
            point[f"{name}_p_select"] = float(mean_p(mine[mask]))
            point[f"{name}_p_test"] = float(mean_p(mine[~mask]))
            point[f"{name}_p_correct"] = encode_p(mine)
    return point


def baseline_point(baseline_correct: np.ndarray, baseline_p: np.ndarray, domains: np.ndarray, is_select: np.ndarray
                   ) -> dict[str, Any]:
    """The unmodified model's grid point (``grid`` "control"): its outcomes and probabilities of the correct option,
    the reference every probability share divides by."""
    unmodified = Outcome(np.asarray(baseline_correct, dtype=bool).copy(), 0, True, float("nan"),
                         np.asarray(baseline_p, dtype=np.uint16).copy())
    return {"grid": "control", **grid_point({}, unmodified, domains, is_select)}


def run_grid(
    settings: Sequence[dict[str, Any]],
    make_intervention: Callable[[dict[str, Any]], Any],
    accuracy: Callable[[Any], Outcome],
    domains: np.ndarray,
    is_select: np.ndarray,
    baseline_correct: np.ndarray,
    retain_bar: float = RETAIN_BAR,
    baseline_p: np.ndarray | None = None,
) -> GridResult:
    """Score every setting with one accuracy function; the SAEBench score counts only SAEBench settings.
    ``is_select`` (bank order) marks the select questions (the rest are test questions);
    ``baseline_correct`` (bank order) says which questions the unmodified model answers correctly and
    ``baseline_p`` (quantised) how probable it finds each correct option: with it the result carries the unmodified
    model's own grid point (``baseline``), the reference of every probability share."""
    grid = [grid_point(s, accuracy(make_intervention(s)), domains, is_select) for s in settings]
    saebench = [g for g in grid if g.get("grid", "saebench") == "saebench"]
    outcomes = [(g["forget_acc"], g["retain_acc"]) for g in saebench]
    ties = len(outcomes) - len(set(outcomes))
    n_forget, n_retain = int((domains == 1).sum()), int((domains == 0).sum())
    baseline_forget, baseline_retain = (float(baseline_correct[domains == d].mean()) for d in (1, 0))
    extra = {} if baseline_p is None else {"baseline": baseline_point(baseline_correct, baseline_p, domains, is_select)}
    return GridResult(unlearning_score(saebench, retain_bar), grid, n_forget, n_retain, baseline_forget,
                      baseline_retain, ties, extra)


def firing_frequencies(encode: Callable[[torch.Tensor], torch.Tensor], x: Any, labels: np.ndarray,
                       batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of forget tokens and of retain tokens on which each feature fires (the caller passes
    content rows only: BOS, EOS and padding are never counted)."""
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
