"""The verdict of an ablation space (docs/evaluation.md, "Ablation verdicts").

A space declares its reference configuration (the ablation's null setting, e.g. fixed_ortho at alpha = 0) and
the ordered parameters it sweeps (``hsae.spaces``: ``reference``, ``trend``); relu is one of its arms. One
family of comparisons answers the ablation's two questions and its trend:

* every arm against the reference, and every arm against relu (``hsae.verdict.arm_test``, the test of the main
  study, with the reference or relu as the baseline);
* along each declared parameter, the slope of the headline per grid step (``hsae.stats.trend_test``);

Bonferroni over all of them, so the family-wise rate of everything worded as a claim in the section stays at
the verdict's 0.05. The second witness and the other metrics are shown beside it, descriptive.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from hsae import stats
from hsae.scoring import Bootstrap, higher_is_better
from hsae.spaces import Reference, same_value
from hsae.verdict import (
    ARM_COLUMN,
    BASELINE,
    MetricTest,
    Verdict,
    arm_names,
    arm_test,
    build_verdict,
    resampled_seed_table,
    seed_table,
)


@dataclass(frozen=True)
class Trend:
    """The headline's slope along one ordered parameter: mean over seeds of each seed's least-squares slope on
    the level's grid step (0, 1, 2, ...), with its simultaneous interval in the section's family."""

    parameter: str
    levels: dict[str, float]  # arm -> the parameter's value
    slope: float
    lo: float
    hi: float
    p_adj: float
    n: int  # seeds with a value at every level
    claim: str


@dataclass
class AblationVerdict:
    space: str
    reference: str  # the reference's arm name
    verdict: Verdict  # every arm against the reference (headline claimed, the rest descriptive)
    versus_relu: MetricTest | None  # every arm against relu, in the same family (None: relu is the reference)
    trends: list[Trend] = field(default_factory=list)
    family: int = 0  # comparisons the Bonferroni correction covers

    @property
    def headline(self) -> str:
        return self.verdict.headline


def reference_arm(trials: pd.DataFrame, names: pd.Series, ref: Reference) -> str:
    """The arm name of the trials that are the declared reference configuration; ValueError when none are, or
    when they are more than one arm."""
    match = trials["variant"].astype(str) == ref.variant
    labels = trials[ARM_COLUMN].fillna("").astype(str) if ARM_COLUMN in trials else pd.Series("", index=trials.index)
    match &= labels == ref.arm
    for name, value in ref.params.items():
        column = trials.get(f"cfg_{name}")
        if column is None:
            raise ValueError(f"reference parameter {name!r}: no trial records it (no column cfg_{name})")
        match &= column.map(lambda v, value=value: same_value(v, value))
    found = sorted(set(names[match]))
    if len(found) > 1 and ref.variant in found and not ref.arm:
        found = [ref.variant]  # the configuration at the variant's defaults keeps the bare name: the exact match
    if len(found) != 1:
        raise ValueError(f"the declared reference {ref.as_dict()} is {len(found)} arm(s) among the compared trials "
                         f"({', '.join(found) or 'none'}): it must be exactly one")
    return found[0]


def arm_levels(trials: pd.DataFrame, names: pd.Series, parameter: str) -> dict[str, float]:
    """Each arm's value of ``parameter`` (arms without one are not on the trend: relu, other variants)."""
    column = trials.get(f"cfg_{parameter}")
    if column is None:
        return {}
    values = pd.to_numeric(column, errors="coerce")
    out = {}
    for arm, v in values.groupby(names.to_numpy(), sort=False):
        distinct = v.dropna().unique()
        if len(distinct) > 1:
            raise ValueError(f"arm {arm!r} has {len(distinct)} values of {parameter}: {sorted(distinct)}")
        if len(distinct) == 1:
            out[str(arm)] = float(distinct[0])
    return out


