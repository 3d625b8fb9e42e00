"""The verdict (hsae/verdict.py, on the numbers of hsae/scoring.py) and the report that leads with it, on planted
data with known answers."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from hsae import scoring as SC
from hsae import stats as S
from hsae import verdict as V
from hsae.results import trial_frame

N_FORGET, N_RETAIN = 100, 400
SEEDS = (42, 43, 44)


def bits(n_correct: int, n: int, rng: np.random.Generator) -> str:
    """A '0'/'1' outcome string with exactly ``n_correct`` ones at random positions."""
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, size=n_correct, replace=False)] = True
    return "".join("1" if m else "0" for m in mask)


def grid_rows(trial_id: str, points: list[tuple], rng: np.random.Generator, control: str = "sae",
              grid: str = "saebench", n_forget: int = N_FORGET, n_retain: int = N_RETAIN) -> list[dict]:
    """Grid rows from (forget_acc, retain_acc[, features_selected]) points, outcomes planted to match."""
    rows = []
    for i, point in enumerate(points):
        forget, retain = point[0], point[1]
        selected = point[2] if len(point) > 2 else 10
        positive = control == "positive"
        rows.append({
            "trial_id": trial_id, "control": control, "grid": grid,
            "retain_threshold": None if positive else 0.001, "n_features": None if positive else 10,
            "multiplier": float(25 * (i + 1)), "percentile": 99.0 if positive else None,
            "features_selected": None if positive else selected, "forget_acc": forget, "retain_acc": retain,
            "forget_correct": bits(round(forget * n_forget), n_forget, rng),
            "retain_correct": bits(round(retain * n_retain), n_retain, rng),
        })
    return rows


def grid_frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows).astype({"n_features": "Int64", "features_selected": "Int64",
                                      "retain_threshold": "float64", "percentile": "float64"})


# -- (a) matched retain and frontier area by hand -----------------------------------------------
# (forget_acc, retain_acc, features_selected) with 10 forget and 200 retain questions.
HAND = [(0.9, 1.0, 10), (0.7, 0.99, 10), (0.5, 0.985, 20), (0.3, 0.96, 20), (1.0, 1.0, 0)]


def test_matched_retain_equals_hand_computation():
    f, r = np.array([p[0] for p in HAND]), np.array([p[1] for p in HAND])
    assert SC.forget_at_retain(f, r, 0.99) == pytest.approx(0.7)
    assert SC.forget_at_retain(f, r, 0.98) == pytest.approx(0.5)
    assert SC.forget_at_retain(f, r, 0.95) == pytest.approx(0.3)
    assert math.isnan(SC.forget_at_retain(np.array([0.2, 0.1]), np.array([0.97, 0.9]), 0.98))  # no setting meets it
    assert math.isnan(SC.forget_at_retain(np.array([]), np.array([]), 0.99))
    # Vectorised over resamples: column b is its own grid.
    two = SC.forget_at_retain(np.c_[f, f[::-1]], np.c_[r, [0.5] * 5], 0.98)
    assert two[0] == pytest.approx(0.5) and math.isnan(two[1])


def test_frontier_and_its_area_equal_hand_computation():
    points = [(p[1], p[0]) for p in HAND] + [(0.97, 0.6)]  # (0.97, 0.6) is dominated by (0.985, 0.5)
    assert SC.frontier(points).tolist() == [[1.0, 0.9], [0.99, 0.7], [0.985, 0.5], [0.96, 0.3]]
    # Levels 0.900..1.000 (21): 13 levels <= 0.96 reach 0.3, 5 reach 0.5, 0.99 reaches 0.7, 2 reach 0.9.
    assert SC.frontier_area(points) == pytest.approx((13 * 0.7 + 5 * 0.5 + 0.3 + 2 * 0.1) / 21)
    assert SC.frontier_area([(0.5, 0.0)]) == 0.0  # nothing reaches retain 0.9: no removal anywhere
    assert SC.frontier_area([(1.0, 0.2)], lo=0.95) == pytest.approx(0.8)


def test_grid_rows_give_the_hand_values_and_counts():
    rng = np.random.default_rng(0)
    rows = grid_rows("t", HAND, rng, n_forget=10, n_retain=200)
    rows += grid_rows("t", [(0.3, 0.96, 20), (1.0, 1.0, 0), (1.0, 1.0, 0)], rng, grid="extended",
                      n_forget=10, n_retain=200)
    grid = grid_frame(rows)
    outcomes, excluded = SC.outcomes_by_trial(grid, ["t", "missing"])
    assert excluded == {"missing": "no grid rows"}
    boot = SC.bootstrap(outcomes, n_boot=50, seed=1)
    point = boot.point.loc["t"]
    assert point["forget_acc_at_retain99"] == pytest.approx(0.7)
    assert point["forget_acc_at_retain95"] == pytest.approx(0.3)
    assert point["unlearning_score"] == pytest.approx(0.3)  # SAEBench settings only: 1 - 0.7
    assert SC.grid_metrics(grid[grid.grid == "saebench"])["frontier_area"] == pytest.approx(12.1 / 21)
    counts = V.setting_counts(grid).set_index("grid")
    assert counts.loc["saebench", ["settings", "selecting_none", "tied"]].tolist() == [5, 1, 0]
    assert counts.loc["extended", ["settings", "selecting_none", "tied"]].tolist() == [3, 2, 1]


def test_decode_rejects_missing_or_malformed_outcomes():
    assert SC.decode(["101", "000"]).tolist() == [[True, False, True], [False, False, False]]
    for bad in (["10", None], ["10", "1"], ["1x"]):
        with pytest.raises(ValueError):
            SC.decode(bad)


# -- (b) the question bootstrap -----------------------------------------------------------------
def _one_setting(p: float, n: int, rng: np.random.Generator, exact: bool = False) -> SC.Outcomes:
    """One setting at full retain; forget questions correct with probability p (exactly p*n with ``exact``)."""
    forget = SC.decode([bits(round(p * n), n, rng)]) if exact else rng.random((1, n)) < p
    return SC.Outcomes(forget, np.ones((1, 50), dtype=bool), np.array([True]))


def test_bootstrap_intervals_contain_the_true_accuracy_and_shrink_with_more_questions():
    rng = np.random.default_rng(0)
    widths = {}
    for n in (100, 1600):
        boot = SC.bootstrap({"t": _one_setting(0.6, n, rng, exact=True)}, n_boot=1000, seed=0)
        lo, hi = SC.interval(boot.samples["forget_acc_at_retain99"][0])
        assert lo < 0.6 < hi
        widths[n] = hi - lo
    assert widths[1600] < 0.4 * widths[100]  # ~1/4: the width scales as 1/sqrt(n)


@pytest.mark.slow  # 1,000 bootstraps: 10 s on this machine idle, 30 s under a sweep
def test_bootstrap_intervals_cover_the_true_accuracy_95_percent_of_the_time():
    # Banks drawn at random: the percentile interval covers the true 0.6 about 95% of the time. Over `reps`
    # independent banks the share covered is binomial, s.d. sqrt(0.95 x 0.05 / 1000) = 0.0069: a 95% interval lands
    # within 3 s.d. (+-0.021) of 95%, a 90% or a 99% one does not.
    rng = np.random.default_rng(0)
    reps, covered = 1000, 0
    for rep in range(reps):
        boot = SC.bootstrap({"t": _one_setting(0.6, 100, rng)}, n_boot=200, seed=rep)
        lo, hi = SC.interval(boot.samples["forget_acc_at_retain99"][0])
        covered += lo <= 0.6 <= hi
    assert abs(covered / reps - 0.95) <= 3 * math.sqrt(0.95 * 0.05 / reps), covered / reps


def test_bootstrap_refuses_trials_on_different_question_banks():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="question bank"):
        SC.bootstrap({"a": _one_setting(0.5, 10, rng), "b": _one_setting(0.5, 20, rng)}, n_boot=10)


def test_trials_on_two_question_banks_are_not_paired(study):
    trials, grid = study
    grid = grid.assign(bank=np.where(grid.trial_id.str.startswith("relu"), "bank-a", "bank-b"))
    with pytest.raises(ValueError, match="2 question banks"):
        V.build_verdict(trials, grid, n_boot=10)
    assert SC.one_bank(grid, ["relu-42", "relu-43"]) == "bank-a" and SC.one_bank(grid.drop(columns="bank"), []) is None


# -- (c) paired claims ----------------------------------------------------------------------------
RETAINS = (1.0, 0.995, 0.99, 0.98, 0.96, 0.9, 0.7)
CURVES = {  # forget accuracy at each retain level above
    "relu": (1.0, 0.9, 0.85, 0.8, 0.7, 0.5, 0.2),
    "fixed_ortho": (1.0, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05),  # removes far more at equal retain: better
    "adaptive_ortho": (1.0, 0.9, 0.85, 0.8, 0.7, 0.5, 0.2),  # relu up to per-seed noise: undecided
}
NOISE = {42: 0.02, 43: -0.02, 44: 0.0}


def planted_study(rng: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Trials (identity columns) and grid rows: three variants x three seeds, random and positive controls."""
    trials, rows = [], []
    for variant, curve in CURVES.items():
        for seed in SEEDS:
            tid = f"{variant}-{seed}"
            noise = NOISE[seed] if variant != "relu" else -NOISE[seed] / 2
            shifted = [(min(1.0, f + noise), r) for f, r in zip(curve[1:], RETAINS[1:], strict=True)]
            points = [(curve[0], RETAINS[0], 0), *shifted]  # the first setting selects nothing
            rows += grid_rows(tid, points, rng)
            rows += grid_rows(tid, [(1.0, 1.0), (0.97, 0.9925), (0.9, 0.95)], rng, control="random")
            trials.append({"trial_id": tid, "variant": variant, "seed": seed, "status": "completed"})
    rows += grid_rows("positive-control", [(0.9, 1.0), (0.6, 0.995), (0.3, 0.95)], rng, control="positive")
    trials.append({"trial_id": "relu-45", "variant": "relu", "seed": 45, "status": "failed"})
    return pd.DataFrame(trials), grid_frame(rows)


