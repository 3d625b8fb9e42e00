"""The statistics of the verdict, in one place (docs/evaluation.md, "The seed-level test").

* t quantiles and ``mean_ci95`` (the report's "mean ± half-width" cells);
* the test that makes the claims: each arm against one control by its own paired differences over the seeds
  (a seed fixes the data order for every arm), Bonferroni over the family, with an equivalence interval
  (two one-sided tests) and the decisions better / worse / equivalent / undecided; its power, the seeds that
  would decide, and the staged procedure that adds seeds until decided;
* a trend along an ordered parameter: a pre-declared slope contrast tested the same way;
* for comparison, the pooled block-design test (two-way ANOVA, Dunnett's many-to-one correction; Dunnett
  1955), which assumes one spread for every arm, and its power.

Everything is vectorised over leading axes, so a calibration simulation runs thousands of sweeps at once.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from scipy import optimize, special
from scipy import stats as sps

# Quadrature of Dunnett's distribution: probabilists' Gauss-Hermite nodes over the control's mean and
# Gauss-Legendre nodes over the probability scale of the residual s.d.'s chi distribution.
_X_NODES, _X_WEIGHTS = np.polynomial.hermite_e.hermegauss(32)
_X_WEIGHTS = _X_WEIGHTS / math.sqrt(2 * math.pi)
_U_NODES, _U_WEIGHTS = np.polynomial.legendre.leggauss(64)
_U_NODES, _U_WEIGHTS = (_U_NODES + 1) / 2, _U_WEIGHTS / 2


@lru_cache(maxsize=4096)
def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom."""
    if not 0 < p < 1 or not df > 0:
        raise ValueError(f"need 0 < p < 1 and df > 0, got p={p!r}, df={df!r}")
    return float(sps.t.ppf(p, df))


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of a t-based 95% confidence interval (NaN half-width for one value)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    n = len(vals)
    mean = sum(vals) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    return mean, t_quantile(0.975, n - 1) * sd / math.sqrt(n)


# -- Dunnett's many-to-one distribution ---------------------------------------------------------
@lru_cache(maxsize=256)
def _chi_scale(df: int) -> np.ndarray:
    """s = sqrt(chi2_df / df) at the Gauss-Legendre nodes of the probability scale."""
    return np.sqrt(sps.chi2.ppf(_U_NODES, df) / df)


def dunnett_cdf(c: Any, m: int, df: int) -> np.ndarray:
    """P(max_i |T_i| <= c) for m two-sided comparisons with one control, equal replication (correlation
    1/2), residual ``df``: E over the control's mean x and the s.d. ratio s of
    (Phi(x + c s sqrt2) - Phi(x - c s sqrt2))^m. Vectorised over ``c``."""
    if m < 1 or df < 1:
        raise ValueError(f"need m >= 1 comparisons and df >= 1, got m={m!r}, df={df!r}")
    c = np.asarray(c, dtype=float)
    if m == 1:  # one comparison: Student's t, exactly
        return 1.0 - 2.0 * sps.t.sf(c, df)
    a = c[..., None, None] * math.sqrt(2.0) * _chi_scale(int(df))[:, None]  # (..., s, x)
    x = _X_NODES[None, :]
    inner = (special.ndtr(x + a) - special.ndtr(x - a)) ** m
    return np.einsum("...sx,x,s->...", inner, _X_WEIGHTS, _U_WEIGHTS)


@lru_cache(maxsize=256)
def _dunnett_table(m: int, df: int) -> tuple[np.ndarray, np.ndarray]:
    """``dunnett_cdf`` on a fine grid of c = u / (1 - u), u in [0, 1): what p values interpolate."""
    u = np.linspace(0.0, 0.9995, 1201)
    c = u / (1 - u)
    cdf = np.concatenate([dunnett_cdf(chunk, m, df) for chunk in np.array_split(c, 12)])
    return u, cdf


