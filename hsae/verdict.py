"""The verdict: does an arm remove forget knowledge better than a plain ReLU SAE at matched retain?

Pure numpy/pandas/scipy (no torch, no Ray). Every number is recomputed from grid.parquet's per-question
outcomes by ``hsae/scoring.py`` (matched retain chosen on select and scored on test questions, the frontier
area, the question bootstrap); here they are compared across arms (``docs/evaluation.md``, "The verdict"):

* **arms**: one configuration each (variant + its parameters, or the space file's ``arm:`` label);
* **claims**: every arm against the ``relu`` arm by its own paired differences over the seeds (a seed is a
  block), Bonferroni-corrected (``hsae/stats.py``), on the headline metric the profile declared before the
  run (``Profile.headline_metric``): better, worse, equivalent within the declared margin, or undecided with
  the seeds that would decide it; the second witness's primary is a claim only behind the headline's gate,
  every other metric is descriptive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from hsae import stats
from hsae.scoring import CANDIDATES, Bootstrap, higher_is_better, nanmean, scored

POSITIVE_MIN, NEGATIVE_MAX = 0.2, 0.05  # the controls' range (docs/evaluation.md, "Controls")
BASELINE = "relu"
ALPHA = 0.05  # family-wise error rate of the claims on one metric
DEFAULT_HEADLINE = "frontier_area"  # Profile.headline_metric's default; why: docs/evaluation.md, "Headline"
# Profile.equivalence_margin's default: a frontier-area difference smaller than this is no difference a
# researcher would act on (docs/evaluation.md, "Equivalence margin").
DEFAULT_MARGIN = 0.05
WITNESS = "sparse_probe_mean_k1"  # the second witness's primary metric (docs/evaluation.md, "Second witness")
# Chosen and scored on the same (all) questions, as SAEBench defines it: shown, never claimed on
# (docs/evaluation.md, "Select and test"); the other candidates choose on select and score on test questions.
DESCRIPTIVE_ONLY: tuple[str, ...] = ("unlearning_score",)


# -- arms: one configuration each -----------------------------------------------------------------
ARM_COLUMN = "arm"  # the space file's optional per-block label (docs/sweeps.md, "Arms")


def _value_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(list(value)) if isinstance(value, (list, tuple, np.ndarray)) else str(value)


def default_params(variant: str) -> dict[str, str]:
    """A variant's default parameters as text (imported lazily: the registry pulls in torch)."""
    import dataclasses

    from hsae.variants import VARIANTS

    if variant not in VARIANTS:
        return {}
    params = VARIANTS[variant].Params()
    return {f.name: _value_text(getattr(params, f.name)) for f in dataclasses.fields(params)}


def arm_names(trials: pd.DataFrame) -> pd.Series:
    """Each trial's arm: its ``arm`` label when the space file gave one, else its variant, followed by
    ``[name=value, ...]`` for the ``cfg_*`` values that differ between that variant's configurations here
    (the configuration with the variant's default values keeps the bare name: ``relu`` is relu at its
    defaults, ``relu[l1_coeff=0.14]`` another relu arm). Only the variant's own parameters name arms: the
    training and machine columns (``cfg_device``, ``cfg_autocast``, ...) are the run's, not the arm's."""
    names = pd.Series(trials["variant"].astype(str).to_numpy(), index=trials.index, dtype=object)
    labelled = trials[ARM_COLUMN].notna() & (trials[ARM_COLUMN].astype(str) != "") if ARM_COLUMN in trials \
        else pd.Series(False, index=trials.index)
    cfg = [c for c in trials if c.startswith("cfg_") and c != "cfg_variant"]
    for variant, rows in trials[~labelled].groupby("variant", sort=False):
        defaults = default_params(str(variant))
        own = [c for c in cfg if c.removeprefix("cfg_") in defaults]
        text = rows[own].map(_cell_text)
        varying = [c for c in own if text[c].nunique() > 1]
        if not varying:
            continue
        for idx, row in text[varying].iterrows():
            pairs = {c.removeprefix("cfg_"): row[c] for c in varying}
            if any(defaults.get(k) != v for k, v in pairs.items()):
                names[idx] = f"{variant}[{', '.join(f'{k}={v}' for k, v in pairs.items())}]"
    if labelled.any():
        names[labelled] = trials.loc[labelled, ARM_COLUMN].astype(str)
    return names