@pytest.fixture(scope="module")
def study() -> tuple[pd.DataFrame, pd.DataFrame]:
    return planted_study(np.random.default_rng(7))


@pytest.fixture(scope="module")
def verdict(study) -> V.Verdict:
    trials, grid = study
    return V.build_verdict(trials, grid, n_boot=400, seed=0)


def test_a_variant_that_removes_far_more_is_better_and_a_relu_twin_is_undecided(study):
    trials, grid = study
    v = V.build_verdict(trials, grid, headline="forget_acc_at_retain95", n_boot=100)
    by = v.main.by_arm()
    assert set(by) == {"fixed_ortho", "adaptive_ortho"} and v.main.role == "headline"
    assert by["fixed_ortho"].claim == "better than relu" and by["fixed_ortho"].hi < 0  # forget acc: lower
    assert by["fixed_ortho"].p_adj < 0.05 and by["adaptive_ortho"].p_adj > 0.05
    assert by["adaptive_ortho"].claim == "undecided" and by["adaptive_ortho"].lo < 0 < by["adaptive_ortho"].hi
    assert by["fixed_ortho"].n == 3 and by["fixed_ortho"].seeds == SEEDS  # the failed relu seed 45 is not a block
    assert v.main.family == 2 and v.main.alpha == 0.05
    assert v.undecided() == ["adaptive_ortho"] and by["adaptive_ortho"].seeds_needed is None or \
        by["adaptive_ortho"].seeds_needed > 3
    assert "relu-45" not in set(v.per_trial["trial_id"])
    # The secondary metrics went through the same test in the same call, labelled so and never worded as claims;
    # the SAEBench score (setting chosen on the questions that score it) is shown, never tested.
    claimable = [m for m in SC.CANDIDATES if m not in V.DESCRIPTIVE_ONLY]
    assert [t.role for t in v.tests] == ["headline"] + ["secondary"] * (len(claimable) - 1)
    assert {t.metric for t in v.tests} == set(claimable) and "unlearning_score" not in claimable
    assert all(a.claim == V.DESCRIPTIVE for t in v.tests[1:] for a in t.arms)
    assert not any(t.claimed for t in v.tests[1:])
    with pytest.raises(ValueError, match="chooses its setting on the questions that score it"):
        V.build_verdict(trials, grid, headline="unlearning_score", n_boot=10)


