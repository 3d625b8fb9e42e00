"""Continuous outcomes and cross-fitting (docs/evaluation.md, "Continuous outcomes" and "Select and test").

Every grid setting records, per question, the probability of the correct option (quantised to 16 bits, hex in
grid.parquet) beside whether it is still answered; the ``*_p`` metrics are the accuracy metrics' construction on the
share of the unmodified model's mean probability a setting keeps. Every select/test choice is cross-fitted: fold A
chooses on select and scores on test questions, fold B the reverse, and a trial's value is their mean. Pure numpy /
pandas: no model, no Ray.
"""

import math

import numpy as np
import pandas as pd
import pytest

from hsae import schema
from hsae import scoring as SC
from hsae.evaluation.unlearning import Outcome, run_grid
from hsae.results import ResultsStore, evaluation_values, grid_rows, typed_frame

N_FORGET, N_RETAIN = 40, 80
PARTS = ("forget_select", "retain_select", "forget_test", "retain_test")


# -- the stored encoding --------------------------------------------------------------------------------------
def test_probabilities_round_trip_through_their_16_bit_hex_encoding():
    q = SC.quantise_p([0.0, 1.0, 0.5, 1 / 3, -0.1, 1.2])
    assert q.dtype == np.uint16 and q.tolist() == [0, 65535, 32768, 21845, 0, 65535]
    text = SC.encode_p(q)
    assert text[:8] == "0000ffff" and len(text) == 4 * len(q)
    assert SC.decode_p([text, text]).tolist() == [q.tolist()] * 2
    assert SC.mean_p(q[:2]) == 0.5  # sum of the integers / (65535 n): exact
    for bad in ([text, None], [text, text[:-4]], ["00zz"], ["123"]):
        with pytest.raises(ValueError):
            SC.decode_p(bad)


