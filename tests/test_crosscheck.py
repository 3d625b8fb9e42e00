"""The report's cross-checks, each seen firing (not only seen absent): a trial row whose metric disagrees with
the recomputation from grid.parquet is flagged "Mismatch"; so are retain accuracies that are only upper bounds,
a questions.parquet whose counts differ from the grid's outcomes, and completed trials left out of the verdict.

The rows a sweep writes are checked on the product's own path too: planted per-question outcomes go through the
evaluator's grid bookkeeping (``run_grid``), ``evaluation_values``, ``grid_rows`` and ``questions_table`` (settings
chosen on select questions, reported on test ones); the verdict with those roles finds no mismatch, and one with
the roles swapped or dropped, or a row's value changed, finds one."""

import json
import re

import numpy as np
import pandas as pd
import pytest

from hsae import scoring as SC
from hsae import verdict as V
from hsae.results import TRIAL_COLUMNS, trial_frame

# The verdict's metrics a trial row carries: what the cross-check compares.
ROW_METRICS = [m for m in SC.CANDIDATES if m in {name for name, _ in TRIAL_COLUMNS}]

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


# -- the product's own row path: the evaluator's grid, evaluation_values, grid_rows and questions_table -------
# Each setting's planted accuracy on (forget select, retain select, forget test, retain test) questions. Chosen on
# select questions and reported on test ones (fold A), each retain bar picks another setting than the same rule on
# test questions (fold B) or on all questions (no roles) does.
SPLIT_POINTS = [(0.9, 1.00, 0.5, 0.97), (0.6, 0.99, 0.8, 1.00), (0.3, 0.97, 0.7, 0.99), (0.1, 0.94, 0.2, 0.96)]
SPLIT_SHIFT = {"relu": 0.0, "fixed_ortho": -0.1}  # fixed_ortho answers fewer forget questions everywhere
BANK_KEY = "bank-planted"


def planted_bank(rng: np.random.Generator):
    """N_FORGET forget and N_RETAIN retain questions in a shuffled bank order, half of each domain select."""
    from hsae.corpora import FORGET, RETAIN
    from hsae.evaluation.questions import QuestionBank

    domains = rng.permutation([FORGET] * N_FORGET + [RETAIN] * N_RETAIN).tolist()
    seen = {FORGET: 0, RETAIN: 0}
    roles = []
    for d in domains:
        roles.append("select" if seen[d] % 2 == 0 else "test")
        seen[d] += 1
    n = len(domains)
    return QuestionBank([[1]] * n, [[[1], [2]]] * n, [0] * n, domains,
                        [{"doc_id": f"doc:{i}", "prompt": f"q{i}", "options": ["a", "b"]} for i in range(n)],
                        key=BANK_KEY, role=roles)


def planted_correct(bank, accs: tuple[float, float, float, float], rng: np.random.Generator) -> np.ndarray:
    """(questions,) bank-order outcomes with exactly these forget/retain accuracies on select and test questions."""
    from hsae.corpora import FORGET, RETAIN

    correct = np.zeros(len(bank), dtype=bool)
    parts = [(FORGET, "select"), (RETAIN, "select"), (FORGET, "test"), (RETAIN, "test")]
    for (domain, role), acc in zip(parts, accs, strict=True):
        where = [i for i in range(len(bank)) if bank.domain[i] == domain and bank.role[i] == role]
        correct[rng.choice(where, size=round(acc * len(where)), replace=False)] = True
    return correct