def test_claim_rule_direction_equivalence_and_seed_count():
    assert V.claim(0.1, 0.3, higher_is_better=True, n_seeds=3) == "better than relu"
    assert V.claim(0.1, 0.3, higher_is_better=False, n_seeds=3) == "worse than relu"
    assert V.claim(-0.3, -0.1, higher_is_better=False, n_seeds=3) == "better than relu"
    assert V.claim(-0.1, 0.1, higher_is_better=True, n_seeds=3) == "undecided"
    assert V.claim(0.1, 0.3, higher_is_better=True, n_seeds=1).startswith("undecided")
    assert V.claim(math.nan, math.nan, True, 3) == "undecided"
    # Equivalent only when the equivalence interval lies strictly inside ±margin (and no direction is shown).
    assert V.claim(-0.05, 0.04, True, 5, eq_lo=-0.03, eq_hi=0.03, margin=0.05) == "equivalent to relu (±0.05)"
    assert V.claim(-0.06, 0.06, True, 5, eq_lo=-0.05, eq_hi=0.03, margin=0.05) == "undecided"  # touches -δ
    assert V.claim(-0.05, 0.04, True, 5, eq_lo=-0.03, eq_hi=0.03) == "undecided"  # no margin declared
    assert V.claim(0.01, 0.04, True, 5, eq_lo=0.02, eq_hi=0.03, margin=0.05) == "better than relu"


def test_a_seed_without_a_completed_relu_trial_is_dropped_from_the_pair(study):
    trials, grid = study
    trials = trials.copy()
    trials.loc[trials.trial_id == "relu-44", "status"] = "failed"
    v = V.build_verdict(trials, grid, n_boot=100)
    assert v.main.by_arm()["fixed_ortho"].seeds == (42, 43) and v.main.by_arm()["fixed_ortho"].n == 2


def test_an_arm_missing_a_seed_is_tested_on_the_seeds_it_shares(study):
    """Each comparison is paired on its own seeds: a missing trial of one arm costs that arm a pair, not every
    arm its block (the pooled test dropped the arm); below 2 shared seeds the arm is named as untested."""
    trials, grid = study
    trials = trials.copy()
    trials.loc[trials.trial_id == "adaptive_ortho-44", "status"] = "failed"
    v = V.build_verdict(trials, grid, n_boot=50)
    assert v.main.by_arm()["adaptive_ortho"].seeds == (42, 43) and v.main.by_arm()["fixed_ortho"].n == 3
    trials.loc[trials.trial_id == "adaptive_ortho-43", "status"] = "failed"
    v = V.build_verdict(trials, grid, n_boot=50)
    assert "adaptive_ortho" not in v.main.by_arm() and v.main.untested["adaptive_ortho"].startswith("1 seed(s)")


