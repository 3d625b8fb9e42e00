"""The noise split (hsae/noise.py): how much of an arm-vs-relu difference's variance is question sampling and how
much seed to seed, on planted per-question outcomes whose answer is known.

Every planted study: two arms x many seeds, one grid setting per trial at full retain, so the frontier area is
1 - the trial's forget accuracy; each forget question is answered correctly with the trial's own probability,
independently. The question variance of the seed-mean difference is then known in closed form:
sum over seeds of (p_arm(1 - p_arm) + p_relu(1 - p_relu)) / (n_seeds² n_questions).

Tolerances are calibrated on 25 plantings of each study (other generator seeds, 1,000 resamples, the same
planting as ``planted_split``): question share 0.995 ± 0.101 (question noise only), 0.0058 ± 0.0004 (seed noise
only), 0.492 ± 0.050 (equal parts); the measured question variance over its closed form 0.99 ± 0.07, 0.98 ± 0.06,
1.01 ± 0.07. Each two-sided bound below is about 4 of those s.d. from the truth (the seed-noise share's upper
bound, 0.012, is twice its mean), and well inside what a wrong estimator gives (a per-seed instead of a
seed-mean variance reads n_seeds = 300 times too large; the spread of the per-seed differences instead of the
bootstrap reads share 1 whatever the truth)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest

from hsae import noise as N
from hsae import scoring as SC
from hsae import stats as S
from hsae import verdict as V

METRIC = "frontier_area"


def planted_split(rng: np.random.Generator, p_arm: np.ndarray, p_relu: np.ndarray, n_questions: int,
                  n_boot: int = 1000) -> tuple[N.NoiseSplit, float]:
    """The arm's split against relu on planted outcomes (per-seed probabilities of a correct forget answer), and
    the question variance of the seed-mean difference in closed form."""
    outcomes, rows = {}, []
    for s, (pa, pr) in enumerate(zip(p_arm, p_relu, strict=True)):
        for arm, p in (("relu", pr), ("arm", pa)):
            tid = f"{arm}-{s}"
            outcomes[tid] = SC.Outcomes(rng.random((1, n_questions)) < p, np.ones((1, 10), dtype=bool),
                                        np.array([True]))
            rows.append({"trial_id": tid, "arm": arm, "seed": s})
    boot = SC.bootstrap(outcomes, n_boot=n_boot, seed=0)
    per_trial = pd.DataFrame(rows).merge(boot.point, left_on="trial_id", right_index=True)
    test = V.arm_test(per_trial, METRIC, margin=0.05)
    n = len(p_arm)
    expected = float((p_arm * (1 - p_arm) + p_relu * (1 - p_relu)).sum()) / (n ** 2 * n_questions)
    return N.metric_noise(test, per_trial, boot).by_arm()["arm"], expected


def test_seeds_that_differ_by_question_noise_alone_give_a_question_share_near_one():
    rng = np.random.default_rng(7)
    p = np.full(300, 0.6)  # every trial the same SAE up to which answers its questions drew
    split, expected = planted_split(rng, p, p, 1000)
    assert abs(split.question_share - 1) < 0.4, split
    assert abs(split.question_var / expected - 1) < 0.3  # the bootstrap's scale: the seed-mean, not one seed
    assert abs(split.total_var / expected - 1) < 0.3  # and the test's total agrees: nothing but question noise
    assert split.share_lo < 1 < split.share_hi and split.resamples == 1000


def test_seeds_that_differ_with_negligible_question_noise_give_a_question_share_near_zero():
    rng = np.random.default_rng(7)
    p_arm, p_relu = 0.5 + rng.normal(0, 0.14, 300), 0.5 + rng.normal(0, 0.14, 300)  # seed effects of s.d. 0.14
    split, expected = planted_split(rng, p_arm, p_relu, 2000)
    assert split.question_share < 0.012 and split.seed_share > 0.988, split
    assert abs(split.question_var / expected - 1) < 0.25
    assert not split.question_exceeds and split.seed_var == pytest.approx(split.total_var - split.question_var)


def test_equal_question_and_seed_variance_give_a_question_share_near_one_half():
    rng = np.random.default_rng(7)
    # Per seed: question variance of the difference 2 x 0.25 / 400 = 1.25e-3, seed variance 2 x 0.025² = 1.25e-3.
    p_arm, p_relu = 0.5 + rng.normal(0, 0.025, 300), 0.5 + rng.normal(0, 0.025, 300)
    split, expected = planted_split(rng, p_arm, p_relu, 400)
    assert abs(split.question_share - 0.5) < 0.2, split
    assert abs(split.question_var / expected - 1) < 0.3
    assert split.question_share + split.seed_share == pytest.approx(1.0)


def test_the_seed_part_is_floored_at_zero_and_a_question_variance_above_the_total_is_flagged():
    assert N.variance_split(1.0, 0.25) == (0.75, 0.25, 0.75, False)
    seed, q, s, exceeds = N.variance_split(1.0, 1.5)
    assert (seed, q, s, exceeds) == (0.0, 1.5, 0.0, True)  # the share is kept as measured, the flag says why
    seed, q, s, exceeds = N.variance_split(0.0, 0.0)
    assert seed == 0.0 and math.isnan(q) and math.isnan(s) and not exceeds  # nothing to split
    seed, q, s, exceeds = N.variance_split(2.0, math.nan)  # no question resamples: the total only
    assert seed == 2.0 and math.isnan(q) and math.isnan(s) and not exceeds


def test_the_pooled_share_sums_the_arms_variances_before_dividing(small_test):
    test, per_trial, boot = small_test
    noise = N.metric_noise(test, per_trial, boot)
    a, b, c = noise.splits
    pooled = (a.question_var + b.question_var + c.question_var) / (a.total_var + b.total_var + c.total_var)
    assert noise.pooled_share() == pytest.approx(pooled)
    # Two arms, shares 4 (a small total) and 0.1 (a large one): the pooled share follows the variances, not the
    # median of the ratios.
    two = dataclasses.replace(noise, splits=(dataclasses.replace(a, question_var=4.0, total_var=1.0),
                                             dataclasses.replace(b, question_var=1.0, total_var=10.0)))
    assert two.pooled_share() == pytest.approx(5 / 11)


@pytest.mark.parametrize("n", [3, 10])
def test_the_share_interval_covers_the_true_share_at_its_level(n):
    # Normal seed differences of variance 1 and a known question variance q / n: the measured share is q times
    # (n - 1) / chi²(n - 1), the interval inverts it. Over 4,000 draws the coverage is binomial, s.d. 0.0047.
    rng = np.random.default_rng(0)
    q, reps = 0.6, 4000
    d = rng.normal(0.0, 1.0, (reps, n))
    total = d.var(axis=1, ddof=1) / n
    intervals = [N.share_interval((q / n) / t, n) for t in total]
    covered = np.mean([lo <= q <= hi for lo, hi in intervals])
    assert abs(covered - N.SHARE_LEVEL) < 0.02, covered
    assert N.share_interval(1.0, 3) == pytest.approx((0.0513, 2.996), rel=1e-3)  # a factor of 60 at 3 seeds


def test_resampled_differences_are_the_seed_mean_of_each_seeds_arm_minus_relu():
    # Hand-made resamples: at seed 1 the arm has two trials (averaged, as the test's seed table averages them).
    samples = np.array([[1.0, 2.0, np.nan], [0.0, 0.0, 0.0], [3.0, 5.0, 1.0], [1.0, 1.0, 1.0], [2.0, 4.0, 2.0]])
    ids = ["a0", "r0", "a1", "r1", "a1b"]
    boot = SC.Bootstrap(trial_ids=ids, point=pd.DataFrame(index=ids), samples={METRIC: samples})
    per_trial = pd.DataFrame({"trial_id": ids, "arm": ["arm", "relu", "arm", "relu", "arm"], "seed": [0, 0, 1, 1, 1]})
    got = N.resampled_differences(per_trial, boot, METRIC, "arm", "relu", (0, 1))
    # seed 0: (1, 2, nan) - 0; seed 1: mean((3, 5, 1), (2, 4, 2)) - 1 = (1.5, 3.5, 0.5): mean over the seeds.
    assert got[:2].tolist() == [1.25, 2.75] and math.isnan(got[2])
    assert N.question_variance(got) == (pytest.approx(np.var([1.25, 2.75], ddof=1)), 2)


@pytest.fixture(scope="module")
def small_test():
    """Three arms against relu at 4 seeds (one arm decidedly better), their test and question resamples."""
    rng = np.random.default_rng(3)
    shift = {"relu": 0.0, "same": 0.0, "also": 0.01, "better": -0.3}  # forget accuracy: lower removes more
    outcomes, rows = {}, []
    for s in range(4):
        seed_effect = rng.normal(0, 0.03)
        for arm, d in shift.items():
            tid = f"{arm}-{s}"
            p = 0.7 + d + seed_effect + rng.normal(0, 0.02)
            outcomes[tid] = SC.Outcomes(rng.random((1, 200)) < p, np.ones((1, 10), dtype=bool), np.array([True]))
            rows.append({"trial_id": tid, "arm": arm, "seed": s})
    boot = SC.bootstrap(outcomes, n_boot=200, seed=0)
    per_trial = pd.DataFrame(rows).merge(boot.point, left_on="trial_id", right_index=True)
    return V.arm_test(per_trial, METRIC, margin=0.05, boot=boot), per_trial, boot


def test_the_mde_and_the_seeds_to_decide_are_the_verdicts_own(small_test):
    test, per_trial, boot = small_test
    noise = N.metric_noise(test, per_trial, boot)
    assert noise.resampled and noise.n_boot == 200 and [s.arm for s in noise.splits] == ["also", "better", "same"]
    for r in test.arms:
        s = noise.by_arm()[r.arm]
        assert (s.mdd, s.seeds_needed, s.diff, s.n) == (r.mdd, r.seeds_needed, r.diff, r.n)
        assert s.total_var == pytest.approx(r.sd ** 2 / r.n + r.shared_var) and s.decided == r.decided
        assert s.mdd_seed_only == pytest.approx(S.paired_mdd(math.sqrt(s.seed_var * r.n), r.n, test.family,
                                                             test.alpha), nan_ok=True)
        if s.seed_var > 0:
            assert s.mdd_seed_only < s.mdd  # less noise, a smaller detectable difference at the same seeds
    assert noise.by_arm()["better"].decided and noise.by_arm()["better"].seeds_needed is None


def test_a_metric_without_question_resamples_shows_the_total_only(small_test):
    test, per_trial, boot = small_test
    probe = per_trial.assign(sparse_probe_mean_k1=per_trial[METRIC])  # a trial-row metric: not in the bootstrap
    noise = N.metric_noise(V.arm_test(probe, "sparse_probe_mean_k1"), probe, boot)
    assert not noise.resampled and noise.shares() == []
    for s in noise.splits:
        assert math.isfinite(s.total_var) and math.isnan(s.question_var) and math.isnan(s.question_share)
    descriptive = N.metric_noise(V.arm_test(per_trial, METRIC, role="secondary", claimed=False), per_trial, boot)
    assert descriptive.by_arm()["better"].decided  # the interval decides it, were it a claim
