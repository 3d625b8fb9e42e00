"""Every refusal seen firing: the statistics' and the verdict's ValueErrors on the inputs they name, and the exact
sentence the report prints for each thing it will not compute (through the report's own rendering functions)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from hsae import scoring as SC
from hsae import stats as S
from hsae import verdict as V
from tests.test_budget import budget_dirs
from tests.test_report_sections import set_columns
from tests.test_verdict import N_FORGET, N_RETAIN, planted_study, write_results
from tune.report import markdown, verdict_parts
from tune.report_analyses import budget_blocks, frontier_blocks
from tune.report_blocks import controls_blocks
from tune.report_data import ReportInputs

N_BOOT = 20


def raises_exactly(message: str):
    """pytest.raises for a ValueError whose whole message is ``message``."""
    return pytest.raises(ValueError, match=f"^{re.escape(message)}$")


# -- hsae/stats.py ---------------------------------------------------------------------------------------
def test_t_quantile_refuses_a_probability_outside_zero_one_and_no_degrees_of_freedom():
    for p, df in ((0.0, 5), (1.0, 5), (1.5, 5), (0.5, 0)):
        with raises_exactly(f"need 0 < p < 1 and df > 0, got p={p!r}, df={df!r}"):
            S.t_quantile(p, df)


def test_dunnett_refuses_no_comparison_no_residual_df_and_a_bad_alpha():
    for m, df in ((0, 4), (2, 0)):
        with raises_exactly(f"need m >= 1 comparisons and df >= 1, got m={m!r}, df={df!r}"):
            S.dunnett_cdf(2.0, m, df)
    for alpha in (0.0, 1.0, -0.05):
        with raises_exactly(f"need 0 < alpha < 1, got {alpha!r}"):
            S.dunnett_critical(3, 8, alpha)


def test_the_block_design_refuses_fewer_than_two_arms_or_seeds_and_a_missing_value():
    for shape in ((1, 3), (3, 1)):
        with raises_exactly(f"the block design needs >= 2 arms and >= 2 blocks (seeds), got {shape[0]} x {shape[1]}"):
            S.rcbd_residual_sd(np.zeros(shape))
    table = np.arange(9.0).reshape(3, 3)
    table[1, 2] = np.nan
    with raises_exactly("the block design needs a value for every arm and block (no NaN)"):
        S.many_to_one(table)


def test_the_paired_test_refuses_a_table_without_two_arms_and_a_bad_alpha():
    for y in (np.zeros(3), np.zeros((1, 3)), np.zeros((4, 1, 3))):
        with raises_exactly(f"need a (..., arms, seeds) table with >= 2 arms, got shape {y.shape}"):
            S.paired_many_to_one(y)
    for alpha in (0.0, 1.0):
        with raises_exactly(f"need 0 < alpha < 1, got {alpha!r}"):
            S.paired_many_to_one(np.zeros((2, 3)), alpha=alpha)


# -- hsae/scoring.py and hsae/verdict.py -----------------------------------------------------------------
def test_accuracies_of_different_shapes_are_refused():
    # The area's message names the shapes its caller passed, not the columns it reshapes them to.
    for fn, args in ((SC.select_setting, (np.zeros(3), np.zeros(4), 0.99)), (SC.area, (np.zeros(3), np.zeros((3, 2))))):
        shapes = (np.shape(args[0]), np.shape(args[1]))
        with raises_exactly(f"forget and retain accuracies differ in shape: {shapes[0]} vs {shapes[1]}"):
            fn(*args)


@pytest.fixture(scope="module")
def study():
    return planted_study(np.random.default_rng(7))


def test_a_metric_neither_recomputed_nor_on_the_rows_is_refused(study):
    trials, grid = study
    with raises_exactly(f"metric(s) ['sparse_probe_mean_k1'] are neither recomputed from the grid "
                        f"({list(SC.CANDIDATES)}) nor columns of the trial rows"):
        V.build_verdict(trials, grid, secondary=["sparse_probe_mean_k1"], n_boot=N_BOOT)


def questions(roles: list[str | None], n_forget: int = N_FORGET) -> pd.DataFrame:
    n = n_forget + N_RETAIN
    return pd.DataFrame({"question_id": range(n), "domain": ["forget"] * n_forget + ["retain"] * N_RETAIN,
                         "role": (roles * n)[:n]})


def test_question_roles_that_cannot_be_matched_to_the_outcomes_are_refused():
    with raises_exactly(f"questions.parquet has {N_FORGET - 1} forget / {N_RETAIN} retain questions, the grid's "
                        f"outcomes {N_FORGET} / {N_RETAIN}: roles cannot be matched"):
        SC.question_roles(questions(["select", "test"], N_FORGET - 1), N_FORGET, N_RETAIN)
    with raises_exactly("questions.parquet: every forget question has one role; need both select and test"):
        SC.question_roles(questions(["test"]), N_FORGET, N_RETAIN)
    with raises_exactly("questions.parquet role must be one of ['select', 'test'], got ['null']"):
        SC.question_roles(questions(["select", None]), N_FORGET, N_RETAIN)


# -- what the report prints for each refusal ---------------------------------------------------------------
def rendered(blocks) -> str:
    return "".join(markdown(blocks))


def test_a_role_count_mismatch_drops_the_verdict_and_the_report_says_why(study, tmp_path):
    root = write_results(tmp_path / "r", study)
    questions(["select", "test"], N_FORGET - 1).to_parquet(root / "questions.parquet", index=False)
    inp = ReportInputs.load(root, n_boot=N_BOOT)
    assert verdict_parts(inp, tmp_path) == [
        f"_Verdict not computed: questions.parquet has {N_FORGET - 1} forget / {N_RETAIN} retain questions, the "
        f"grid's outcomes {N_FORGET} / {N_RETAIN}: roles cannot be matched._\n"]


def test_no_converged_trial_gives_no_verdict_and_the_report_says_why(study, tmp_path):
    trials, _ = study
    root = write_results(tmp_path / "r", study, unconverged=tuple(trials["trial_id"]))
    assert verdict_parts(ReportInputs.load(root, n_boot=N_BOOT), tmp_path) == [
        "_No verdict: no converged, completed trial: nothing is ranked (the convergence rule, docs/training.md)._\n"]


def test_controls_out_of_range_are_said_in_their_section():
    def section(positive: float, negative: float) -> str:
        return rendered(controls_blocks({"positive": {"score": positive, "n_forget": 10, "n_retain": 20},
                                         "negative": {"score": negative}}))

    out_of_range = "**The controls are out of range: unlearning scores below cannot be trusted.**"
    assert out_of_range in section(0.1, 0.0) and out_of_range in section(0.3, 0.1)
    assert out_of_range not in section(0.3, 0.0) and "The evaluation can detect removal." in section(0.3, 0.0)


def test_the_frontier_makes_no_claims_while_the_controls_are_out_of_range(study, tmp_path):
    root = write_results(tmp_path / "r", study, positive=0.05)
    set_columns(root, cfg_target_l0=lambda r: 16.0 if r.seed == 44 else 8.0)
    text = rendered(frontier_blocks(ReportInputs.load(root, n_boot=N_BOOT)))
    assert "**No claims: positive control 0.050 < 0.2 (the removal it must detect is not detected).**" in text
    assert "### Verdict at each target L0" not in text


def budget_text(main_dir, budget_dir) -> str:
    return rendered(budget_blocks(ReportInputs.load(main_dir, n_boot=N_BOOT, budget_dir=budget_dir)))


def test_each_budget_check_the_report_cannot_make_says_why(tmp_path):
    main_dir, budget = budget_dirs(tmp_path)
    (main_dir / "grid.parquet").rename(tmp_path / "main-grid.parquet")
    assert ("No budget check: the main job has no grid.parquet or no single declared headline."
            in budget_text(main_dir, budget))
    (tmp_path / "main-grid.parquet").rename(main_dir / "grid.parquet")

    (budget / "grid.parquet").rename(tmp_path / "budget-grid.parquet")
    assert f"No budget check: {budget} has no grid.parquet." in budget_text(main_dir, budget)
    grid = pd.read_parquet(tmp_path / "budget-grid.parquet")
    grid.assign(bank="another-bank").to_parquet(budget / "grid.parquet", index=False)
    assert ("No budget check: the budget run scored another question bank (another profile?): nothing to compare."
            in budget_text(main_dir, budget))
    grid.to_parquet(budget / "grid.parquet", index=False)

    longer = pd.read_parquet(budget / "trials.parquet")
    longer.assign(steps=1500).to_parquet(budget / "trials.parquet", index=False)  # no longer than the main job
    assert ("No budget check: not computed: relu seed 42: the budget run's 1500 steps are not more than the main "
            "job's 1500 (run it with --steps)." in budget_text(main_dir, budget))
    longer.assign(seed=99).to_parquet(budget / "trials.parquet", index=False)  # no main-job trial of seed 99
    assert ("No budget check: no trial of the budget run has a main-job twin (same arm, same seed)."
            in budget_text(main_dir, budget))


def test_a_budget_check_without_seed_noise_has_no_reading(tmp_path):
    main_dir, budget = budget_dirs(tmp_path)
    trials = pd.read_parquet(main_dir / "trials.parquet")
    trials[trials["seed"] == 42].to_parquet(main_dir / "trials.parquet", index=False)  # one seed: no noise
    text = budget_text(main_dir, budget)
    assert "No reading for relu, fixed_ortho, adaptive_ortho: a metric or its seed noise is undefined." in text
    assert "More tokens changed" not in text