# -- (d) which metric leads: declared, not chosen from the data ----------------------------------
def test_stability_is_exploratory_and_the_headline_is_the_declared_one(study):
    rng = np.random.default_rng(3)
    rows = []
    for i, variant in enumerate(("relu", "a", "b", "c")):
        for seed in SEEDS:
            rows.append({"trial_id": f"{variant}{seed}", "variant": variant, "seed": seed,
                         "forget_acc_at_retain95": 0.2 * i + rng.normal(0, 0.01),  # stable, separates
                         "forget_acc_at_retain98": 0.02 * i + rng.normal(0, 0.1),  # noisy
                         "forget_acc_at_retain99": np.nan if (variant, seed) == ("c", 42) else 0.3 * i,  # gaps
                         "frontier_area": 0.05 * i + rng.normal(0, 0.05),
                         "unlearning_score": 0.0})  # the cliff: 0 everywhere
    stab = V.stability(pd.DataFrame(rows))
    assert not stab.loc["forget_acc_at_retain99", "defined"]
    assert math.isnan(stab.loc["unlearning_score", "ratio"])
    assert stab.loc["forget_acc_at_retain95", "ratio"] > 10 * stab.loc["forget_acc_at_retain98", "ratio"]
    # The headline is what the rows declare (Profile.headline_metric), whatever the spread says.
    trials, grid = study
    assert V.declared_headline(trials) == V.DEFAULT_HEADLINE == "frontier_area"
    declared = trials.assign(headline_metric="forget_acc_at_retain98")
    assert V.build_verdict(declared, grid, n_boot=20).headline == "forget_acc_at_retain98"
    with pytest.raises(ValueError, match="2 values of headline_metric"):
        V.declared_headline(declared.assign(headline_metric=["unlearning_score"] + ["frontier_area"] * 9))
    with pytest.raises(ValueError, match="no direction known for metric 'l0'"):
        V.build_verdict(trials, grid, headline="l0", n_boot=20)


def test_a_trial_row_metric_runs_through_the_same_test_behind_the_headline_gate(study):
    """The second witness (sparse probing) is a column of the trial rows: one call tests it with the rest, and
    it is worded as a claim only when the headline decided every arm better or worse (serial gatekeeping)."""
    trials, grid = study
    shift = {"relu": 0.0, "fixed_ortho": 0.3, "adaptive_ortho": 0.0}
    noise = {42: 0.01, 43: -0.01, 44: 0.0}
    probe = [0.6 + shift[t.variant] + noise.get(t.seed, 0) for t in trials.itertuples()]
    v = V.build_verdict(trials.assign(sparse_probe_mean_k1=probe), grid, secondary=["sparse_probe_mean_k1"],
                        n_boot=20)
    test = v.tests[1]
    assert (test.metric, test.role, test.higher_is_better) == ("sparse_probe_mean_k1", "witness", True)
    assert not v.main.decided_all_directions() and not test.claimed  # adaptive_ortho is undecided on the headline
    assert test.by_arm()["fixed_ortho"].claim == V.DESCRIPTIVE and test.by_arm()["fixed_ortho"].lo > 0
    # With only the arm the headline decides, the gate opens and the witness speaks.
    v = V.build_verdict(trials.assign(sparse_probe_mean_k1=probe)[lambda t: t.variant != "adaptive_ortho"], grid,
                        headline="forget_acc_at_retain95", secondary=["sparse_probe_mean_k1"], n_boot=20)
    assert v.main.decided_all_directions() and v.tests[1].claimed
    assert v.tests[1].by_arm()["fixed_ortho"].claim == "better than relu"


# -- (f) the test and its power, checked against independent computations -------------------------
def test_one_comparison_is_exactly_scipys_paired_t_test_and_the_family_multiplies_p():
    from scipy import stats as sps

    rng = np.random.default_rng(0)
    y = rng.normal(size=(3, 4)) + np.array([[0.0], [0.8], [0.1]])
    res = S.paired_many_to_one(y, family=2)
    for i in (0, 1):
        ref = sps.ttest_rel(y[i + 1], y[0])
        assert res.p_adj[i] == pytest.approx(min(1.0, 2 * ref.pvalue), rel=1e-9)
        assert res.t[i] == pytest.approx(ref.statistic, rel=1e-9)
        ci = ref.confidence_interval(confidence_level=1 - 0.05 / 2)  # Bonferroni over the family of 2
        assert (res.lo[i], res.hi[i]) == pytest.approx((ci.low, ci.high), rel=1e-9)
        eq = ref.confidence_interval(confidence_level=1 - 2 * 0.05 / 2)  # two one-sided tests at α / family
        assert (res.eq_lo[i], res.eq_hi[i]) == pytest.approx((eq.low, eq.high), rel=1e-9)
    assert S.t_quantile(0.975, 2) == pytest.approx(4.3027, abs=1e-4)
    assert S.mean_ci95([1.0, 2.0, 3.0]) == pytest.approx((2.0, 4.3027 / math.sqrt(3)), abs=1e-4)
    with pytest.raises(ValueError, match="must cover every compared arm"):
        S.paired_many_to_one(y, family=1)