def _cell_text(value: Any) -> str:
    """A cfg_* cell as text ('' when missing: a parameter the variant does not have)."""
    missing = value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))
    return "" if missing else _value_text(value)


# -- the seed-level test: each arm against relu by its own paired differences ----------------------
@dataclass(frozen=True)
class ArmResult:
    """One arm minus the baseline arm on one metric, from the paired test (``stats.paired_many_to_one``)."""

    arm: str
    metric: str
    n: int  # seeds the arm shares with the baseline (the pairs behind the difference)
    diff: float  # mean over those seeds of (arm - baseline)
    lo: float  # simultaneous 95% interval of the difference (Bonferroni over the family)
    hi: float
    p_adj: float  # Bonferroni-adjusted p value
    claim: str  # "better than relu" / "worse than relu" / "equivalent to relu (±δ)" / "undecided" / descriptive
    seeds: tuple = ()
    sd: float = math.nan  # s.d. of the paired differences: this comparison's own spread
    eq_lo: float = math.nan  # the equivalence interval (two one-sided tests at the same family-wise rate)
    eq_hi: float = math.nan
    mdd: float = math.nan  # minimal detectable difference at these seeds and this spread (power 0.8)
    mdd_by_seeds: dict[int, float] = field(default_factory=dict)  # the same at other seed counts
    seeds_needed: int | None = None  # seeds that would decide it, were its difference and spread as measured
    shared_var: float = 0.0  # variance of the difference every seed shares (the bank's questions; 0: not known)

    @property
    def decided(self) -> bool:
        return self.claim.startswith(DECIDED_WORDS)


DECIDED_WORDS = ("better", "worse", "equivalent")
UNDECIDED = "undecided"
DESCRIPTIVE = "descriptive (not a claim)"


@dataclass(frozen=True)
class MetricTest:
    """The many-to-one test of every arm against the baseline on one metric."""

    metric: str
    role: str  # "headline" (declared before the run), "witness" (the second witness's primary) or "secondary"
    higher_is_better: bool
    baseline: str
    arms: tuple[ArmResult, ...]
    seeds: tuple = ()  # the baseline's seeds with a value
    alpha: float = ALPHA  # the family-wise rate of this look (ALPHA / looks in a staged run)
    family: int = 0  # comparisons the correction covers
    margin: float = math.nan  # equivalence margin (the headline's; NaN: no equivalence claims)
    claimed: bool = True  # False: shown with intervals, never worded as a claim
    untested: dict[str, str] = field(default_factory=dict)  # arm -> why it is not in the test
    note: str = ""  # why there is no test at all

    def by_arm(self) -> dict[str, ArmResult]:
        return {a.arm: a for a in self.arms}

    def undecided(self) -> list[str]:
        return [a.arm for a in self.arms if a.claim.startswith(UNDECIDED)]

    def decided_all_directions(self) -> bool:
        """Every tested arm is better or worse (the gate the second witness's claims pass through)."""
        return bool(self.arms) and not self.untested and all(a.claim.startswith(("better", "worse"))
                                                             for a in self.arms)


def claim(lo: float, hi: float, higher_is_better: bool, n_seeds: int, baseline: str = BASELINE,
          min_seeds: int = 2, eq_lo: float = math.nan, eq_hi: float = math.nan,
          margin: float | None = None) -> str:
    """'better than relu' / 'worse than relu' when the simultaneous interval excludes 0; otherwise 'equivalent
    to relu (±margin)' when the equivalence interval lies within ±margin; otherwise 'undecided'. Below
    ``min_seeds`` seeds nothing is decided (one seed says nothing of seed-to-seed variation)."""
    if n_seeds < min_seeds:
        return f"{UNDECIDED} (needs ≥ {min_seeds} seeds)"
    code = int(stats.decide(lo, hi, eq_lo, eq_hi, margin))  # the rule the calibration simulations test
    if code in (stats.BETTER_UP, stats.BETTER_DOWN):
        return f"better than {baseline}" if (code == stats.BETTER_UP) == higher_is_better else f"worse than {baseline}"
    return f"equivalent to {baseline} (±{margin:g})" if code == stats.EQUIVALENT else UNDECIDED


POWER_SEEDS = (3, 5, 10)