def trend(per_trial: pd.DataFrame, metric: str, parameter: str, levels: dict[str, float], alpha: float,
          family: int, boot: Bootstrap | None = None) -> Trend:
    """``stats.trend_test`` of ``metric`` along ``levels`` on the arms' seed table (with the slope's variance
    that the seeds share through the bank's questions, from ``boot``'s resamples)."""
    table = seed_table(per_trial, metric).reindex(list(levels))
    complete = [s for s in table.columns if table[s].notna().all()]  # the seeds that give a slope
    resampled = resampled_seed_table(per_trial, boot, metric, list(levels), complete)
    shared = None if resampled is None else np.nan_to_num(
        stats.shared_variance(stats.slopes(resampled, list(levels.values()))), nan=0.0)
    res = stats.trend_test(table.to_numpy(float), list(levels.values()), alpha, family, shared)
    slope, lo, hi, n = (float(x[0]) for x in (res.diff, res.lo, res.hi, res.n))
    return Trend(parameter, dict(levels), slope, lo, hi, float(res.p_adj[0]), int(n),
                 trend_claim(lo, hi, int(n), higher_is_better(metric), parameter))


def trend_claim(lo: float, hi: float, n: int, better_up: bool, parameter: str) -> str:
    if n < 2:
        return f"undecided (needs ≥ 2 seeds with every level of {parameter})"
    if lo > 0 or hi < 0:
        rises = lo > 0
        return f"{'better' if rises == better_up else 'worse'} as {parameter} grows"
    return "no trend shown"


def ablation_verdict(trials: pd.DataFrame, grid: pd.DataFrame, declaration: dict[str, Any],
                     questions: pd.DataFrame | None = None, secondary: list[str] | tuple[str, ...] = (),
                     n_boot: int = 1000) -> AblationVerdict:
    """The section's verdict over a space's completed trials; ``declaration``: the space's
    (``hsae.spaces.Space.declaration``), recorded in the results directory when the sweep ran."""
    done = trials[trials["status"] == "completed"]
    if declaration.get("reference") is None:
        raise ValueError(f"space {declaration.get('name')!r} declares no reference")
    names = arm_names(done)
    reference = reference_arm(done, names, Reference(**declaration["reference"]))
    arms = list(dict.fromkeys(names))
    if len(arms) < 2:
        raise ValueError(f"only {len(arms)} arm ({', '.join(arms)}) has ranked trials: nothing to compare")
    with_relu = BASELINE in arms and reference != BASELINE
    levels = {p: arm_levels(done, names, p) for p in declaration.get("trend", [])}
    levels = {p: lv for p, lv in levels.items() if len(set(lv.values())) >= 3}  # a run of fewer levels: no trend
    # Bonferroni over every comparison the section words as a claim (reference vs relu counted once).
    family = (len(arms) - 1) + (len(arms) - 2 if with_relu else 0) + len(levels)
    v = build_verdict(done, grid, secondary=secondary, questions=questions, n_boot=n_boot, baseline=reference,
                      witness=None, family=family)
    head = v.main
    versus_relu = (arm_test(v.per_trial, v.headline, "headline", BASELINE, head.alpha, margin=head.margin,
                            family=family, boot=v.boot) if with_relu else None)
    trends = [trend(v.per_trial, v.headline, p, lv, head.alpha, family, v.boot) for p, lv in levels.items()]
    return AblationVerdict(str(declaration.get("name", "")), reference, v, versus_relu, trends, family)


def arm_summary(per_trial: pd.DataFrame, metric: str) -> dict[str, tuple[float, float, int]]:
    """Per arm: the mean of ``metric`` over its seeds, the half-width of its 95% seed interval and the seeds."""
    out = {}
    for arm, g in per_trial.groupby("arm", sort=False):
        values = g[metric].astype(float).dropna().tolist() if metric in g else []
        mean, half = stats.mean_ci95(values)
        out[str(arm)] = (mean, half, len(values))
    return out


def level_order(levels: dict[str, float]) -> list[str]:
    """The trend's arms by level (ties in name order)."""
    return [a for a, _ in sorted(levels.items(), key=lambda kv: (kv[1], kv[0]))]