def test_a_shared_variance_widens_the_interval_by_the_standard_error_it_adds():
    from scipy import stats as sps

    rng = np.random.default_rng(1)
    y = rng.normal(size=(3, 4))
    plain, none = S.paired_many_to_one(y, family=2), S.paired_many_to_one(y, family=2, shared=[0.0, np.nan])
    assert np.array_equal(plain.lo, none.lo) and np.array_equal(plain.shared, [0.0, 0.0])
    res = S.paired_many_to_one(y, family=2, shared=[0.3, 0.0])
    se = math.sqrt(plain.sd[0] ** 2 / 4 + 0.3)
    half = float(sps.t.ppf(1 - 0.05 / 4, 3)) * se  # the df stay n - 1
    assert (res.lo[0], res.hi[0]) == pytest.approx((plain.diff[0] - half, plain.diff[0] + half), rel=1e-12)
    assert (res.lo[1], res.hi[1]) == (plain.lo[1], plain.hi[1]) and res.t[0] == pytest.approx(plain.diff[0] / se)
    with pytest.raises(ValueError, match="negative"):
        S.paired_many_to_one(y, shared=[-0.1, 0.0])
    # The power numbers carry it, and more seeds do not shrink it: the MDE stops falling at its floor.
    assert S.paired_mdd(0.1, 5, 6, shared=0.01) > S.paired_mdd(0.1, 5, 6)
    assert S.paired_mdd(0.1, 200, 6, shared=0.01) > 2.8 * 0.1  # >= z-power's 2.8 s.e. of sqrt(0.01)
    assert S.seeds_to_decide(0.2, 0.1, 6, shared=0.01) is None and S.seeds_to_decide(0.2, 0.1, 6) is not None


def test_the_shared_variance_is_the_bootstrap_covariance_between_seeds():
    """Per-question differences d_sq = b_q + e_sq over Q questions that every seed shares: the question
    bootstrap's covariance between two seeds' mean differences is the questions' covariance / Q (their shared
    b), and each seed's own e adds nothing to it. shared_variance recovers it from resamples."""
    rng = np.random.default_rng(3)
    n, q, boots = 3, 400, 4000
    d = rng.normal(0, 0.5, q)[None, :] + rng.normal(0, 0.5, (n, q))
    idx = rng.integers(0, q, (boots, q))
    resampled = d[:, idx].mean(axis=-1)  # (seeds, resamples)
    c = np.cov(d, bias=True)
    exact = c[~np.eye(n, dtype=bool)].mean() / q
    assert float(S.shared_variance(resampled)) == pytest.approx(exact, rel=0.15)
    independent = rng.normal(0, 0.5, (n, q))  # no shared part: each seed's questions its own
    assert float(S.shared_variance(independent[:, idx].mean(axis=-1))) < 0.2 * exact
    with_gap = resampled.copy()
    with_gap[1, :10] = np.nan  # resamples where a seed's value is undefined are left out, not the seed
    assert float(S.shared_variance(with_gap)) == pytest.approx(float(S.shared_variance(resampled[:, 10:])))
    assert math.isnan(float(S.shared_variance(resampled[:1])))


def test_the_pooled_block_test_agrees_with_an_independent_anova_and_with_scipy():
    """The pooled test is kept as the comparison the robust one is measured against (bench/verdict_power.py):
    its residual s.d. is statsmodels-free ANOVA arithmetic done here by hand, its p values Dunnett's."""
    from scipy import stats as sps

    rng = np.random.default_rng(0)
    y = rng.normal(size=(7, 3))
    y[3] += 1.5
    grand = y.mean()
    ss_total = ((y - grand) ** 2).sum()
    ss_arm = 3 * ((y.mean(axis=1) - grand) ** 2).sum()
    ss_seed = 7 * ((y.mean(axis=0) - grand) ** 2).sum()
    assert float(S.rcbd_residual_sd(y)) == pytest.approx(math.sqrt((ss_total - ss_arm - ss_seed) / 12), rel=1e-12)
    ref = sps.dunnett(*y[1:], control=y[0], random_state=1).pvalue
    sd = math.sqrt(((y - y.mean(axis=1, keepdims=True)) ** 2).sum() / (7 * 2))
    t = (y[1:].mean(axis=1) - y[0].mean()) / (sd * math.sqrt(2 / 3))
    assert S.dunnett_pvalue(t, 6, 14) == pytest.approx(ref, abs=2e-3)
    assert S.dunnett_critical(6, 12) == pytest.approx(2.97, abs=0.01)  # Dunnett's (1964) two-sided table


@pytest.mark.parametrize("n", [3, 5, 10])
def test_minimal_detectable_difference_is_the_power_of_the_paired_test_by_scipys_noncentral_t(n):
    from scipy import stats as sps

    sd, family = 0.1, 6
    mdd = S.paired_mdd(sd, n, family)
    crit = sps.t.ppf(1 - 0.05 / (2 * family), n - 1)
    nct = sps.nct(n - 1, mdd * math.sqrt(n) / sd)
    mirrored = sps.nct(n - 1, -mdd * math.sqrt(n) / sd)  # P(T < -c) by symmetry (scipy's cdf there can be NaN)
    assert nct.sf(crit) + mirrored.sf(crit) == pytest.approx(0.8, abs=1e-6)
    assert S.paired_mdd(2 * sd, n, family) == pytest.approx(2 * mdd)  # linear in the s.d.
    assert S.paired_mdd(sd, n + 1, family) < mdd  # more seeds, smaller differences
    assert math.isnan(S.paired_mdd(sd, 1, family))