def seed_table(per_trial: pd.DataFrame, metric: str) -> pd.DataFrame:
    """arm x seed means of ``metric`` (trials sharing an arm and seed are averaged; NaN: no value)."""
    values = per_trial.assign(_v=per_trial[metric].astype(float))
    return values.groupby(["arm", "seed"])["_v"].mean().unstack("seed")


def resampled_seed_table(per_trial: pd.DataFrame, boot: Bootstrap | None, metric: str, arms: list | tuple,
                         seeds: list | tuple) -> np.ndarray | None:
    """(arms, seeds, n_boot): each arm's value at each seed on every question resample (``boot.samples``;
    trials sharing an arm and seed averaged, as ``seed_table`` averages their point values; NaN: no trial).
    None when the metric has no resamples (e.g. a column read from the trial rows)."""
    if boot is None or metric not in boot.samples:
        return None
    samples = boot.samples[metric]
    trial_ids = per_trial.groupby(["arm", "seed"])["trial_id"].agg(list).to_dict()
    out = np.full((len(arms), len(seeds), samples.shape[1]), np.nan)
    for i, arm in enumerate(arms):
        for j, s in enumerate(seeds):
            rows = boot.rows(trial_ids.get((arm, s), []))
            if rows:
                out[i, j] = nanmean(samples[rows], axis=0)
    return out


def shared_question_variance(resampled: np.ndarray | None, row: int, columns: list[int]) -> float:
    """The variance of (row - row 0)'s mean over the seeds ``columns`` of a ``resampled_seed_table`` that the
    bank's questions give every seed alike (``stats.shared_variance`` on the resampled differences); 0 when the
    metric has no resamples (``resampled`` None)."""
    if resampled is None:
        return 0.0
    differences = resampled[row, columns] - resampled[0, columns]
    return float(np.nan_to_num(stats.shared_variance(differences), nan=0.0))


def arm_test(per_trial: pd.DataFrame, metric: str, role: str = "headline", baseline: str = BASELINE,
             alpha: float = ALPHA, directions: dict[str, bool] | None = None, margin: float | None = None,
             family: int | None = None, claimed: bool = True, boot: Bootstrap | None = None) -> MetricTest:
    """Every arm against ``baseline`` on ``metric``, each by its paired differences at the baseline's seeds it
    has (``stats.paired_many_to_one``): an arm with fewer than 2 such seeds is left out (said why).
    ``margin``: the equivalence margin (headline only); ``family``: the comparisons the correction covers
    (default: the arms here); ``claimed`` False: the decisions are computed but shown as descriptive;
    ``boot``: the question resamples, whose variance shared by the seeds joins each comparison's."""
    better = higher_is_better(metric, directions)
    if metric not in per_trial:
        return MetricTest(metric, role, better, baseline, (), alpha=alpha, note=f"no column {metric!r}")
    table = seed_table(per_trial, metric)
    if baseline not in table.index:
        return MetricTest(metric, role, better, baseline, (), alpha=alpha, note=f"no {baseline} arm with a value")
    seeds = tuple(s for s in table.columns if np.isfinite(table.loc[baseline, s]))
    others = [a for a in table.index if a != baseline]
    shared = {a: tuple(s for s in seeds if np.isfinite(table.loc[a, s])) for a in others}
    untested = {a: f"{len(shared[a])} seed(s) shared with {baseline}" for a in others if len(shared[a]) < 2}
    tested = [a for a in others if a not in untested]
    family = max(len(tested), 1) if family is None else family
    if not tested:
        why = f"{len(seeds)} {baseline} seed(s)" if len(seeds) < 2 else "no arm shares 2 seeds with the baseline"
        return MetricTest(metric, role, better, baseline, (), seeds, alpha, family, _margin(margin), claimed,
                          untested, why)
    resampled = resampled_seed_table(per_trial, boot, metric, [baseline, *tested], seeds)  # once for every arm
    bank_var = [shared_question_variance(resampled, i + 1, [seeds.index(s) for s in shared[a]])
                for i, a in enumerate(tested)]
    res = stats.paired_many_to_one(table.loc[[baseline, *tested], list(seeds)].to_numpy(float), alpha, family,
                                   bank_var)
    arms = tuple(_arm_result(a, metric, res, i, shared[a], better, baseline, margin, claimed)
                 for i, a in enumerate(tested))
    return MetricTest(metric, role, better, baseline, arms, seeds, alpha, family, _margin(margin), claimed, untested)