def dunnett_pvalue(t: Any, m: int, df: int) -> np.ndarray:
    """Single-step adjusted two-sided p value of a statistic |t| among m comparisons with one control
    (interpolated on a cached table of ``dunnett_cdf``: error < 1e-4; p ~ 0 beyond c = 2000)."""
    a = np.abs(np.asarray(t, dtype=float))
    u_grid, cdf = _dunnett_table(int(m), int(df))
    u = np.where(np.isfinite(a), a / (1 + np.where(np.isfinite(a), a, 0.0)), 1.0)
    return np.clip(1.0 - np.interp(u, u_grid, cdf, right=1.0), 0.0, 1.0)


@lru_cache(maxsize=1024)
def dunnett_critical(m: int, df: int, alpha: float = 0.05) -> float:
    """The c with P(max_i |T_i| <= c) = 1 - alpha (two-sided Dunnett critical value)."""
    if not 0 < alpha < 1:
        raise ValueError(f"need 0 < alpha < 1, got {alpha!r}")
    hi = t_quantile(1 - alpha / (2 * m), df) + 1.0  # Bonferroni's bound is above Dunnett's value
    return float(optimize.brentq(lambda c: float(dunnett_cdf(c, m, df)) - (1 - alpha), 0.0, hi, xtol=1e-10))


# -- the randomized complete block design -------------------------------------------------------
@dataclass(frozen=True)
class ManyToOne:
    """Every arm against the control in an arm x block table (control first): Dunnett-adjusted.

    Arrays have the table's leading (batch) shape, then one entry per non-control arm."""

    diff: np.ndarray  # arm mean - control mean
    se: np.ndarray  # standard error of each difference: sd_resid * sqrt(2 / blocks)
    t: np.ndarray
    lo: np.ndarray  # simultaneous (1 - alpha) interval: diff -/+ crit * se
    hi: np.ndarray
    p_adj: np.ndarray  # Dunnett-adjusted p value
    sd_resid: np.ndarray  # pooled residual s.d. of the two-way model (batch shape)
    df: int  # (arms - 1) * (blocks - 1)
    crit: float
    alpha: float


def rcbd_residual_sd(y: Any) -> np.ndarray:
    """Residual s.d. of the additive two-way model (arm + block) of (..., arms, blocks) values."""
    y = np.asarray(y, dtype=float)
    k, b = y.shape[-2:]
    if k < 2 or b < 2:
        raise ValueError(f"the block design needs >= 2 arms and >= 2 blocks (seeds), got {k} x {b}")
    resid = (y - y.mean(axis=-1, keepdims=True) - y.mean(axis=-2, keepdims=True)
             + y.mean(axis=(-2, -1), keepdims=True))
    return np.sqrt((resid ** 2).sum(axis=(-2, -1)) / ((k - 1) * (b - 1)))


def many_to_one(y: Any, alpha: float = 0.05) -> ManyToOne:
    """Two-way ANOVA of a complete (..., arms, blocks) table, row 0 the control, every other row
    compared with it by Dunnett's test on the pooled residual variance (df = (arms-1)(blocks-1))."""
    y = np.asarray(y, dtype=float)
    if not np.isfinite(y).all():
        raise ValueError("the block design needs a value for every arm and block (no NaN)")
    k, b = y.shape[-2:]
    sd = rcbd_residual_sd(y)
    df, m = (k - 1) * (b - 1), k - 1
    means = y.mean(axis=-1)
    diff = means[..., 1:] - means[..., :1]
    se = sd[..., None] * math.sqrt(2.0 / b) * np.ones(m)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(se > 0, diff / np.where(se > 0, se, 1.0), np.where(diff == 0, 0.0, np.inf * np.sign(diff)))
    crit = dunnett_critical(m, df, alpha)
    return ManyToOne(diff, se, t, diff - crit * se, diff + crit * se, dunnett_pvalue(t, m, df), sd, df, crit, alpha)


def rejection_probability(delta_over_se: float, crit: float, df: int) -> float:
    """P(|T| > crit) for T a noncentral t with ``df`` and noncentrality ``delta_over_se``."""
    d = sps.nct(df, abs(delta_over_se))
    return float(d.sf(crit) + np.nan_to_num(d.cdf(-crit)))  # the far tail (wrong sign) is ~0; scipy may say NaN