def test_seeds_to_decide_is_where_the_decision_probability_first_reaches_power():
    sd, family, margin = 0.1, 6, 0.05
    for truth in (0.0, 0.2):
        n = S.seeds_to_decide(truth, sd, family, margin=margin)
        assert S.decision_probability(truth, sd, n, family, margin=margin) >= 0.8
        assert S.decision_probability(truth, sd, n - 1, family, margin=margin) < 0.8
    # Next to the margin neither claim comes quickly: 0.049 is undecided at every count up to 20.
    assert S.seeds_to_decide(0.049, sd, family, margin=margin, max_seeds=20) is None
    assert S.seeds_to_decide(0.049, sd, family, margin=margin) > 20


def test_verdict_reports_each_arms_power_from_its_own_paired_spread(verdict):
    test = verdict.main
    table = verdict.per_trial.pivot_table(index="seed", columns="arm", values=test.metric)
    for r in test.arms:
        d = (table[r.arm] - table["relu"]).dropna()
        assert r.sd == pytest.approx(float(np.std(d, ddof=1)), rel=1e-9) and r.n == len(d)
        resampled = V.resampled_seed_table(verdict.per_trial, verdict.boot, test.metric, [r.arm, "relu"], r.seeds)
        assert r.shared_var == pytest.approx(float(S.shared_variance(resampled[0] - resampled[1])))
        assert r.mdd == pytest.approx(S.paired_mdd(r.sd, r.n, test.family, shared=r.shared_var))
        assert r.mdd_by_seeds[10] < r.mdd_by_seeds[5] < r.mdd




def test_controls_problems():
    done = pd.DataFrame({"controls_ok": pd.array([True, None], dtype="boolean")})
    assert V.controls_problems(done, {"positive": {"score": 0.3}, "negative": {"score": 0.0}}) == []
    assert len(V.controls_problems(done, {"positive": {"score": 0.1}, "negative": {"score": 0.2}})) == 2
    bad = pd.DataFrame({"controls_ok": [True, False]})
    assert "controls_ok" in V.controls_problems(bad, {})[0]


# -- (e) the report leads with the verdict ------------------------------------------------------
def write_results(root, study, controls_ok=True, positive=0.33, with_grid=True, unconverged=()):
    trials, grid = study
    rows = []
    for t in trials.itertuples():
        g = grid[(grid.trial_id == t.trial_id) & (grid.control == "sae")]
        done = t.status == "completed"
        rows.append(trial_frame({
            "experiment": "embedded-variants", "space": "variants", "variant": t.variant, "trial_id": t.trial_id,
            "seed": t.seed, "status": t.status, "profile": "embedded", "model": "embedded", "layer": 13,
            "mse": 0.1 if done else None, "explained_variance": 0.8 if done else None, "l0": 20.0 if done else None,
            "converged": done and t.trial_id not in unconverged, "val_mse_rel_change": 0.05 if done else None,
            "unlearning_score": SC.grid_metrics(g)["unlearning_score"] if done else None,
            "unlearning_grid": json.dumps(g[["forget_acc", "retain_acc"]].to_dict("records")) if done else None,
        }))
    frame = pd.concat(rows, ignore_index=True)
    metrics = {t: SC.grid_metrics(grid[(grid.trial_id == t) & (grid.control == "sae")]) for t in frame.trial_id}
    for bar in SC.BARS:
        frame[SC.bar_metric(bar)] = [metrics[t][SC.bar_metric(bar)] for t in frame.trial_id]
    frame["controls_ok"] = controls_ok
    root.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(root / "trials.parquet", index=False)
    if with_grid:
        grid.to_parquet(root / "grid.parquet", index=False)
        questions = pd.DataFrame({"question_id": range(N_FORGET + N_RETAIN),
                                  "domain": ["forget"] * N_FORGET + ["retain"] * N_RETAIN})
        questions.to_parquet(root / "questions.parquet", index=False)
    (root / "controls").mkdir(exist_ok=True)
    (root / "controls" / "embedded.json").write_text(json.dumps({
        "positive": {"score": positive, "n_forget": N_FORGET, "n_retain": N_RETAIN}, "negative": {"score": 0.0}}))
    return root


def test_report_leads_with_the_figure_and_the_matched_retain_table(study, tmp_path):
    from tune.report import build_report

    text = build_report(write_results(tmp_path / "r", study), n_boot=300).read_text()
    body = text.split("\n## ")
    assert body[0].index("![Forget vs retain") > body[0].index("Results:")  # right after the header
    assert body[1].startswith("Verdict: forget accuracy at matched retain")
    assert text.index("## Verdict") < text.index("## Evaluation controls") < text.index("## Six variants")
    assert (tmp_path / "r" / "report" / "forget_vs_retain.png").stat().st_size > 5000
    verdict_table = body[1].split("### ")[0]
    table: dict[str, str] = {}
    for line in verdict_table.splitlines():  # the first table: the matched-retain one (the power table follows)
        if line.startswith("| "):
            table.setdefault(line.split("|")[1].strip(), line)
    assert "better than relu" in table["fixed_ortho"] and "undecided" in table["adaptive_ortho"]
    assert "reference" in table["relu"] and "| 3 |" in table["relu"]
    assert "Headline metric, declared before the run" in text.split("\n## ")[0]  # the report's first lines
    assert "Power of this test" in text and "Secondary metrics" in text and "Exploratory" in text
    assert "Undecided: adaptive_ortho" in text and "MDE at 3 seeds" in text
    assert "Settings that select no feature" in text and "Mismatch" not in text
    assert "cannot detect removal" not in text


