"""The report's cross-checks, each seen firing (not only seen absent): a trial row whose metric disagrees with
the recomputation from grid.parquet is flagged "Mismatch"; so are retain accuracies that are only upper bounds,
a questions.parquet whose counts differ from the grid's outcomes, and completed trials left out of the verdict."""

import json
import re

import numpy as np
import pandas as pd
import pytest

from hsae import verdict as V
from hsae.results import TRIAL_COLUMNS, trial_frame

# The verdict's metrics a trial row carries: what the cross-check compares.
ROW_METRICS = [m for m in V.CANDIDATES if m in {name for name, _ in TRIAL_COLUMNS}]

N_FORGET, N_RETAIN = 40, 200
SEEDS = (42, 43)
# (forget_acc, retain_acc) per setting, per variant: relu removes little, fixed_ortho more at equal retain.
POINTS = {"relu": [(1.0, 1.0), (0.9, 0.995), (0.8, 0.98), (0.6, 0.95)],
          "fixed_ortho": [(1.0, 1.0), (0.7, 0.99), (0.5, 0.98), (0.3, 0.95)]}


def outcome_bits(n_correct: int, n: int, rng: np.random.Generator) -> str:
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, size=n_correct, replace=False)] = True
    return "".join("1" if m else "0" for m in mask)


def planted_grid(rng: np.random.Generator) -> pd.DataFrame:
    """Grid rows of every trial (per-question outcomes that match their accuracies) and a positive control."""
    rows = []
    for tid, points, control in [*((f"{v}-{s}", p, "sae") for v, p in POINTS.items() for s in SEEDS),
                                 ("positive-control", [(0.5, 0.995)], "positive")]:
        for i, (forget, retain) in enumerate(points):
            rows.append({"trial_id": tid, "control": control, "grid": "saebench", "multiplier": 25.0 * (i + 1),
                         "features_selected": 10, "forget_acc": forget, "retain_acc": retain,
                         "forget_correct": outcome_bits(round(forget * N_FORGET), N_FORGET, rng),
                         "retain_correct": outcome_bits(round(retain * N_RETAIN), N_RETAIN, rng)})
    return pd.DataFrame(rows)


def trial_rows(metrics: dict[str, dict[str, float]]) -> pd.DataFrame:
    """Completed, converged trial rows, one per planted trial, carrying ``metrics[trial_id]`` (if given)."""
    frames = []
    for variant in POINTS:
        for seed in SEEDS:
            tid = f"{variant}-{seed}"
            frames.append(trial_frame({
                "experiment": "embedded-variants", "space": "variants", "variant": variant, "trial_id": tid,
                "seed": seed, "status": "completed", "profile": "embedded", "model": "embedded", "layer": 13,
                "mse": 0.1, "explained_variance": 0.8, "l0": 20.0, "converged": True, "val_mse_rel_change": 0.0,
                "controls_ok": True, **metrics.get(tid, {})}))
    return pd.concat(frames, ignore_index=True)


@pytest.fixture(scope="module")
def honest() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Grid rows, and trial rows holding exactly what the verdict recomputes from those grid rows."""
    grid = planted_grid(np.random.default_rng(0))
    recomputed = V.build_verdict(trial_rows({}), grid, n_boot=20).per_trial.set_index("trial_id")
    return grid, trial_rows(recomputed[ROW_METRICS].to_dict("index"))


def report_for(root, grid: pd.DataFrame, trials: pd.DataFrame, questions: pd.DataFrame | None = None) -> str:
    """report.md of a results directory holding these files (and controls in range)."""
    from tune.report import build_report

    (root / "controls").mkdir(parents=True)
    (root / "controls" / "embedded.json").write_text(json.dumps(
        {"positive": {"score": 0.5, "n_forget": N_FORGET, "n_retain": N_RETAIN}, "negative": {"score": 0.0}}))
    grid.to_parquet(root / "grid.parquet", index=False)
    trials.to_parquet(root / "trials.parquet", index=False)
    if questions is not None:
        questions.to_parquet(root / "questions.parquet", index=False)
    return build_report(root, n_boot=50).read_text()


def bold_flags(text: str, opening: str) -> list[str]:
    """The bold sentences of the report that open with ``opening`` (what follows it)."""
    return [s.strip() for s in re.findall(rf"\*\*\s*{re.escape(opening)}([^*]*)\*\*", text)]


def test_rows_that_agree_with_the_grid_raise_no_flag(honest, tmp_path):
    grid, trials = honest
    assert {"forget_acc_at_retain98", "unlearning_score"} <= set(ROW_METRICS)
    text = report_for(tmp_path, grid, trials)
    assert "## Verdict" in text and bold_flags(text, "Mismatch: ") == []


@pytest.mark.parametrize("metric,planted", [("forget_acc_at_retain98", 0.123), ("unlearning_score", None)])
def test_a_row_that_disagrees_with_the_grid_is_flagged(honest, tmp_path, metric, planted):
    grid, trials = honest
    tampered = trials.copy()
    tampered.loc[tampered["trial_id"] == "fixed_ortho-43", metric] = planted  # a wrong value, or a missing one
    flags = bold_flags(report_for(tmp_path, grid, tampered), "Mismatch: ")
    assert len(flags) == 1 and flags[0].startswith(metric) and "1 trial(s)" in flags[0], flags


def test_retain_accuracies_that_are_only_upper_bounds_are_flagged(honest, tmp_path):
    grid, trials = honest
    assert "upper bound" not in report_for(tmp_path / "exact", grid.assign(retain_acc_exact=True), trials)
    inexact = grid.assign(retain_acc_exact=~(grid["trial_id"].eq("relu-42") & grid["multiplier"].eq(50.0)))
    text = report_for(tmp_path / "inexact", inexact, trials)
    assert "**1 setting(s) have retain accuracy as an upper bound" in text


def test_a_question_count_that_disagrees_with_the_grid_is_flagged(honest, tmp_path):
    grid, trials = honest

    def questions(n_forget: int) -> pd.DataFrame:
        return pd.DataFrame({"question_id": range(n_forget + N_RETAIN),
                             "domain": ["forget"] * n_forget + ["retain"] * N_RETAIN})

    assert bold_flags(report_for(tmp_path / "same", grid, trials, questions(N_FORGET)), "questions.parquet") == []
    flags = bold_flags(report_for(tmp_path / "short", grid, trials, questions(N_FORGET - 1)), "questions.parquet")
    assert flags == [f"holds {N_FORGET - 1} forget / {N_RETAIN} retain questions, the grid's outcomes another count."]


def test_a_completed_trial_without_grid_rows_is_named_outside_the_verdict(honest, tmp_path):
    grid, trials = honest
    extra = trial_rows({}).query("trial_id == 'relu-42'").assign(trial_id="relu-44", seed=44)
    text = report_for(tmp_path, grid, pd.concat([trials, extra], ignore_index=True))
    assert "Not in the verdict: relu-44 (no grid rows)." in text