def planted_p(correct: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Quantised probabilities of the correct option that agree with the outcomes: above 1/2 where correct."""
    return SC.quantise_p(np.where(correct, rng.uniform(0.5, 1.0, len(correct)), rng.uniform(0.0, 0.5, len(correct))))


def baseline_p(bank) -> np.ndarray:
    """The unmodified model's planted probabilities (one evaluator, one bank: the same for every grid)."""
    return planted_p(np.ones(len(bank), dtype=bool), np.random.default_rng(11))


def evaluator_grid(bank, settings: list[dict], accs: list[tuple], rng: np.random.Generator) -> dict:
    """``run_grid``'s answer (the evaluator's own bookkeeping) for settings whose outcomes (and probabilities of the
    correct option) are planted."""
    from hsae.evaluation.unlearning import Outcome, run_grid

    correct = [planted_correct(bank, a, rng) for a in accs]
    outcomes = [Outcome(c, touched=len(bank), exact=True, edit_ratio=0.1, p=planted_p(c, rng)) for c in correct]
    by_setting = {id(s): o for s, o in zip(settings, outcomes, strict=True)}
    result = run_grid(settings, lambda s: s, lambda s: by_setting[id(s)], np.asarray(bank.domain),
                      bank.is_select(), np.ones(len(bank), dtype=bool), baseline_p=baseline_p(bank)).as_dict()
    for g in [*result["grid"], result["baseline"]]:
        g["bank"] = bank.key  # as the evaluator tags its grid rows
    return result


def planted_answer(bank, variant: str, seed: int, rng: np.random.Generator) -> dict:
    """An ``evaluate`` answer as the activation server gives it: the SAE's grid (SAEBench settings and an extended
    one that selects nothing) with per-question outcomes, and the random-feature control's grid."""
    shift = SPLIT_SHIFT[variant] + (0.05 if seed == SEEDS[1] else 0.0)
    accs = [(f_sel + shift, r_sel, f_test + shift, r_test) for f_sel, r_sel, f_test, r_test in SPLIT_POINTS]
    accs.append((1.0, 1.0, 1.0, 1.0))
    settings = [{"grid": "saebench", "retain_threshold": 0.01, "n_features": 10, "multiplier": 25.0 * (i + 1),
                 "features_selected": 10} for i in range(len(SPLIT_POINTS))]
    settings.append({"grid": "extended", "retain_threshold": 0.001, "n_features": 1, "multiplier": 10.0,
                     "features_selected": 0})
    unlearning = evaluator_grid(bank, settings, accs, rng)
    control = evaluator_grid(bank, [dict(s) for s in settings], [(1.0, 1.0, 1.0, 1.0)] * len(settings), rng)
    unlearning["random_feature_score"], unlearning["random_feature_grid"] = control["score"], control["grid"]
    return {"unlearning": unlearning, "ce": {"ce_score_forget": 0.5, "ce_score_retain": 0.9}}


def row_path_trial(variant: str, seed: int, out: dict) -> dict:
    """A completed, converged trial's row carrying ``evaluation_values`` of the evaluator's answer."""
    from hsae.results import evaluation_values

    return {"experiment": "embedded-variants", "space": "variants", "variant": variant, "trial_id": f"{variant}-{seed}",
            "seed": seed, "status": "completed", "profile": "embedded", "model": "embedded", "layer": 13,
            "mse": 0.1, "explained_variance": 0.8, "l0": 20.0, "converged": True, "val_mse_rel_change": 0.0,
            "controls_ok": True, **evaluation_values(out, 1.0)}


@pytest.fixture(scope="module")
def row_path():
    """Trial rows, grid rows and questions as a sweep writes them, from planted evaluator answers."""
    from hsae import schema
    from hsae.evaluation.questions import questions_table
    from hsae.results import grid_rows, typed_frame

    rng = np.random.default_rng(1)
    bank = planted_bank(rng)
    answers = {(v, s): planted_answer(bank, v, s, rng) for v in SPLIT_SHIFT for s in SEEDS}
    rows = [row_path_trial(v, s, out) for (v, s), out in answers.items()]
    grid = [g for (v, s), out in answers.items() for g in grid_rows(f"{v}-{s}", out)]
    return {"bank": bank, "answers": answers, "rows": rows, "grid": grid,
            "trials": pd.concat([trial_frame(r) for r in rows], ignore_index=True),
            "grid_frame": typed_frame(grid, schema.GRID_COLUMNS),
            "questions": typed_frame(questions_table(bank), schema.QUESTION_COLUMNS)}


def test_the_rows_the_evaluator_path_writes_agree_with_the_verdicts_recomputation(row_path):
    trials, grid, questions = row_path["trials"], row_path["grid_frame"], row_path["questions"]
    assert {"frontier_area", "frontier_area_p", "forget_acc_at_retain99", "forget_acc_at_retain95"} <= set(ROW_METRICS)
    # The row holds the *test* accuracy of the setting chosen on *select* questions: at retain >= 0.99 relu-42's
    # select questions choose setting 1 (forget 0.6 at retain 0.99), whose test forget accuracy is 0.8.
    # Fold B (kept, not reported): at retain >= 0.99 test questions choose setting 2 (forget 0.7 at retain 0.99),
    # select forget 0.3. At retain >= 0.95: fold A setting 2 (test forget 0.7), fold B setting 3 (0.1).
    relu = trials.set_index("trial_id").loc["relu-42"]
    assert relu["forget_acc_at_retain99"] == pytest.approx(0.8)
    assert relu["forget_acc_at_retain95"] == pytest.approx(0.7)
    v = V.build_verdict(trials, grid, questions=questions, n_boot=20)
    assert v.boot.select_test and v.excluded == {} and v.bank == BANK_KEY
    assert v.mismatches == []
    folds = {f: v.boot.folds[f].loc["relu-42"] for f in SC.FOLDS}
    assert (folds["A"]["forget_acc_at_retain99"], folds["B"]["forget_acc_at_retain99"]) == pytest.approx((0.8, 0.3))
    recomputed = v.per_trial.set_index(v.per_trial["trial_id"].astype(str))[ROW_METRICS].sort_index()
    written = trials.set_index(trials["trial_id"].astype(str))[ROW_METRICS].sort_index().astype(float)
    pd.testing.assert_frame_equal(recomputed, written, check_exact=False, rtol=0, atol=1e-12)
    assert written.notna().all().all()


def redrawn_roles(questions: pd.DataFrame, seed: int = 3) -> pd.DataFrame:
    """The questions with each domain's roles shuffled among its questions: other halves than the evaluation's."""
    rng = np.random.default_rng(seed)
    roles = questions["role"].copy()
    for domain in ("forget", "retain"):
        mine = questions["domain"] == domain
        roles[mine] = rng.permutation(roles[mine].to_numpy())
    return questions.assign(role=roles)


def test_swapping_select_and_test_only_swaps_the_folds(row_path):
    trials, grid, questions = row_path["trials"], row_path["grid_frame"], row_path["questions"]
    swapped = questions.assign(role=questions["role"].map({"select": "test", "test": "select"}))
    v, w = (V.build_verdict(trials, grid, questions=q, n_boot=20) for q in (questions, swapped))
    # The reported fold (A) of the swapped roles is the evaluator's fold B: rows written by the evaluator disagree.
    assert v.mismatches == [] and w.mismatches
    pd.testing.assert_frame_equal(v.boot.folds["A"], w.boot.folds["B"])
    pd.testing.assert_frame_equal(v.boot.folds["B"], w.boot.folds["A"])


@pytest.mark.parametrize("inconsistency", ["roles redrawn", "no roles", "a row's frontier area"])
def test_an_inconsistency_on_the_evaluator_path_is_a_mismatch(row_path, inconsistency):
    trials, grid, questions = row_path["trials"], row_path["grid_frame"], row_path["questions"]
    if inconsistency == "roles redrawn":
        questions = redrawn_roles(questions)
    elif inconsistency == "no roles":
        questions = questions.drop(columns="role")
    else:
        trials = trials.copy()
        trials.loc[trials["trial_id"] == "fixed_ortho-43", "frontier_area"] += 0.01
    found = {m.split(":")[0]: m for m in V.build_verdict(trials, grid, questions=questions, n_boot=20).mismatches}
    if inconsistency == "a row's frontier area":
        assert list(found) == ["frontier_area"] and "1 trial(s)" in found["frontier_area"], found
    else:
        assert {"forget_acc_at_retain99", "forget_acc_at_retain95", "frontier_area"} <= set(found), found
        assert "unlearning_score" not in found  # SAEBench's score is chosen and scored on all questions either way


def row_path_results(root, row_path, questions: pd.DataFrame | None = None):
    """A results directory written by the sweep's own store: rows, grid rows, questions, positive control."""
    from hsae.results import ResultsStore, control_grid_rows

    store = ResultsStore(root)
    for row in row_path["rows"]:
        store.write_trial(row, grid=[g for g in row_path["grid"] if g["trial_id"] == row["trial_id"]])
    records = (row_path["questions"] if questions is None else questions).to_dict("records")
    store.write_records("questions", BANK_KEY, records)
    bank = row_path["bank"]
    positive = evaluator_grid(bank, [{"strength": 1.0, "bank": BANK_KEY}], [(0.4, 1.0, 0.5, 1.0)],
                              np.random.default_rng(2))
    store.write_records("grid", f"positive-control-{BANK_KEY}", control_grid_rows({"positive": positive}))
    (root / "controls").mkdir(parents=True)
    (root / "controls" / "embedded.json").write_text(json.dumps(
        {"positive": {"score": 0.5, "n_forget": N_FORGET, "n_retain": N_RETAIN}, "negative": {"score": 0.0}}))
    store.consolidate()
    return root


def test_a_report_of_results_written_through_the_row_path_holds_no_mismatch(row_path, tmp_path):
    from tune.report import build_report

    text = build_report(row_path_results(tmp_path / "honest", row_path), n_boot=50).read_text()
    assert "## Verdict" in text and "choose each setting on select questions" in text
    assert "Mismatch" not in text
    redrawn = redrawn_roles(row_path["questions"])
    text = build_report(row_path_results(tmp_path / "redrawn", row_path, redrawn), n_boot=50).read_text()
    assert {f.split(":")[0] for f in bold_flags(text, "Mismatch: ")} >= {"forget_acc_at_retain99", "frontier_area"}