def test_unconverged_trials_are_marked_and_never_ranked(study, tmp_path):
    from tune.report import build_report

    text = build_report(write_results(tmp_path / "r", study, unconverged=("fixed_ortho-42",)), n_boot=100).read_text()
    verdict = text.split("## Verdict")[1].split("### ")[0]
    rows = {line.split("|")[1].strip(): line for line in verdict.splitlines() if line.startswith("| ")}
    assert "| 2 |" in rows["fixed_ortho"] and "| 3 |" in rows["relu"]  # seeds behind each verdict row
    assert "**Unconverged, marked † and never ranked:** fixed_ortho seed 42." in text
    variants_table = text.split("## Six variants")[1]
    assert any(line.startswith("| fixed_ortho |") and "2/3 †" in line for line in variants_table.splitlines())


@pytest.mark.parametrize("broken", ["trial_flag", "controls_json"])
def test_report_with_controls_out_of_range_leads_with_the_banner_and_no_verdict(study, tmp_path, broken):
    from tune.report import build_report

    root = write_results(tmp_path / "r", study, controls_ok=broken != "trial_flag",
                         positive=0.05 if broken == "controls_json" else 0.33)
    text = build_report(root, n_boot=100).read_text()
    head = text.split("\n## ")[0]
    assert "the evaluation cannot detect removal on this model: no score below is a result" in head.lower()
    assert head.lower().index("cannot detect removal") < head.index("![Forget vs retain")
    assert "## Verdict" not in text and "better than relu" not in text and "Headline metric (declared" not in text
    assert "## Diagnostics" in text and "| fixed_ortho |" in text  # the numbers stay, as diagnostics


def test_report_without_grid_keeps_todays_report(study, tmp_path):
    from tune.report import build_report

    root = write_results(tmp_path / "r", study, with_grid=False)
    text = build_report(root).read_text()
    assert "## Six variants" in text and "## Verdict" not in text
    assert not (root / "report" / "forget_vs_retain.png").exists()


# -- (g) arms are configurations ------------------------------------------------------------------
def test_an_arm_is_a_configuration_named_by_what_differs():
    trials = pd.DataFrame({
        "trial_id": list("abcdefg"), "variant": ["relu"] * 5 + ["fixed_ortho"] * 2,
        "cfg_l1_coeff": [0.1, 0.1, 0.14, 0.14, 0.1, 0.1, 0.1],  # relu's default is 0.1
        "cfg_alpha": [None] * 5 + [0.1, 0.1],
        "arm": [None, None, None, None, "relu_aa1", None, None],
    })
    assert V.arm_names(trials).tolist() == ["relu", "relu", "relu[l1_coeff=0.14]", "relu[l1_coeff=0.14]",
                                            "relu_aa1", "fixed_ortho", "fixed_ortho"]
    assert V.arm_names(trials.drop(columns=["arm", "cfg_l1_coeff", "cfg_alpha"])).tolist() == \
        ["relu"] * 5 + ["fixed_ortho"] * 2
    # The run's training and machine columns never name an arm (precision is not part of the study).
    run_columns = trials.assign(cfg_autocast=["bf16", "none"] * 3 + ["bf16"], cfg_device="cpu",
                                cfg_lr=[1e-3] * 6 + [2e-3])
    assert V.arm_names(run_columns).tolist() == V.arm_names(trials).tolist()


def test_two_relu_configurations_are_two_arms_in_the_verdict(study):
    trials, grid = study
    trials = trials.assign(cfg_l1_coeff=np.where(trials.variant == "adaptive_ortho", 0.3, 0.1))
    relabel = trials.variant == "adaptive_ortho"
    trials.loc[relabel, "variant"] = "relu"  # relu at l1 0.3: its own arm, not averaged into relu
    v = V.build_verdict(trials, grid, n_boot=20)
    assert sorted(set(v.per_trial["arm"])) == ["fixed_ortho", "relu", "relu[l1_coeff=0.3]"]
    assert v.main.by_arm()["relu[l1_coeff=0.3]"].n == 3
    assert (v.per_trial["arm"] == "relu").sum() == 3


# -- (h) settings chosen on one part of the questions, numbers measured on the other, both ways ----------
def test_matched_retain_chooses_on_select_and_reports_test():
    # Three settings. On select questions setting 1 has the lowest forget accuracy at retain >= 0.95;
    # on test questions setting 2 would look best: the rule still reports setting 1's test accuracies.
    f_sel, r_sel = np.array([0.9, 0.3, 0.5]), np.array([1.0, 0.96, 0.97])
    f_test, r_test = np.array([0.8, 0.6, 0.1]), np.array([1.0, 0.94, 0.99])
    assert SC.matched_retain_select_test(f_sel, r_sel, f_test, r_test, 0.95) == (0.6, 0.94)
    assert SC.matched_retain_select_test(f_sel, r_sel, f_test, r_test, 0.999) == (0.8, 1.0)
    f, r = SC.matched_retain_select_test(f_sel, r_sel, f_test, r_test, 1.01)
    assert math.isnan(f) and math.isnan(r)
    # Ties on select forget accuracy go to the higher select retain accuracy.
    assert SC.select_setting(np.array([0.3, 0.3]), np.array([0.96, 0.99]), 0.95)[0] == 1