def min_detectable_difference(sd_resid: float, n_arms: int, n_blocks: int, alpha: float = 0.05,
                              power: float = 0.8) -> float:
    """The smallest true difference from the control that one comparison of ``many_to_one`` (the test
    that makes the claims) detects with probability ``power``, for residual s.d. ``sd_resid``, ``n_arms``
    arms (control included) and ``n_blocks`` seeds. NaN when it cannot be computed."""
    if n_arms < 2 or n_blocks < 2 or not (math.isfinite(sd_resid) and sd_resid > 0):
        return math.nan
    return sd_resid * _unit_mdd(int(n_arms), int(n_blocks), float(alpha), float(power))


@lru_cache(maxsize=1024)
def _unit_mdd(n_arms: int, n_blocks: int, alpha: float, power: float) -> float:
    """``min_detectable_difference`` at residual s.d. 1 (it scales linearly with the s.d.)."""
    df = (n_arms - 1) * (n_blocks - 1)
    return noncentrality_for_power(dunnett_critical(n_arms - 1, df, alpha), df, power) * math.sqrt(2.0 / n_blocks)


def noncentrality_for_power(crit: float, df: int, power: float) -> float:
    """The noncentrality at which a two-sided t test with critical value ``crit`` and ``df`` rejects with
    probability ``power`` (inf when beyond reach)."""
    hi = crit + 2.0
    while rejection_probability(hi, crit, df) < power:
        if hi > 1e5:
            return math.inf
        hi *= 2
    return float(optimize.brentq(lambda d: rejection_probability(d, crit, df) - power, 0.0, hi, xtol=1e-9))


# -- the robust many-to-one test: each arm by its own paired differences -------------------------
# The pooled test above assumes one seed-to-seed spread for every arm; an arm (or a control) noisier than
# the others makes it claim differences that are not there (docs/evaluation.md, "The seed-level test").
# Here each comparison uses only its own paired differences, arm - control at the seeds both have: the seed's
# shared data order cancels, and the variance is that difference's own, whatever the other arms do. Each t
# is Student's t with n - 1 df under normal seed effects, and Bonferroni over the family holds for any
# dependence between the comparisons, so the family-wise rate is <= alpha by construction.
# One part of the variance the paired differences cannot see: every seed is scored on the same bank of
# questions, so the questions' effect on (arm - control) that the seeds share moves every d_s alike and
# cancels in d_s - mean. ``shared`` adds it (``shared_variance``, from the question bootstrap): the claim is
# then about questions like the bank's, not about this bank. The df stay n - 1 (the added part is not
# counted as more information: Satterthwaite's df, which would count it, claims 13.5% under the main job's
# within-seed permutations; docs/evaluation.md, "Questions every seed shares").
BETTER_UP, BETTER_DOWN, EQUIVALENT, UNDECIDED = 1, -1, 2, 0  # decision codes: above 0, below 0, within ±margin


@dataclass(frozen=True)
class PairedManyToOne:
    """Every arm against the control by its paired differences; arrays (..., comparisons)."""

    diff: np.ndarray  # mean over the shared seeds of (arm - control)
    sd: np.ndarray  # s.d. of those paired differences: the comparison's own spread
    n: np.ndarray  # seeds the arm shares with the control
    shared: np.ndarray  # variance of the mean difference that every seed shares (the bank's draw); 0: none known
    t: np.ndarray
    p_adj: np.ndarray  # Bonferroni-adjusted two-sided p, min(1, family * p)
    lo: np.ndarray  # simultaneous (1 - alpha) interval: each at 1 - alpha / family, two-sided
    hi: np.ndarray
    eq_lo: np.ndarray  # the equivalence interval: each at 1 - 2 alpha / family (two one-sided tests)
    eq_hi: np.ndarray
    alpha: float
    family: int  # comparisons the family-wise rate is kept over