def _margin(margin: float | None) -> float:
    return float(margin) if margin is not None and math.isfinite(margin) else math.nan


def _arm_result(arm: str, metric: str, res: stats.PairedManyToOne, i: int, seeds: tuple, better: bool,
                baseline: str, margin: float | None, claimed: bool) -> ArmResult:
    """One comparison's row: the difference, its intervals, the claim, and what more seeds would buy."""
    n, sd, diff, shared = int(res.n[i]), float(res.sd[i]), _round(res.diff[i]), float(res.shared[i])
    lo, hi, eq_lo, eq_hi = (_round(x[i]) for x in (res.lo, res.hi, res.eq_lo, res.eq_hi))
    said = claim(lo, hi, better, n, baseline, eq_lo=eq_lo, eq_hi=eq_hi, margin=margin)
    mdd = {k: stats.paired_mdd(sd, k, res.family, res.alpha, shared=shared) for k in sorted({*POWER_SEEDS, n})}
    needed = None if said.startswith(DECIDED_WORDS) else stats.seeds_to_decide(diff, sd, res.family, res.alpha,
                                                                                 margin, shared=shared)
    return ArmResult(arm, metric, n, diff, lo, hi, float(res.p_adj[i]), said if claimed else DESCRIPTIVE, seeds,
                     sd, eq_lo, eq_hi, mdd[n], mdd, needed, shared)


def _round(x: float) -> float:
    """Rounded far below any 1/n: equal accuracies summed in another order give a difference of exactly 0."""
    return round(float(x), 12)


def arm_tests(per_trial: pd.DataFrame, headline: str, secondary: list[str] | tuple[str, ...] = (),
              baseline: str = BASELINE, alpha: float = ALPHA, directions: dict[str, bool] | None = None,
              margin: float | None = None, witness: str | None = None, looks: int = 1,
              family: int | None = None, boot: Bootstrap | None = None) -> list[MetricTest]:
    """The headline and each secondary metric through the same test, in that order (docs/evaluation.md,
    "Which numbers are claims"). Only the headline is worded as a claim, at the family-wise rate ``alpha``
    (split evenly over a staged run's ``looks``), with equivalence within ``margin``; the second ``witness``'s
    metric is worded as a claim only when the headline decided every arm better or worse (serial gatekeeping:
    a false witness claim then needs a false headline claim first); every other metric is descriptive.
    ``family``: the comparisons one metric's correction covers (default: the arms here; an ablation section
    passes its comparisons with the reference, with relu and its trends); ``boot``: as ``arm_test``'s."""
    rate = alpha / looks
    head = arm_test(per_trial, headline, "headline", baseline, rate, directions, margin, family, boot=boot)
    out = [head]
    for m in dict.fromkeys(secondary):
        if m == headline:
            continue
        gate = m == witness and head.decided_all_directions()
        out.append(arm_test(per_trial, m, "witness" if m == witness else "secondary", baseline, rate, directions,
                            family=family, claimed=gate, boot=boot))
    return out


# -- exploratory: how each candidate spreads ----------------------------------------------------
def stability(per_trial: pd.DataFrame, candidates: tuple[str, ...] = CANDIDATES) -> pd.DataFrame:
    """Per candidate: defined for every trial?, pooled within-arm (seed-to-seed) s.d., s.d. of the arm
    means, and their ratio between / within. Exploratory: it chooses nothing (the headline is declared)."""
    key = "arm" if "arm" in per_trial else "variant"
    rows = []
    for m in candidates:
        v = per_trial[m].astype(float) if m in per_trial else pd.Series(np.nan, index=per_trial.index)
        groups = per_trial.assign(_v=v).groupby(key)["_v"]
        dof = (groups.count() - 1).clip(lower=0)
        within = math.sqrt(float((groups.var(ddof=1).fillna(0.0) * dof).sum() / dof.sum())) if dof.sum() else math.nan
        means = groups.mean().dropna()
        between = float(means.std(ddof=1)) if len(means) >= 2 else math.nan
        if not (math.isfinite(within) and math.isfinite(between)) or within == between == 0:
            ratio = math.nan
        else:
            ratio = between / within if within > 0 else math.inf
        rows.append({"metric": m, "defined": bool(len(v)) and bool(v.notna().all()), "within_sd": within,
                     "between_sd": between, "ratio": ratio})
    return pd.DataFrame(rows).set_index("metric")


