"""The budget check: would more tokens change what the verdict reads? (docs/training.md, "The budget check").

The plateau rule (``hsae.convergence``) asks whether held-out MSE still falls at a constant rate. The budget
check asks the question the verdict cares about directly: one seed of each arm trained again with twice the
steps (same recipe, same seed: same initialisation and data order), its explained variance and headline
metric set against the same seed's values at the main job's budget. More tokens would not help an arm when
both changes are smaller than the seed noise: the residual s.d. of the main job's arm x seed table over its
completed trials (the spread one trial's value has around its arm's mean, the noise model of the verdict's test).
Pure functions of per-trial values, so the table is recomputed from the two results directories.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from hsae.stats import rcbd_residual_sd

KEYS = ("arm", "seed")  # a budget trial is the main job's trial of the same arm and seed, longer
# What may differ between twins: the budget itself and what logging and checkpointing follow from it.
BUDGET_FIELDS = ("cfg_steps", "cfg_log_every", "cfg_checkpoint_every", "cfg_keep_checkpoints")
COLUMNS = ("arm", "seed", "metric", "steps", "budget_steps", "value", "budget_value", "change", "seed_sd",
           "within_noise")


def seed_noise(per_trial: pd.DataFrame, metric: str) -> float:
    """Residual s.d. of ``metric`` in the arm x seed table of the main job: seeds no arm has are dropped, then
    arms missing a seed (as the verdict drops them); NaN when fewer than two arms or two seeds remain."""
    table = per_trial.groupby(list(KEYS))[metric].mean().unstack("seed").dropna(axis=1, how="all")
    table = table.dropna(axis=0, how="any")
    if table.shape[0] < 2 or table.shape[1] < 2:
        return float("nan")
    return float(rcbd_residual_sd(table.to_numpy(dtype=float)))


def twins(main: pd.DataFrame, budget: pd.DataFrame) -> pd.DataFrame:
    """Budget trials joined to their main-job twins (budget columns suffixed ``_budget``). ValueError when an arm
    and seed has two trials in one run, when a budget trial is not longer than its twin, or when the twins'
    recipes (``cfg_*`` columns other than ``BUDGET_FIELDS``) differ: then the runs do not answer the question."""
    for name, frame in (("main job", main), ("budget run", budget)):
        repeated = frame[frame.duplicated(list(KEYS), keep=False)]
        if not repeated.empty:
            r = repeated.iloc[0]
            raise ValueError(f"the {name} has {int((repeated['arm'] == r['arm']).sum())} trials of {r['arm']} seed "
                             f"{r['seed']}: give each run one trial per arm and seed")
    pairs = budget.merge(main, on=list(KEYS), suffixes=("_budget", ""))
    recipe = [c for c in main if c.startswith("cfg_") and c not in BUDGET_FIELDS and f"{c}_budget" in pairs]
    for r in pairs.to_dict("records"):
        where = f"{r['arm']} seed {r['seed']}"
        if not r["steps_budget"] > r["steps"]:
            raise ValueError(f"{where}: the budget run's {r['steps_budget']} steps are not more than the main job's "
                             f"{r['steps']} (run it with --steps)")
        c = recipe_difference(r, recipe, "_budget")
        if c is not None:
            raise ValueError(f"{where}: the runs' recipes differ ({c.removeprefix('cfg_')} {r[c]} in the main job, "
                             f"{r[f'{c}_budget']} in the budget run): only the steps may differ")
    return pairs


def recipe_difference(pair: dict, recipe: list[str], suffix: str) -> str | None:
    """The first of the ``recipe`` columns whose values differ between the two sides of a joined pair of trials
    (``c`` and ``c + suffix``; unset on both sides is the same); None when they agree."""
    for c in recipe:
        a, b = pair[c], pair[f"{c}{suffix}"]
        if not (a == b or (pd.isna(a) and pd.isna(b))):
            return c
    return None


def budget_check(main: pd.DataFrame, budget: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """One row per (budget trial, metric): the value at the main job's steps and at the budget's, their change,
    the seed noise it is read against and whether it is within it (NA where either is undefined). ``main`` and
    ``budget`` carry ``arm``, ``seed``, ``steps``, the metrics and any ``cfg_*`` recipe columns, one row per
    trial; a budget trial with no main-job twin is left out; ``twins`` says what is refused."""
    noise = {m: seed_noise(main, m) for m in metrics}
    rows = []
    for r in twins(main, budget).to_dict("records"):
        for m in metrics:
            value, longer = float(r[m]), float(r[f"{m}_budget"])
            change = longer - value
            within = (abs(change) < noise[m]) if np.isfinite(change) and np.isfinite(noise[m]) else None
            rows.append({"arm": r["arm"], "seed": int(r["seed"]), "metric": m, "steps": int(r["steps"]),
                         "budget_steps": int(r["steps_budget"]), "value": value, "budget_value": longer,
                         "change": change, "seed_sd": noise[m], "within_noise": within})
    out = pd.DataFrame(rows, columns=list(COLUMNS))
    out["within_noise"] = out["within_noise"].astype("boolean")
    return out


def arm_outcomes(check: pd.DataFrame) -> dict[str, str]:
    """Each arm's reading: "moved" when some metric changed beyond the seed noise, "held" when every metric
    stayed within it, "unknown" otherwise (a metric or its noise undefined)."""
    out = {}
    for arm, within in check.groupby("arm", sort=False)["within_noise"]:
        known = within.dropna().astype(bool)
        out[str(arm)] = "moved" if not known.all() else "held" if len(known) == len(within) else "unknown"
    return out
