"""Where an arm-vs-relu difference's noise comes from: question sampling or seed-to-seed variation.

Pure numpy/pandas (no torch, no Ray), on the verdict's own numbers (``hsae/verdict.py``): for each arm and each
metric the verdict tests, the variance of the mean paired difference as the test sees it, the part of it that the
question bootstrap (``hsae/scoring.py``) attributes to which questions the bank drew, the rest (seed to seed), and
the test's own power numbers beside them. ``docs/evaluation.md``, "Where the noise comes from", says how to read it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.stats as sps

from hsae import stats
from hsae.scoring import Bootstrap
from hsae.verdict import DECIDED_WORDS, DESCRIPTIVE, ArmResult, MetricTest, Verdict, claim, resampled_seed_table


@dataclass(frozen=True)
class NoiseSplit:
    """One arm minus the baseline on one metric: the variance of the mean difference over the seeds, split.

    ``question_var`` is NaN when the metric has no question resamples (read from the trial rows, e.g. the
    probe's accuracies); the shares are then NaN too."""

    arm: str
    metric: str
    n: int  # seeds behind the difference (the pairs the test uses)
    diff: float  # mean over those seeds of (arm - baseline)
    total_var: float  # the test's variance of that mean: (s.d. of the paired differences)^2 / n + shared
    question_var: float  # its variance over the question resamples (seeds held fixed)
    seed_var: float  # total - question, floored at 0
    question_share: float  # question / total; above 1 when ``question_exceeds``
    seed_share: float  # seed / total (0 when ``question_exceeds``)
    question_exceeds: bool  # the question variance is larger than the total the paired s.d. gives
    share_lo: float  # 90% interval of the question share from the paired s.d.'s n - 1 degrees of freedom
    share_hi: float
    resamples: int  # resamples behind ``question_var`` (those with a defined difference)
    mdd: float  # the verdict's minimal detectable difference at these seeds (ArmResult.mdd)
    mdd_seed_only: float  # the same were the question variance gone (an unlimited bank), at these seeds
    seeds_needed: int | None  # the verdict's seeds to decide (ArmResult.seeds_needed)
    decided: bool  # the comparison's interval already decides it (for a descriptive metric: would, were it a claim)

    @property
    def total_sd(self) -> float:
        """The s.d. of the mean difference as the test sees it."""
        return math.sqrt(self.total_var) if math.isfinite(self.total_var) else math.nan


@dataclass(frozen=True)
class MetricNoise:
    """Every tested arm's split on one metric (the verdict's ``MetricTest`` of it)."""

    metric: str
    role: str  # "headline", "witness" or "secondary", as the test's
    baseline: str
    splits: tuple[NoiseSplit, ...]
    resampled: bool  # the metric has question resamples (else only the test's numbers are shown)
    n_boot: int = 0

    def by_arm(self) -> dict[str, NoiseSplit]:
        return {s.arm: s for s in self.splits}

    def shares(self) -> list[float]:
        """The question shares with a value."""
        return [s.question_share for s in self.splits if math.isfinite(s.question_share)]

    def pooled_share(self) -> float:
        """The arms' question variances summed over their totals summed: the metric's question share with each
        total's chi-square noise averaged before dividing (one arm's share at 3 seeds is its truth times
        2 / chi²(2), whose median is 1.44: a median of the arms' shares reads high, a pooled one much less, its
        summed totals having more degrees of freedom)."""
        both = [(s.question_var, s.total_var) for s in self.splits
                if math.isfinite(s.question_var) and math.isfinite(s.total_var) and s.total_var > 0]
        total = sum(t for _, t in both)
        return sum(q for q, _ in both) / total if total > 0 else math.nan


def variance_split(total_var: float, question_var: float) -> tuple[float, float, float, bool]:
    """(seed variance, question share, seed share, question exceeds total) from the test's total variance of
    a mean difference and the question resamples' variance of it. The seed part is what the questions do not
    explain, floored at 0; a question variance above the total is flagged (its share is kept as measured)."""
    if not (math.isfinite(total_var) and math.isfinite(question_var)):
        return (max(total_var, 0.0) if math.isfinite(total_var) else math.nan), math.nan, math.nan, False
    exceeds = question_var > total_var
    seed = max(total_var - question_var, 0.0)
    if total_var <= 0:
        return seed, math.nan, math.nan, exceeds
    return seed, question_var / total_var, seed / total_var, exceeds


SHARE_LEVEL = 0.9


def share_interval(share: float, n: int, level: float = SHARE_LEVEL) -> tuple[float, float]:
    """The ``level`` interval of the true question share given the measured one at n seeds: the paired s.d.'s
    square s_d² is σ² χ²(n - 1) / (n - 1) under normal seed differences, so share = Q / (s_d² / n) has the truth
    times (n - 1) / χ²(n - 1); inverted, truth ∈ share · [χ²_lo, χ²_hi] / (n - 1). The question variance Q is
    taken as known (its bootstrap error is far smaller than s_d²'s at few seeds). At 3 seeds it is share ·
    [0.05, 3.0]: one arm's share says little there."""
    if n < 2 or not math.isfinite(share):
        return math.nan, math.nan
    tail = (1 - level) / 2
    lo, hi = sps.chi2.ppf([tail, 1 - tail], n - 1) / (n - 1)
    return float(share * lo), float(share * hi)


def resampled_differences(per_trial: pd.DataFrame, boot: Bootstrap, metric: str, arm: str, baseline: str,
                          seeds: tuple | list) -> np.ndarray:
    """(n_boot,) the mean over ``seeds`` of (arm - baseline) on each question resample
    (``verdict.resampled_seed_table``). NaN where a seed's difference is undefined on that resample."""
    table = resampled_seed_table(per_trial, boot, metric, [arm, baseline], seeds)
    if table is None or not len(seeds):
        return np.full(boot.samples[metric].shape[1] if metric in boot.samples else 0, np.nan)
    return np.mean(table[0] - table[1], axis=0)  # NaN where any seed's difference is NaN: the mean is not the test's


def question_variance(resampled: np.ndarray) -> tuple[float, int]:
    """(variance over the resamples with a defined mean difference, how many there are); NaN below 2."""
    finite = np.asarray(resampled, dtype=float)
    finite = finite[np.isfinite(finite)]
    return (float(np.var(finite, ddof=1)) if len(finite) >= 2 else math.nan), int(len(finite))


def arm_noise(result: ArmResult, test: MetricTest, per_trial: pd.DataFrame, boot: Bootstrap | None) -> NoiseSplit:
    """One comparison's split.

    Why the question variance of the *seed-mean difference* is the number to set against the test's: the test's
    uncertainty is the variance of d̄ = mean over seeds of d_s = y_arm,s - y_relu,s, estimated by s_d² / n; each
    d_s carries its seed's own draw (training randomness, data order) and the evaluation's question noise on that
    pair of SAEs. The bootstrap draws one resample of the questions for every trial at once (every trial answered
    the same bank) and holds the SAEs fixed, so recomputing d̄ on each resample and taking its variance gives the
    part of Var(d̄) due to which questions were drawn -- on the very statistic the test uses: question effects the
    arm and relu share within a seed cancel in d_s as they do in the test, and the question noise of different
    seeds' differences averages over the seeds as it does in d̄ (a per-trial or per-seed bootstrap variance would
    miss the first and not divide by n). The test's variance is s_d² / n plus the part the seeds share
    (``ArmResult.shared_var``: question effects common to every seed's difference move d̄ but cancel in
    d_s - d̄, so the paired s.d. cannot see them); what the questions do not explain is seed-to-seed. A question
    variance above the total (flagged, seed part 0) is s_d²'s own noise: it has n - 1 degrees of freedom."""
    total = (result.sd ** 2 / result.n + result.shared_var if result.n >= 1 and math.isfinite(result.sd)
             else math.nan)
    if boot is not None and test.metric in boot.samples:
        qvar, used = question_variance(resampled_differences(per_trial, boot, test.metric, result.arm,
                                                             test.baseline, result.seeds))
    else:
        qvar, used = math.nan, 0
    seed, q_share, s_share, exceeds = variance_split(total, qvar)
    lo, hi = share_interval(q_share, result.n)
    floor = (stats.paired_mdd(math.sqrt(seed * result.n), result.n, test.family, test.alpha)
             if math.isfinite(seed) and math.isfinite(qvar) else math.nan)
    return NoiseSplit(result.arm, test.metric, result.n, result.diff, total, qvar, seed, q_share, s_share, exceeds,
                      lo, hi, used, result.mdd, floor, result.seeds_needed, decided(result, test))


def decided(result: ArmResult, test: MetricTest) -> bool:
    """The comparison is decided: its claim, or for a descriptive metric the word its intervals would give."""
    if result.claim != DESCRIPTIVE:
        return result.decided
    margin = test.margin if math.isfinite(test.margin) else None
    return claim(result.lo, result.hi, test.higher_is_better, result.n, test.baseline, eq_lo=result.eq_lo,
                 eq_hi=result.eq_hi, margin=margin).startswith(DECIDED_WORDS)


def metric_noise(test: MetricTest, per_trial: pd.DataFrame, boot: Bootstrap | None) -> MetricNoise:
    """Every tested arm's split on ``test``'s metric (arms left out of the test have none)."""
    resampled = boot is not None and test.metric in boot.samples
    n_boot = int(boot.samples[test.metric].shape[1]) if resampled else 0
    return MetricNoise(test.metric, test.role, test.baseline,
                       tuple(arm_noise(r, test, per_trial, boot) for r in test.arms), resampled, n_boot)


def noise_split(v: Verdict) -> list[MetricNoise]:
    """The split for every metric the verdict tests, the headline's first."""
    return [metric_noise(t, v.per_trial, v.boot) for t in v.tests]