def roles_for(n: int, rng: np.random.Generator) -> list[str]:
    role = np.array(["select"] * (n // 2) + ["test"] * (n - n // 2))
    rng.shuffle(role)
    return role.tolist()


FOLD_PARTS = {"A": ("select", "test"), "B": ("test", "select")}  # fold -> (the part it chooses on, scores on)


def part_accuracies(o: SC.Outcomes, roles: SC.Roles, part: str) -> tuple[np.ndarray, np.ndarray]:
    """(forget, retain) accuracy of every setting on the select or the test questions."""
    f, r = (roles.forget_test, roles.retain_test) if part == "test" else (~roles.forget_test, ~roles.retain_test)
    return o.forget[:, f].mean(axis=1), o.retain[:, r].mean(axis=1)


def scramble_part(sae: pd.DataFrame, roles: SC.Roles, part: str, rng: np.random.Generator) -> pd.DataFrame:
    """Every outcome of the ``part`` questions (select or test) replaced by a coin flip."""
    out = sae.copy()
    for col, test in (("forget_correct", roles.forget_test), ("retain_correct", roles.retain_test)):
        mask = test if part == "test" else ~test
        out[col] = ["".join(rng.choice(["0", "1"]) if m else ch for ch, m in zip(bits_, mask, strict=True))
                    for bits_ in out[col]]
    return out


@pytest.mark.parametrize("part", ["test", "select"])
def test_no_choice_reads_the_questions_that_score_it(study, part):
    """Two folds (fold A chooses on select and scores on test questions, fold B the reverse): scramble one part's
    outcomes. The fold that scores on it keeps its choice and reports that setting's scrambled value; the other fold
    chooses on the scrambled part and still reads its value on its own, untouched part; the trial's value is the
    reported fold's (A)."""
    trials, grid = study
    rng = np.random.default_rng(5)
    questions = pd.DataFrame({"question_id": range(N_FORGET + N_RETAIN),
                              "domain": ["forget"] * N_FORGET + ["retain"] * N_RETAIN,
                              "role": roles_for(N_FORGET, rng) + roles_for(N_RETAIN, rng)})
    roles = SC.question_roles(questions, N_FORGET, N_RETAIN)
    sae = grid[grid.control == "sae"]
    scrambled = scramble_part(sae, roles, part, rng)
    v, v2 = (V.build_verdict(trials, pd.concat([g, grid[grid.control != "sae"]]), questions=questions, n_boot=20)
             for g in (sae, scrambled))
    assert v.boot.select_test
    scoring = next(f for f, (_, scores) in FOLD_PARTS.items() if scores == part)
    moved = 0
    for tid in ("relu-42", "fixed_ortho-43", "adaptive_ortho-44"):
        o, o2 = (SC.trial_outcomes(g[g.trial_id == tid]) for g in (sae, scrambled))
        for fold, (chooses, scores) in FOLD_PARTS.items():
            picks = [tuple(map(int, SC.select_setting(*part_accuracies(x, roles, chooses), 0.95))) for x in (o, o2)]
            if fold == scoring:
                assert picks[0] == picks[1]  # its choice never reads the questions that score it
            moved += picks[0] != picks[1]
            for verdict, x, (pick, found) in ((v, o, picks[0]), (v2, o2, picks[1])):
                # The fold's value: the forget accuracy, on its scoring part, of the setting chosen on the other part.
                value = verdict.boot.folds[fold].loc[tid, "forget_acc_at_retain95"]
                expected = part_accuracies(x, roles, scores)[0][pick] if found else math.nan
                assert value == pytest.approx(expected, nan_ok=True)
        for verdict in (v, v2):
            assert verdict.boot.reported == ("A",)  # no grid of fold B's own: fold A alone is held out
            reported = verdict.boot.folds["A"].loc[tid, "forget_acc_at_retain95"]
            row = verdict.per_trial.set_index("trial_id").loc[tid, "forget_acc_at_retain95"]
            assert row == pytest.approx(reported, nan_ok=True)
    assert moved  # the other fold's choice does read the scrambled part: the test can see a choice move
    with pytest.raises(ValueError, match="role must be one of"):
        SC.question_roles(questions.assign(role="train"), N_FORGET, N_RETAIN)


def test_rows_whose_data_timing_chose_are_refused_by_the_block_design(study):
    trials, grid = study
    assert V.build_verdict(trials.assign(stream_join="first"), grid, n_boot=20).tests
    with pytest.raises(ValueError, match="stream_join = 'oldest'"):
        V.build_verdict(trials.assign(stream_join=np.where(trials["variant"] == "relu", "oldest", "first")), grid,
                        n_boot=20)