# -- bookkeeping --------------------------------------------------------------------------------
def setting_counts(grid: pd.DataFrame, control: str = "sae") -> pd.DataFrame:
    """Per trial and grid ("saebench" / "extended"): settings, settings selecting no feature
    (``features_selected == 0``: they cannot change anything), and settings tying another (same
    (forget_acc, retain_acc) as another setting of that trial and grid, counted beyond the first)."""
    g = grid[grid["control"] == control] if "control" in grid else grid
    g = g.assign(grid=g["grid"].fillna("saebench")) if "grid" in g else g.assign(grid="saebench")
    rows = []
    for (tid, name), s in g.groupby(["trial_id", "grid"], sort=False):
        none = int(s["features_selected"].eq(0).fillna(False).sum()) if "features_selected" in s else math.nan
        pairs = list(zip(s["forget_acc"].round(12), s["retain_acc"].round(12), strict=True))
        rows.append({"trial_id": tid, "grid": name, "settings": len(s), "selecting_none": none,
                     "tied": len(pairs) - len(set(pairs))})
    return pd.DataFrame(rows, columns=["trial_id", "grid", "settings", "selecting_none", "tied"])


def controls_in_range(positive: float | None, negative: float | None) -> bool:
    """The one range check of the evaluation controls: positive >= 0.2 and negative <= 0.05 (a missing
    score is not out of range)."""
    return (positive is None or positive >= POSITIVE_MIN) and (negative is None or negative <= NEGATIVE_MAX)


def controls_problems(done: pd.DataFrame, controls: dict) -> list[str]:
    """Why the evaluation cannot be trusted: completed trials flagged ``controls_ok == False``, or the
    controls file's positive control below 0.2 / negative control above 0.05. Empty: nothing wrong."""
    problems = []
    if "controls_ok" in done:
        bad = int(done["controls_ok"].astype("boolean").eq(False).fillna(False).sum())
        if bad:
            problems.append(f"{bad} completed trial(s) ran with evaluation controls out of range (controls_ok false)")
    pos = (controls.get("positive") or {}).get("score")
    neg = (controls.get("negative") or {}).get("score")
    if not controls_in_range(pos, None):
        problems.append(f"positive control {pos:.3f} < {POSITIVE_MIN} (the removal it must detect is not detected)")
    if not controls_in_range(None, neg):
        problems.append(f"negative control {neg:.3f} > {NEGATIVE_MAX} (random directions 'remove' knowledge)")
    return problems


def crosscheck(trials: pd.DataFrame, per_trial: pd.DataFrame, tol: float = 1e-6) -> list[str]:
    """Trial-row metrics (``forget_acc_at_retain*``, ``unlearning_score``) that disagree with the values
    recomputed from grid.parquet: a pipeline inconsistency, reported rather than hidden."""
    merged = per_trial.merge(trials, on="trial_id", suffixes=("", "_row"))
    out = []
    for m in CANDIDATES:
        if f"{m}_row" not in merged or merged[f"{m}_row"].isna().all():  # rows from before the column: not recorded
            continue
        a, b = merged[m].astype(float), merged[f"{m}_row"].astype(float)
        differ = ((a - b).abs() > tol) | (a.isna() != b.isna())
        if differ.any():
            out.append(f"{m}: {int(differ.sum())} trial(s) differ from grid.parquet (max |Δ| "
                       f"{float((a - b).abs().max()):.3g})")
    return out


# -- everything the report needs ----------------------------------------------------------------
@dataclass
class Verdict:
    per_trial: pd.DataFrame  # trial_id, variant, arm, seed + CANDIDATES (recomputed) + secondary columns
    boot: Bootstrap
    stability: pd.DataFrame  # exploratory diagnostic, chooses nothing
    headline: str  # declared before the run (Profile.headline_metric)
    tests: list[MetricTest]  # the headline's first, then the secondary metrics'
    n_seeds: int  # distinct seeds among the trials compared
    counts: pd.DataFrame  # setting_counts of these trials
    baseline: str = BASELINE
    excluded: dict[str, str] = field(default_factory=dict)  # trial_id -> why it is not in the verdict
    mismatches: list[str] = field(default_factory=list)  # crosscheck against the trial rows
    bank: str | None = None  # the question bank's key (grid.parquet ``bank``) when the grid names it

    @property
    def main(self) -> MetricTest:
        """The headline metric's test: the one that makes the claims."""
        return self.tests[0]

    def undecided(self) -> list[str]:
        return self.main.undecided()

    def arms(self) -> list[str]:
        return list(dict.fromkeys(self.per_trial["arm"]))