def paired_many_to_one(y: Any, alpha: float = 0.05, family: int | None = None,
                       shared: Any = None) -> PairedManyToOne:
    """Each row of a (..., arms, seeds) table against row 0 (the control), by the paired differences at the
    seeds where both have a value (NaN: no trial there). ``family``: comparisons the correction covers
    (default arms - 1; a staged run passes its whole family, also when fewer arms are still tested);
    ``shared``: (..., arms - 1) variance of each mean difference that the seeds share (``shared_variance``),
    added to s_d² / n (None or NaN: 0)."""
    y = np.asarray(y, dtype=float)
    if y.ndim < 2 or y.shape[-2] < 2:
        raise ValueError(f"need a (..., arms, seeds) table with >= 2 arms, got shape {y.shape}")
    if not 0 < alpha < 1:
        raise ValueError(f"need 0 < alpha < 1, got {alpha!r}")
    family = y.shape[-2] - 1 if family is None else int(family)
    if family < y.shape[-2] - 1:
        raise ValueError(f"the family ({family}) must cover every compared arm ({y.shape[-2] - 1})")
    d = y[..., 1:, :] - y[..., :1, :]
    ok = np.isfinite(d)
    n = ok.sum(axis=-1)
    shared = np.zeros(d.shape[:-1]) if shared is None else np.broadcast_to(
        np.nan_to_num(np.asarray(shared, dtype=float), nan=0.0), d.shape[:-1])
    if (shared < 0).any():
        raise ValueError("a shared variance cannot be negative")
    with np.errstate(invalid="ignore", divide="ignore"):
        diff = np.where(ok, d, 0.0).sum(axis=-1) / n
        sd = np.sqrt(np.where(ok, (d - diff[..., None]) ** 2, 0.0).sum(axis=-1) / (n - 1))
        se = np.sqrt(sd ** 2 / n + shared)
        t = np.where(se > 0, diff / np.where(se > 0, se, 1.0), np.where(diff == 0, 0.0, np.inf * np.sign(diff)))
    df = np.where(n >= 2, n - 1, np.nan)
    c_two = sps.t.ppf(1 - alpha / (2 * family), df)
    c_one = sps.t.ppf(1 - alpha / family, df)
    p_adj = np.clip(family * 2 * sps.t.sf(np.abs(t), df), 0.0, 1.0)
    return PairedManyToOne(diff, sd, n, np.array(shared), t, p_adj, diff - c_two * se, diff + c_two * se,
                           diff - c_one * se, diff + c_one * se, float(alpha), family)


def shared_variance(resampled: Any) -> np.ndarray:
    """(...,) the variance of a mean over seeds that every seed shares, from (..., seeds, resamples) per-seed
    values (e.g. arm - control) recomputed on question resamples that every seed shares: the resamples'
    covariance between two different seeds' values, averaged over the pairs, (n² Var(mean) - Σ Var_s) /
    (n (n - 1)), floored at 0. Question noise of one seed alone is already in s_d; what two seeds' values
    share is not. Resamples where any seed's value is undefined are left out; NaN with fewer than 2 seeds or
    2 usable resamples."""
    r = np.asarray(resampled, dtype=float)
    n = r.shape[-2]
    if n < 2:
        return np.full(r.shape[:-2], np.nan)
    r = np.where(np.isfinite(r).all(axis=-2, keepdims=True), r, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a comparison with < 2 usable resamples: NaN
        of_mean = np.nanvar(r.mean(axis=-2), axis=-1, ddof=1)
        per_seed = np.nanvar(r, axis=-1, ddof=1).sum(axis=-1)
    return np.maximum((n * n * of_mean - per_seed) / (n * (n - 1)), 0.0)


def decisions(res: PairedManyToOne, margin: float | None = None) -> np.ndarray:
    """``decide`` on every comparison of a ``paired_many_to_one`` result."""
    return decide(res.lo, res.hi, res.eq_lo, res.eq_hi, margin)


def decide(lo: Any, hi: Any, eq_lo: Any, eq_hi: Any, margin: float | None = None) -> np.ndarray:
    """BETTER_UP (the simultaneous interval above 0), BETTER_DOWN (below 0), EQUIVALENT (it contains 0 and the
    equivalence interval lies strictly within ±margin) or UNDECIDED (NaN intervals decide nothing). One error
    budget covers every claim: where the truth is 0 only a directional claim can be false, where |truth| >=
    margin only a directional claim of the wrong sign or 'equivalent' can, and each of those needs an interval
    to miss the truth on one side (<= alpha / family per comparison, <= alpha over the family)."""
    lo, hi = np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)
    out = np.where(lo > 0, BETTER_UP, np.where(hi < 0, BETTER_DOWN, UNDECIDED))
    if margin is not None and math.isfinite(margin) and margin > 0:
        inside = (np.asarray(eq_lo, dtype=float) > -margin) & (np.asarray(eq_hi, dtype=float) < margin)
        out = np.where((out == UNDECIDED) & inside, EQUIVALENT, out)
    return out


