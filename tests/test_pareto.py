"""The Pareto front of a multi-objective study, on planted points, and in both reports."""

import numpy as np
import pandas as pd

from hsae.pareto import pareto_mask, study_fronts
from tune.report import pareto_parts


def test_front_is_the_non_dominated_points_with_directions():
    # (val_mse: min, explained_variance: max)
    values = np.array([[0.1, 0.5], [0.2, 0.9], [0.3, 0.8], [0.1, 0.4], [np.nan, 1.0], [0.05, 0.3]])
    mask = pareto_mask(values, ["min", "max"])
    # [0.3, 0.8] is beaten by [0.2, 0.9]; [0.1, 0.4] by [0.1, 0.5]; a NaN is never on the front.
    assert mask.tolist() == [True, True, False, False, False, True]
    # Flipping a direction changes the front: both minimised, only the cheapest-in-both survive.
    assert pareto_mask(values, ["min", "min"]).tolist() == [False, False, False, False, False, True]


def test_ties_are_both_on_the_front():
    assert pareto_mask(np.array([[1.0, 1.0], [1.0, 1.0], [2.0, 2.0]]), ["min", "min"]).tolist() == [True, True, False]


def study_rows():
    rng = np.random.default_rng(0)
    n = 12
    return pd.DataFrame({
        "experiment": "tiny-search", "trial_id": [f"t{i}" for i in range(n)], "variant": "fixed_ortho", "seed": 42,
        "status": ["completed"] * (n - 1) + ["failed"], "converged": [True] * (n - 2) + [False, None],
        "search_objectives": "val_mse:min,forget_acc_at_retain98:min", "search_study": "tiny-search-15b79aef-s",
        "cfg_alpha": rng.uniform(0, 0.4, n), "val_mse": rng.uniform(0.1, 0.2, n),
        "forget_acc_at_retain98": rng.uniform(0.5, 1.0, n)})


def test_study_fronts_rank_only_converged_completed_rows(tmp_path):
    rows = study_rows()
    rows.loc[3, "forget_acc_at_retain98"] = np.nan  # no setting met the bar: never on the front
    ((study, objectives, ranked),) = study_fronts(rows)
    assert study == "tiny-search-15b79aef-s" and objectives == [("val_mse", "min"), ("forget_acc_at_retain98", "min")]
    assert len(ranked) == 10  # the unconverged and the failed row are not ranked
    assert not ranked.loc[3, "on_front"]
    expected = pareto_mask(ranked[["val_mse", "forget_acc_at_retain98"]].to_numpy(), ["min", "min"])
    assert ranked["on_front"].tolist() == expected.tolist() and expected.any()
    # A single-objective study or a grid sweep has no front.
    assert study_fronts(rows.assign(search_objectives="val_mse:min")) == []
    assert study_fronts(rows.drop(columns="search_objectives")) == []
    # Two studies of one experiment (another model into the same folder) are two fronts, never one.
    other = rows.assign(search_study="tiny-search-0000aaaa-s", trial_id=[f"u{i}" for i in range(len(rows))])
    assert [s for s, _, _ in study_fronts(pd.concat([rows, other]))] == ["tiny-search-0000aaaa-s",
                                                                         "tiny-search-15b79aef-s"]
    text = "\n".join(pareto_parts(rows, tmp_path))
    assert "## Pareto front: Optuna study tiny-search-15b79aef-s" in text
    assert (tmp_path / "pareto_0.png").stat().st_size > 1000
    front_ids = set(ranked.loc[ranked["on_front"], "trial_id"])
    listed = {line.split("|")[1].strip() for line in text.splitlines()
              if line.startswith("| t") and not line.startswith("| trial")}
    assert listed == front_ids and "cfg_alpha" in text


def test_report_html_draws_the_front(tmp_path):
    from tests.test_report_html import console_errors, plots, render
    from tune.report_html import write_html

    rows = study_rows()
    rows.to_parquet(tmp_path / "trials.parquet")
    page = write_html(tmp_path, tmp_path)
    dom, stderr = render(page, tmp_path / "profile")
    assert console_errors(stderr) == []
    assert plots(dom)["pareto-0"]["scatter"] == 2  # the converged trials, and the front joined
    n_front = int(study_fronts(rows)[0][2]["on_front"].sum())
    assert f"{n_front} of 10 converged trials are on the front" in page.read_text()