def declared(trials: pd.DataFrame, column: str, default: Any) -> Any:
    """The one value the rows record in ``column`` (declared before the run), else ``default``; ValueError when
    the rows declare several (compare trials of one declaration at a time)."""
    if column not in trials:
        return default
    named = sorted(set(trials[column].dropna().tolist()), key=str)
    if len(named) > 1:
        raise ValueError(f"the trials declare {len(named)} values of {column} ({', '.join(map(str, named))}): "
                         f"compare trials of one declaration at a time")
    return named[0] if named else default


def declared_headline(trials: pd.DataFrame, default: str = DEFAULT_HEADLINE) -> str:
    """The headline the rows record (``headline_metric``, one value), else ``default``."""
    return str(declared(trials, "headline_metric", default))


def build_verdict(trials: pd.DataFrame, grid: pd.DataFrame, headline: str | None = None,
                  secondary: list[str] | tuple[str, ...] | None = None, questions: pd.DataFrame | None = None,
                  n_boot: int = 1000, seed: int = 0, baseline: str = BASELINE, alpha: float = ALPHA,
                  directions: dict[str, bool] | None = None, witness: str | None = WITNESS,
                  family: int | None = None) -> Verdict:
    """The verdict over the completed trials of ``trials`` from grid.parquet's rows.

    ``headline``: the declared metric (None: ``declared_headline(trials)``); ``secondary``: other metrics
    tested the same way (None: the other candidates); a metric not recomputed from the grid is read from
    the trial rows (e.g. sparse-probing columns). With ``questions`` carrying roles, matched retain is
    chosen on select questions and scored on test questions. The equivalence margin and the number of
    looks of a staged run are the ones the rows declare (``equivalence_margin``, ``seed_looks``); ``baseline``
    and ``family`` as in ``arm_tests``."""
    done = trials[trials["status"] == "completed"]
    if "stream_join" in done and (done["stream_join"] == "oldest").any():
        raise ValueError("trials joined the activation stream at the oldest buffered batch (stream_join = "
                         "'oldest'): timing chose their data, so a seed is not one data order for every arm and the "
                         "block design does not apply; re-run with stream.join = 'first' (docs/sweeps.md)")
    headline = headline or declared_headline(done)
    if headline in DESCRIPTIVE_ONLY:
        raise ValueError(f"headline metric {headline!r} chooses its setting on the questions that score it, so no "
                         f"claim rests on it; choose one of {[m for m in CANDIDATES if m not in DESCRIPTIVE_ONLY]}")
    secondary = [m for m in CANDIDATES if m != headline] if secondary is None else list(secondary)
    secondary = [m for m in secondary if m not in DESCRIPTIVE_ONLY]
    for m in [headline, *secondary]:
        higher_is_better(m, directions)  # a metric with no known direction fails here, naming it
    boot, excluded, bank = scored(done, grid, questions, n_boot, seed)
    extra = [m for m in dict.fromkeys([headline, *secondary]) if m not in CANDIDATES]
    missing = [m for m in extra if m not in done]
    if missing:
        raise ValueError(f"metric(s) {missing} are neither recomputed from the grid ({list(CANDIDATES)}) nor "
                         f"columns of the trial rows")
    ids = done[["trial_id", "variant", "seed", *extra]].assign(arm=arm_names(done).to_numpy())
    per_trial = ids.merge(boot.point, left_on="trial_id", right_index=True).reset_index(drop=True)
    margin = float(declared(done, "equivalence_margin", DEFAULT_MARGIN))
    looks = int(declared(done, "seed_looks", 1))
    tests = arm_tests(per_trial, headline, secondary, baseline, alpha, directions, margin, witness, looks, family,
                      boot)
    counts = setting_counts(grid[grid["trial_id"].isin(per_trial["trial_id"])])
    return Verdict(per_trial, boot, stability(per_trial), headline, tests, int(per_trial["seed"].nunique()),
                   counts, baseline, excluded, crosscheck(done, per_trial), bank)