@lru_cache(maxsize=4096)
def _paired_unit_mdd(n: int, family: int, alpha: float, power: float) -> float:
    """The paired test's minimal detectable difference at a paired-difference s.d. of 1."""
    if n < 2:
        return math.nan
    crit = float(sps.t.ppf(1 - alpha / (2 * family), n - 1))
    return noncentrality_for_power(crit, n - 1, power) / math.sqrt(n)


def paired_mdd(sd: float, n: int, family: int, alpha: float = 0.05, power: float = 0.8,
               shared: float = 0.0) -> float:
    """The smallest true difference one comparison of ``paired_many_to_one`` detects with probability
    ``power`` at n seeds, for a paired-difference s.d. ``sd`` and a ``shared`` variance of the mean that more
    seeds do not shrink (NaN when it cannot be computed)."""
    if n < 2 or not (math.isfinite(sd) and sd > 0):
        return math.nan
    return math.sqrt(sd ** 2 + n * _shared(shared)) * _paired_unit_mdd(int(n), int(family), float(alpha),
                                                                       float(power))


def _shared(shared: float) -> float:
    return float(shared) if math.isfinite(shared) and shared > 0 else 0.0


def decision_probability(truth: float, sd: float, n: Any, family: int, alpha: float = 0.05,
                         margin: float | None = None, shared: float = 0.0) -> np.ndarray:
    """P(a comparison is decided) at n seeds (vectorised over n) if the true difference were ``truth`` with
    paired s.d. ``sd`` and ``shared`` variance of the mean: the larger of the directional claim's power and
    the equivalence claim's (two one-sided tests; the usual approximation P(t1 > c) + P(t2 > c) - 1). NaN
    where n < 2 or nothing was measured."""
    n = np.asarray(n, dtype=float)
    if not (math.isfinite(sd) and sd > 0 and math.isfinite(truth)):
        return np.full(n.shape, np.nan)
    df = np.where(n >= 2, n - 1, np.nan)
    scale = 1.0 / np.sqrt(sd ** 2 / n + _shared(shared))
    crit = sps.t.ppf(1 - alpha / (2 * family), df)
    ncp = abs(truth) * scale  # the far tail (the wrong sign) is ~0; scipy's cdf there may say NaN
    directional = sps.nct(df, ncp).sf(crit) + np.nan_to_num(sps.nct(df, -ncp).sf(crit))
    if margin is None or not (math.isfinite(margin) and margin > abs(truth)):
        return directional
    c_one = sps.t.ppf(1 - alpha / family, df)
    low, high = (sps.nct(df, (margin + s * truth) * scale).sf(c_one) for s in (1, -1))
    return np.maximum(directional, low + high - 1.0)


def seeds_to_decide(truth: float, sd: float, family: int, alpha: float = 0.05, margin: float | None = None,
                    power: float = 0.8, max_seeds: int = 200, shared: float = 0.0) -> int | None:
    """The fewest seeds at which the comparison would be decided with probability ``power`` if its difference
    and spreads were as measured (the ``shared`` variance stays whatever the seeds: only a larger bank shrinks
    it); None beyond ``max_seeds`` (or when nothing was measured)."""
    if not (math.isfinite(sd) and sd > 0 and math.isfinite(truth)):
        return None
    n = np.arange(2, max_seeds + 1)
    reached = np.flatnonzero(decision_probability(truth, sd, n, family, alpha, margin, shared) >= power)
    return int(n[reached[0]]) if len(reached) else None


