"""The budget check: would more tokens change what the verdict reads? (docs/training.md, "The budget check").

The plateau rule (``hsae.convergence``) asks whether held-out MSE still falls at a constant rate. The budget
check asks the question the verdict cares about directly: one seed of each arm trained again with twice the
steps (same recipe, same seed: same initialisation and data order), its explained variance and headline
metric set against the same seed's values at the main job's budget. More tokens would not help an arm when
both changes are smaller than the seed noise: the residual s.d. of the main job's arm x seed table (the
spread one trial's value has around its arm's mean, the noise the verdict's test already carries).
Pure functions of per-trial values, so the table is recomputed from the two results directories.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from hsae.stats import rcbd_residual_sd

KEYS = ("arm", "seed")  # a budget trial is the main job's trial of the same arm and seed, longer
COLUMNS = ("arm", "seed", "metric", "steps", "budget_steps", "value", "budget_value", "change", "seed_sd",
           "within_noise")


def seed_noise(per_trial: pd.DataFrame, metric: str) -> float:
    """Residual s.d. of ``metric`` in the arm x seed table of the main job (complete arms and seeds only);
    NaN when fewer than two arms or two seeds are complete."""
    table = per_trial.groupby(list(KEYS))[metric].mean().unstack("seed").dropna(axis=1, how="any")
    table = table.dropna(axis=0, how="any")
    if table.shape[0] < 2 or table.shape[1] < 2:
        return float("nan")
    return float(rcbd_residual_sd(table.to_numpy(dtype=float)))


def budget_check(main: pd.DataFrame, budget: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """One row per (budget trial, metric): the value at the main job's steps and at the budget's, their change
    and the seed noise it is read against. ``main`` and ``budget`` carry ``arm``, ``seed``, ``steps`` and the
    metrics (one row per trial); a budget trial with no main-job twin is left out."""
    rows = []
    noise = {m: seed_noise(main, m) for m in metrics}
    twins = budget.merge(main, on=list(KEYS), suffixes=("_budget", ""))
    for r in twins.to_dict("records"):
        for m in metrics:
            value, longer = float(r[m]), float(r[f"{m}_budget"])
            change = longer - value
            within = bool(np.isfinite(change) and np.isfinite(noise[m]) and abs(change) < noise[m])
            rows.append({"arm": r["arm"], "seed": int(r["seed"]), "metric": m, "steps": int(r["steps"]),
                         "budget_steps": int(r["steps_budget"]), "value": value, "budget_value": longer,
                         "change": change, "seed_sd": noise[m], "within_noise": within})
    return pd.DataFrame(rows, columns=list(COLUMNS))


def arms_passing(check: pd.DataFrame) -> list[str]:
    """Arms whose every checked metric changed by less than the seed noise at the longer budget."""
    if check.empty:
        return []
    passed = check.groupby("arm")["within_noise"].all()
    return [str(a) for a, ok in passed.items() if ok]
