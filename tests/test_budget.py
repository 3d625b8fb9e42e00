"""The budget check (hsae/budget.py, docs/training.md "The budget check"): one seed per arm at more steps, each
metric's change read against the main job's seed noise; and its report section."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from hsae.budget import arm_outcomes, budget_check, seed_noise, twins
from hsae.stats import rcbd_residual_sd
from tests.test_report_sections import section, set_columns
from tests.test_verdict import planted_study, write_results
from tune.report import build_report, main

# Per-trial EV of the main job: arm effect + seed effect + a small interaction (the seed noise).
EV = {("relu", 42): 0.750, ("relu", 43): 0.752, ("relu", 44): 0.757,
      ("fixed_ortho", 42): 0.760, ("fixed_ortho", 43): 0.763, ("fixed_ortho", 44): 0.766,
      ("adaptive_ortho", 42): 0.761, ("adaptive_ortho", 43): 0.764, ("adaptive_ortho", 44): 0.765}


def per_trial(values: dict, steps: int) -> pd.DataFrame:
    return pd.DataFrame([{"arm": a, "seed": s, "steps": steps, "explained_variance": v}
                         for (a, s), v in values.items()])


def test_seed_noise_is_the_residual_sd_of_the_arm_by_seed_table():
    table = np.array([[EV[(a, s)] for s in (42, 43, 44)] for a in ("adaptive_ortho", "fixed_ortho", "relu")])
    assert seed_noise(per_trial(EV, 1500), "explained_variance") == pytest.approx(float(rcbd_residual_sd(table)))
    additive = {(a, s): i * 0.01 + (s - 42) * 0.003 for i, a in enumerate(("relu", "topk")) for s in (42, 43, 44)}
    assert seed_noise(per_trial(additive, 1500), "explained_variance") == pytest.approx(0.0, abs=1e-12)
    one_seed = per_trial({k: v for k, v in EV.items() if k[1] == 42}, 1500)
    assert np.isnan(seed_noise(one_seed, "explained_variance"))  # no replicate, no noise estimate


def test_a_failed_trial_drops_its_arm_from_the_noise_not_its_seed():
    failed = {**EV, ("relu", 44): float("nan")}
    rest = {k: v for k, v in EV.items() if k[0] != "relu"}
    assert seed_noise(per_trial(failed, 1500), "explained_variance") == pytest.approx(
        seed_noise(per_trial(rest, 1500), "explained_variance"))


def test_a_change_beyond_the_seed_noise_fails_the_arm_and_one_within_passes():
    noise = seed_noise(per_trial(EV, 1500), "explained_variance")
    longer = per_trial({("relu", 42): EV[("relu", 42)] + 10 * noise,  # still learning at the longer budget
                        ("fixed_ortho", 42): EV[("fixed_ortho", 42)] + 0.5 * noise,  # done
                        ("topk", 42): 0.9}, 3000)  # no main-job twin: left out
    check = budget_check(per_trial(EV, 1500), longer, ["explained_variance"])
    assert sorted(check["arm"]) == ["fixed_ortho", "relu"]
    relu = check[check["arm"] == "relu"].iloc[0]
    assert relu["change"] == pytest.approx(10 * noise) and not relu["within_noise"]
    assert (relu["steps"], relu["budget_steps"]) == (1500, 3000)
    assert arm_outcomes(check) == {"relu": "moved", "fixed_ortho": "held"}


def test_without_a_noise_estimate_an_arm_has_no_reading_rather_than_a_failure():
    main = per_trial({k: v for k, v in EV.items() if k[1] == 42}, 1500)  # one seed: no noise
    check = budget_check(main, per_trial({("relu", 42): EV[("relu", 42)]}, 3000), ["explained_variance"])
    assert check["within_noise"].isna().all()
    assert arm_outcomes(check) == {"relu": "unknown"}


@pytest.mark.parametrize(("main_extra", "budget_steps", "budget_recipe", "message"), [
    ({("relu", 42): 0.7}, 3000, 0.1, "2 trials of relu seed 42"),
    ({}, 1500, 0.1, "not more than the main job's"),
    ({}, 3000, 0.14, "recipes differ (l1_coeff 0.1 in the main job, 0.14 in the budget run)"),
])
def test_twins_that_do_not_answer_the_question_are_refused(main_extra, budget_steps, budget_recipe, message):
    main = per_trial(EV, 1500).assign(cfg_l1_coeff=0.1, cfg_steps=1500)
    main = pd.concat([main, per_trial(main_extra, 750).assign(cfg_l1_coeff=0.1, cfg_steps=750)])
    longer = per_trial({("relu", 42): 0.8}, budget_steps).assign(cfg_l1_coeff=budget_recipe, cfg_steps=budget_steps)
    with pytest.raises(ValueError, match=re.escape(message)):
        twins(main, longer)


def budget_dirs(tmp_path):
    """A planted main job (EV with seed noise) and its budget run: seed 42 at twice the steps, relu's EV up by
    0.05 (far beyond the noise), the others' unchanged; the grids are the same, so the headline does not move."""
    main_dir = write_results(tmp_path / "main", planted_study(np.random.default_rng(7)))
    set_columns(main_dir, steps=lambda r: 1500, explained_variance=lambda r: EV.get((r.variant, r.seed)))
    budget = write_results(tmp_path / "budget", planted_study(np.random.default_rng(7)))
    trials = set_columns(budget, steps=lambda r: 3000, explained_variance=lambda r: (
        EV.get((r.variant, r.seed), 0.0) + (0.05 if r.variant == "relu" else 0.0)))
    trials[trials["seed"] == 42].to_parquet(budget / "trials.parquet", index=False)
    return main_dir, budget


def test_the_report_shows_the_budget_check_and_writes_its_table(tmp_path):
    main_dir, budget = budget_dirs(tmp_path)
    text = build_report(main_dir, n_boot=50, budget_dir=budget).read_text()
    part = section(text, "Budget check")
    assert "3,000 steps (the main job: 1,500)" in part
    relu = next(line for line in part.splitlines() if line.startswith("| relu | 42 |"))
    assert "+0.0500 (beyond noise)" in relu
    assert "More tokens changed relu beyond the seed noise" in part
    check = pd.read_csv(main_dir / "report" / "budget_check.csv")
    assert set(check["metric"]) == {"explained_variance", "frontier_area"}
    assert check.loc[check["metric"] == "frontier_area", "change"].abs().max() == 0.0  # same grids
    assert "Budget check" in (main_dir / "report" / "report.html").read_text()


def test_no_budget_directory_no_section_and_a_missing_one_is_a_clear_error(tmp_path, capsys):
    main_dir, _ = budget_dirs(tmp_path)
    assert "Budget check" not in build_report(main_dir, n_boot=50).read_text()
    assert main([str(main_dir), "--budget-check", str(tmp_path / "nowhere")]) == 2
    assert "--budget-check" in capsys.readouterr().err
