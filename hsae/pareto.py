"""The Pareto front of a multi-objective search: which rows no other row beats on every objective."""

from __future__ import annotations

import numpy as np
import pandas as pd


def pareto_mask(values: np.ndarray, directions: list[str]) -> np.ndarray:
    """``values`` (n, m), one column per objective with its direction ("min"/"max"): True where no other row
    is at least as good on every objective and strictly better on one. Rows with a NaN are never on it."""
    signed = np.asarray(values, dtype=float) * np.array([1.0 if d == "min" else -1.0 for d in directions])
    finite = np.isfinite(signed).all(axis=1)
    on_front = finite.copy()
    for i in np.flatnonzero(finite):
        others = signed[finite]
        dominated = (others <= signed[i]).all(axis=1) & (others < signed[i]).any(axis=1)
        on_front[i] = not dominated.any()
    return on_front


def study_fronts(trials: pd.DataFrame) -> list[tuple[str, list[tuple[str, str]], pd.DataFrame]]:
    """Per Optuna study of two or more objectives: (study, objectives, its converged completed rows with an
    ``on_front`` column). Unconverged rows are never ranked, so they are not on any front."""
    if "search_objectives" not in trials or "search_study" not in trials:
        return []
    fronts = []
    for (study, text), rows in trials.dropna(subset=["search_study", "search_objectives"]).groupby(
            ["search_study", "search_objectives"]):
        objectives = [(p.partition(":")[0], p.partition(":")[2]) for p in str(text).split(",") if p]
        rows = rows[(rows["status"] == "completed") & rows["converged"].fillna(False).astype(bool)]
        if len(objectives) < 2 or rows.empty:
            continue
        mask = pareto_mask(rows[[m for m, _ in objectives]].to_numpy(dtype=float), [d for _, d in objectives])
        fronts.append((str(study), objectives, rows.assign(on_front=mask)))
    return fronts


def varying_params(rows: pd.DataFrame) -> list[str]:
    """The cfg_* columns whose values differ between ``rows``: what a search sampled."""
    return [c for c in rows.columns if c.startswith("cfg_") and rows[c].astype(str).nunique() > 1]