# -- seeds added in stages until decided -----------------------------------------------------------
def seed_looks(first: int, per_stage: int, max_seeds: int) -> list[int]:
    """The seed counts at which a staged run tests: ``first``, then ``per_stage`` more each time, the last look
    at ``max_seeds`` (declared before the run, so the looks and their alpha are fixed in advance)."""
    if first < 2 or per_stage < 1 or max_seeds < first:
        raise ValueError(f"need first >= 2 seeds, per_stage >= 1 and max_seeds >= first, got first={first}, "
                         f"per_stage={per_stage}, max_seeds={max_seeds}")
    looks = list(range(first, max_seeds + 1, per_stage))
    return looks if looks[-1] == max_seeds else [*looks, max_seeds]


def staged_decisions(y: Any, looks: list[int], alpha: float = 0.05,
                     margin: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The staged procedure on (..., arms, max seeds) tables, row 0 the control: at each look, every arm still
    undecided is tested on its first n seeds at alpha / len(looks) (Bonferroni over the looks as over the
    arms, so the family-wise rate over all looks stays <= alpha); a decided arm gets no more seeds. Returns the
    decision codes (..., arms - 1) and the index of the look that decided each (-1: undecided at the end)."""
    y = np.asarray(y, dtype=float)
    rate, family = alpha / len(looks), y.shape[-2] - 1
    decided = np.full(y.shape[:-2] + (family,), UNDECIDED)
    at = np.full(decided.shape, -1)
    for k, n in enumerate(looks):
        now = decisions(paired_many_to_one(y[..., :n], rate, family), margin)
        new = (at < 0) & (now != UNDECIDED)
        decided, at = np.where(new, now, decided), np.where(new, k, at)
    return decided, at


# -- a trend along an ordered parameter ------------------------------------------------------------
# A pre-declared linear contrast over the grid's levels: each seed's least-squares slope of the metric on the
# level's rank (0, 1, 2, ...: one grid step at a time, whatever the spacing), tested like any paired
# comparison by its own spread over the seeds. Under "no arm differs" each seed's slope has mean 0 whatever
# the arms' spreads, so the test keeps its rate as the many-to-one test does.
def level_ranks(levels: Any) -> np.ndarray:
    """Each arm's grid step along an ordered parameter: the rank of its level among the distinct levels."""
    levels = np.asarray(levels, dtype=float)
    if not np.isfinite(levels).all():
        raise ValueError(f"every arm of a trend needs a level, got {levels.tolist()}")
    distinct = np.unique(levels)
    if len(distinct) < 3:
        raise ValueError(f"a trend needs >= 3 distinct levels (two are one comparison), got {distinct.tolist()}")
    return np.searchsorted(distinct, levels).astype(float)


def slope_weights(ranks: Any) -> np.ndarray:
    """The contrast whose value on arm means is their least-squares slope on ``ranks``: (r - mean) / SS."""
    r = np.asarray(ranks, dtype=float)
    centred = r - r.mean()
    return centred / (centred ** 2).sum()


def trend_test(y: Any, levels: Any, alpha: float = 0.05, family: int = 1, shared: Any = None) -> PairedManyToOne:
    """The slope of a (..., arms, seeds) table along the arms' ``levels``, per seed, tested as one comparison
    of a family of ``family`` (Bonferroni, as ``paired_many_to_one``, ``shared`` the slope's shared variance as
    there, from ``slopes`` of the resampled tables): its ``diff`` is the mean slope per grid step. A seed where
    an arm has no value gives no slope."""
    y = np.asarray(y, dtype=float)
    w = slope_weights(level_ranks(levels))
    if y.shape[-2] != len(w):
        raise ValueError(f"the table has {y.shape[-2]} arms but {len(w)} levels")
    per_seed = np.einsum("...as,a->...s", y, w)  # NaN wherever an arm lacks that seed
    shared = None if shared is None else np.asarray(shared, dtype=float)[..., None]
    return paired_many_to_one(np.stack([np.zeros_like(per_seed), per_seed], axis=-2), alpha, family, shared)


def slopes(resampled: Any, levels: Any) -> np.ndarray:
    """(..., seeds, resamples) per-seed slopes along ``levels`` of (..., arms, seeds, resamples) resampled
    tables (``trend_test``'s slope on each resample, for ``shared_variance``)."""
    return np.einsum("...asb,a->...sb", np.asarray(resampled, dtype=float), slope_weights(level_ranks(levels)))