# -- a planted bank and trial -----------------------------------------------------------------------------------
def planted_bank(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bank-order domains (1 forget, 0 retain), select mask (alternating within a domain) and the unmodified model's
    quantised probabilities of the correct option."""
    domains = rng.permutation([1] * N_FORGET + [0] * N_RETAIN)
    is_select = np.zeros(len(domains), dtype=bool)
    for d in (0, 1):
        is_select[np.flatnonzero(domains == d)[::2]] = True
    return domains, is_select, SC.quantise_p(rng.uniform(0.4, 1.0, len(domains)))


def planted_outcome(bank, spec: dict[str, tuple[float, float]], rng: np.random.Generator) -> Outcome:
    """An outcome with, in each part, (accuracy, share of the baseline's probability) as ``spec`` says."""
    domains, is_select, base = bank
    if not spec:  # the intervention changes nothing: the unmodified model's answers and probabilities
        return Outcome(np.ones(len(domains), dtype=bool), touched=0, exact=True, edit_ratio=math.nan, p=base.copy())
    correct, q = np.zeros(len(domains), dtype=bool), np.zeros(len(domains), dtype=np.uint16)
    for part in PARTS:
        name, role = part.split("_")
        where = np.flatnonzero((domains == (name == "forget")) & (is_select == (role == "select")))
        acc, share = spec.get(part, (1.0, 1.0))
        correct[rng.choice(where, size=round(acc * len(where)), replace=False)] = True
        q[where] = SC.quantise_p(base[where] / SC.P_SCALE * share * rng.uniform(0.9, 1.1, len(where)))
    return Outcome(correct, touched=len(domains), exact=True, edit_ratio=0.1, p=q)


def planted_trial(bank, specs: list[dict], rng: np.random.Generator) -> dict:
    """The evaluator's answer (``run_grid``, the same bookkeeping) for settings whose outcomes are planted."""
    domains, is_select, base = bank
    settings = [{"grid": "saebench", "retain_threshold": 0.01, "n_features": 10, "multiplier": 25.0 * (i + 1),
                 "features_selected": 10} for i in range(len(specs))]
    outcomes = {id(s): planted_outcome(bank, spec, rng) for s, spec in zip(settings, specs, strict=True)}
    result = run_grid(settings, lambda s: s, lambda s: outcomes[id(s)], domains, is_select,
                      np.ones(len(domains), dtype=bool), baseline_p=base).as_dict()
    return {"unlearning": result}


# Five settings: untouched; two that trade retain for removal; X, which fold A chooses (select retain kept) but fold B
# can never choose (test retain below every level); Y, the reverse.
SPECS = [dict(zip(PARTS, parts, strict=False)) for parts in (  # () plants the unmodified model
    (),
    ((0.6, 0.7), (0.99, 0.97), (0.7, 0.75), (0.98, 0.96)),
    ((0.3, 0.4), (0.95, 0.92), (0.35, 0.5), (0.95, 0.9)),
    ((0.1, 0.2), (1.0, 1.0), (0.5, 0.5), (0.5, 0.5)),
    ((0.5, 0.5), (0.5, 0.5), (0.1, 0.2), (1.0, 1.0)),
)]
X, Y = 3, 4


def by_hand_area(shares: dict[str, np.ndarray]) -> float:
    """frontier_area_p from per-setting shares, written out: each level's choice by loops, for both folds."""
    folds = []
    for choose, score in (("select", "test"), ("test", "select")):
        removal = []
        for r in np.round(np.linspace(0.9, 1.0, 21), 10):
            ok = [k for k in range(len(shares["forget_select"])) if shares[f"retain_{choose}"][k] >= r - 1e-9]
            if not ok:
                removal.append(0.0)
                continue
            best = min(ok, key=lambda k: (shares[f"forget_{choose}"][k], -shares[f"retain_{choose}"][k], k))
            removal.append(1.0 - shares[f"forget_{score}"][best])
        folds.append(sum(removal) / len(removal))
    return folds[0]  # the reported fold of a grid without fold B's own rows: A (hsae.scoring.reported_folds)


def planted_shares(bank, out: dict) -> dict[str, np.ndarray]:
    """Each setting's kept share of the baseline's probability per part, from the planted integers."""
    domains, is_select, base = bank
    q = {part: [] for part in PARTS}
    for g in out["unlearning"]["grid"]:
        for name, d in (("forget", 1), ("retain", 0)):
            ints = SC.decode_p([g[f"{name}_p_correct"]])[0]
            sel = is_select[domains == d]
            b = base[domains == d].astype(np.int64)
            for role, m in (("select", sel), ("test", ~sel)):
                n = SC.P_SCALE * m.sum()
                q[f"{name}_{role}"].append(ints[m].sum() / n / (b[m].sum() / n))
    return {k: np.array(v) for k, v in q.items()}


def write_results(root, bank, out: dict, trial_id: str = "t") -> pd.DataFrame:
    """grid.parquet and questions.parquet as a sweep writes them, read back."""
    domains, is_select, _ = bank
    store = ResultsStore(root)
    store.write_trial({"experiment": "e", "trial_id": trial_id, "status": "completed", **evaluation_values(out, 1.0)},
                      grid=grid_rows(trial_id, out))
    questions = [{"bank": "b", "question_id": i, "domain": "forget" if d else "retain",
                  "role": "select" if s else "test", "doc_id": str(i)}
                 for i, (d, s) in enumerate(zip(domains, is_select, strict=True))]
    store.write_records("questions", "b", questions)
    store.consolidate()
    return pd.read_parquet(root / "trials.parquet")


def test_planted_probabilities_recompute_the_continuous_metric_exactly_from_grid_parquet(tmp_path):
    rng = np.random.default_rng(0)
    bank = planted_bank(rng)
    out = planted_trial(bank, SPECS, rng)
    row = write_results(tmp_path, bank, out).iloc[0]
    grid, questions = pd.read_parquet(tmp_path / "grid.parquet"), pd.read_parquet(tmp_path / "questions.parquet")
    assert set(grid["control"]) == {"sae", "baseline"} and grid["forget_p_correct"].str.len().eq(4 * N_FORGET).all()
    boot, excluded, _ = SC.scored(pd.DataFrame({"trial_id": ["t"]}), grid, questions, n_boot=50)
    assert excluded == {} and boot.select_test
    for metric in ("frontier_area_p", *SC.P_BARS, "frontier_area"):
        assert boot.point.loc["t", metric] == row[metric]  # bit for bit: the row and the recomputation agree
    # ... and both are the construction written out by hand on the planted integers.
    assert row["frontier_area_p"] == pytest.approx(by_hand_area(planted_shares(bank, out)), abs=1e-12)
    # Each setting's mean probabilities recompute exactly from its stored integers.
    sae = grid[grid["control"] == "sae"]
    ints = SC.decode_p(sae["forget_p_correct"])
    assert (sae["forget_p"].to_numpy() == ints.sum(axis=1) / (SC.P_SCALE * N_FORGET)).all()
    # A setting that keeps every answer and probability has the baseline's means: shares of exactly 1.
    base = grid[grid["control"] == "baseline"].iloc[0]
    assert all(sae[c].iloc[0] == base[c] for c in ("forget_p", "retain_p", *SC.P_SELECT_TEST_COLUMNS))
    assert row["frontier_area_p"] > 0.3  # X and Y remove most of the forget probability at full retain


def test_the_bootstrap_resamples_the_continuous_metric_and_old_grids_score_without_it():
    rng = np.random.default_rng(1)
    bank = planted_bank(rng)
    out = planted_trial(bank, SPECS, rng)
    frame = typed_frame(grid_rows("t", out), schema.GRID_COLUMNS)
    domains, is_select, _ = bank
    roles = SC.Roles(~is_select[domains == 1], ~is_select[domains == 0])
    outcomes, _ = SC.outcomes_by_trial(frame, ["t"])
    boot = SC.bootstrap(outcomes, n_boot=300, seed=0, roles=roles)
    samples = boot.samples["frontier_area_p"][0]
    lo, hi = SC.interval(samples)
    assert np.isfinite(samples).all() and samples.std() > 0 and lo <= boot.point.loc["t", "frontier_area_p"] <= hi
    # The same resamples carry the accuracy metric: the two are resampled together, question by question.
    assert np.isfinite(boot.samples["frontier_area"][0]).all()
    # A grid without probabilities (evaluations before they were recorded) still scores its accuracies.
    old = frame[frame["control"] == "sae"].drop(columns=[c for c in frame if "_p" in c])
    outcomes, excluded = SC.outcomes_by_trial(old, ["t"])
    point = SC.bootstrap(outcomes, n_boot=10, roles=roles).point.loc["t"]
    assert excluded == {} and math.isnan(point["frontier_area_p"]) and point["frontier_area"] == boot.point.loc[
        "t", "frontier_area"]


# -- cross-fitting ----------------------------------------------------------------------------------------------
def scrambled(out: dict, bank, setting: int, part: str, rng: np.random.Generator) -> pd.DataFrame:
    """The trial's grid rows with one setting's forget outcomes and probabilities on ``part`` redrawn at random."""
    domains, is_select, _ = bank
    frame = typed_frame(grid_rows("t", out), schema.GRID_COLUMNS)
    mask = is_select[domains == 1] == (part == "select")
    i = frame.index[frame["control"] == "sae"][setting]
    bits = np.array(list(frame.at[i, "forget_correct"]))
    bits[mask] = rng.choice(["0", "1"], int(mask.sum()))
    q = SC.decode_p([frame.at[i, "forget_p_correct"]])[0]
    q[mask] = rng.integers(0, SC.P_SCALE + 1, int(mask.sum()))
    frame.at[i, "forget_correct"], frame.at[i, "forget_p_correct"] = "".join(bits), SC.encode_p(q)
    return frame


@pytest.mark.parametrize(("setting", "part", "fold"), [(X, "test", "A"), (Y, "select", "B")])
def test_scrambling_one_folds_scoring_outcomes_changes_only_that_folds_score(setting, part, fold):
    """X is what fold A chooses and fold B can never choose (its test retain is below every level): redrawing X's
    test-question forget outcomes changes fold A's value and leaves fold B's bit for bit; Y the other way round."""
    rng = np.random.default_rng(2)
    bank = planted_bank(rng)
    out = planted_trial(bank, SPECS, rng)
    domains, is_select, _ = bank
    roles = SC.Roles(~is_select[domains == 1], ~is_select[domains == 0])
    clean = typed_frame(grid_rows("t", out), schema.GRID_COLUMNS)
    boots = [SC.bootstrap(SC.outcomes_by_trial(g, ["t"])[0], n_boot=2, roles=roles)
             for g in (clean, scrambled(out, bank, setting, part, rng))]
    other = "B" if fold == "A" else "A"
    for metric in ("frontier_area", "frontier_area_p", "forget_acc_at_retain95", "forget_p_at_retain95"):
        before, after = (b.folds[fold].loc["t", metric] for b in boots)
        assert before != after, metric
        assert boots[0].folds[other].loc["t", metric] == boots[1].folds[other].loc["t", metric], metric
        for b in boots:  # the trial's value is fold A's: fold B is kept, never reported
            assert b.point.loc["t", metric] == b.folds["A"].loc["t", metric]


SCORES_ON = {"A": "test", "B": "select"}  # the part each fold's value is read on, as declared


def choices_stay_when_scoring_questions_are_scrambled(outcomes: SC.Outcomes, roles: SC.Roles,
                                                      rng: np.random.Generator) -> bool:
    """The no-peeking check, per fold: redraw every outcome of the questions that fold scores on; the settings its
    choice picks at every retain level (accuracy and probability share) must not move."""
    def picks(o: SC.Outcomes, fold: str) -> list:
        acc, shares = SC.part_values(o, roles, None)
        return [SC.select_setting(*SC.fold_parts(split, fold)[:2], r)[0].tolist()
                for split in (acc, shares) for r in SC.retain_levels()]

    for fold, part in SCORES_ON.items():
        masks = {"forget": roles.forget_test, "retain": roles.retain_test}
        o = SC.Outcomes(outcomes.forget.copy(), outcomes.retain.copy(), outcomes.saebench, outcomes.forget_p.copy(),
                        outcomes.retain_p.copy(), outcomes.baseline_forget_p, outcomes.baseline_retain_p)
        for name, test in masks.items():
            m = test if part == "test" else ~test
            bits, q = getattr(o, name), getattr(o, f"{name}_p")
            bits[:, m] = rng.random((bits.shape[0], int(m.sum()))) < 0.5
            q[:, m] = rng.integers(0, SC.P_SCALE + 1, (q.shape[0], int(m.sum())))
        if picks(o, fold) != picks(outcomes, fold):
            return False
    return True


def test_a_choice_reading_its_own_scoring_questions_fails_the_no_peeking_check(monkeypatch):
    rng = np.random.default_rng(3)
    bank = planted_bank(rng)
    frame = typed_frame(grid_rows("t", planted_trial(bank, SPECS, rng)), schema.GRID_COLUMNS)
    domains, is_select, _ = bank
    roles = SC.Roles(~is_select[domains == 1], ~is_select[domains == 0])
    outcomes = SC.outcomes_by_trial(frame, ["t"])[0]["t"]
    assert choices_stay_when_scoring_questions_are_scrambled(outcomes, roles, rng)
    real = SC.fold_parts

    def peeking(split, fold):  # fold B chooses on the select questions it is scored on
        f_sel, r_sel, _, _ = split
        return (f_sel, r_sel, f_sel, r_sel) if fold == "B" else real(split, fold)

    monkeypatch.setattr(SC, "fold_parts", peeking)
    assert not choices_stay_when_scoring_questions_are_scrambled(outcomes, roles, rng)


# -- cross-fitted grids: fold B's features chosen on test documents, its own grid rows ------------------------
# Fold B's grid: Y replaced by a setting that removes less of what fold B scores (select forget 0.6).
SPECS_B = [*SPECS[:Y], dict(zip(PARTS, ((0.6, 0.6), (0.6, 0.6), (0.2, 0.3), (1.0, 1.0)), strict=True))]
def planted_crossfit(bank, rng: np.random.Generator) -> dict:
    """A cross-fitted evaluation's answer: fold A's grid (SPECS) and fold B's own grid (SPECS_B: other features, so
    other outcomes), every row naming its fold, as ``Evaluator.unlearning`` returns them."""
    fold_a = planted_trial(bank, SPECS, rng)["unlearning"]
    fold_b = planted_trial(bank, SPECS_B, rng)["unlearning"]
    grid = [{**g, "fold": "A"} for g in fold_a["grid"]] + [{**g, "fold": "B"} for g in fold_b["grid"]]
    return {"unlearning": {**fold_a, "grid": grid}}


def fold_value(bank, out: dict, fold: str, metric: str) -> float:
    """One fold's value from that fold's own rows alone, as the rule defines it."""
    domains, is_select, _ = bank
    rows = pd.DataFrame([g for g in out["unlearning"]["grid"] if g["fold"] == fold])
    split = tuple(rows[c].to_numpy(float) for c in SC.SELECT_TEST_COLUMNS)
    return SC.choice_metrics(SC.fold_parts(split, fold), "acc")[metric]


def test_a_cross_fitted_trial_reports_the_mean_of_each_folds_own_grid(tmp_path):
    rng = np.random.default_rng(4)
    bank = planted_bank(rng)
    out = planted_crossfit(bank, rng)
    row = write_results(tmp_path, bank, out).iloc[0]
    grid, questions = pd.read_parquet(tmp_path / "grid.parquet"), pd.read_parquet(tmp_path / "questions.parquet")
    assert sorted(grid.loc[grid["control"] == "sae", "fold"].unique()) == ["A", "B"]
    boot, excluded, _ = SC.scored(pd.DataFrame({"trial_id": ["t"]}), grid, questions, n_boot=20)
    assert excluded == {} and boot.reported == ("A", "B")
    for metric in ("frontier_area", "forget_acc_at_retain95"):
        a, b = fold_value(bank, out, "A", metric), fold_value(bank, out, "B", metric)
        assert a != b  # two grids, two values: the mean below is not one of them twice
        assert boot.folds["A"].loc["t", metric] == a and boot.folds["B"].loc["t", metric] == b
        assert boot.point.loc["t", metric] == row[metric] == pytest.approx((a + b) / 2)
    for metric in ("frontier_area_p", "frontier_area"):  # the resamples average both folds too
        assert np.isfinite(boot.samples[metric]).all()


@pytest.mark.parametrize("fold", ["A", "B"])
def test_scrambling_one_folds_own_grid_changes_only_that_folds_value(fold):
    """Redraw, in one fold's own grid rows only, the outcomes on the questions that fold scores on: that fold's value
    moves, the other fold's stays bit for bit, and the trial's value stays their mean."""
    rng = np.random.default_rng(5)
    bank = planted_bank(rng)
    out = planted_crossfit(bank, rng)
    domains, is_select, _ = bank
    roles = SC.Roles(~is_select[domains == 1], ~is_select[domains == 0])
    clean = typed_frame(grid_rows("t", out), schema.GRID_COLUMNS)
    dirty = clean.copy()
    part_mask = is_select[domains == 1] == (SCORES_ON[fold] == "select")
    for i in dirty.index[(dirty["control"] == "sae") & (dirty["fold"] == fold)]:
        bits = np.array(list(dirty.at[i, "forget_correct"]))
        bits[part_mask] = rng.choice(["0", "1"], int(part_mask.sum()))
        dirty.at[i, "forget_correct"] = "".join(bits)
    boots = [SC.bootstrap(SC.outcomes_by_trial(g, ["t"])[0], n_boot=2, roles=roles) for g in (clean, dirty)]
    other = "B" if fold == "A" else "A"
    assert boots[0].folds[fold].loc["t", "frontier_area"] != boots[1].folds[fold].loc["t", "frontier_area"]
    assert boots[0].folds[other].loc["t", "frontier_area"] == boots[1].folds[other].loc["t", "frontier_area"]
    for b in boots:
        assert b.point.loc["t", "frontier_area"] == pytest.approx(
            (b.folds["A"].loc["t", "frontier_area"] + b.folds["B"].loc["t", "frontier_area"]) / 2)


def test_a_comparison_mixing_cross_fitted_and_older_grids_reports_fold_a_for_every_trial():
    rng = np.random.default_rng(6)
    bank = planted_bank(rng)
    domains, is_select, _ = bank
    roles = SC.Roles(~is_select[domains == 1], ~is_select[domains == 0])
    new = typed_frame(grid_rows("new", planted_crossfit(bank, rng)), schema.GRID_COLUMNS)
    old = typed_frame(grid_rows("old", planted_trial(bank, SPECS, rng)), schema.GRID_COLUMNS)
    outcomes, _ = SC.outcomes_by_trial(pd.concat([new, old]), ["new", "old"])
    assert outcomes["new"].crossfit is not None and outcomes["old"].crossfit is None
    boot = SC.bootstrap(outcomes, n_boot=2, roles=roles)
    assert boot.reported == ("A",)  # one rule for every trial of a comparison: the one every grid supports
    for tid in ("new", "old"):
        assert boot.point.loc[tid, "frontier_area"] == boot.folds["A"].loc[tid, "frontier_area"]
    alone = SC.bootstrap({"new": outcomes["new"]}, n_boot=2, roles=roles)
    assert alone.reported == ("A", "B") and alone.point.loc["new", "frontier_area"] != boot.point.loc[
        "new", "frontier_area"]
