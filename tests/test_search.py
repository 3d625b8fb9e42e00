"""What the Optuna study is told, and what the sweep prints per trial, without a Ray cluster."""

import math
from types import SimpleNamespace

import optuna
import pytest

from tune.progress import SweepProgress, row_numbers
from tune.search import CRASHED_ATTR, finished_in_study, open_study, parse_objectives, study_searcher, told_state

OBJECTIVES = [("val_mse", "min"), ("forget_acc_at_retain98", "min")]
DONE = {"final": 1, "val_mse": 0.2, "forget_acc_at_retain98": 0.7}


@pytest.mark.parametrize("result,error,state", [
    (DONE, False, "COMPLETE"),
    ({"val_mse": 0.2, "forget_acc_at_retain98": 0.7, "step": 500}, False, "PRUNED"),  # stopped early: no final
    ({**DONE, "forget_acc_at_retain98": math.nan}, False, "PRUNED"),  # no setting met the retain bar
    ({"final": 1, "val_mse": math.nan, "degenerate": 1}, False, "FAIL"),
    (None, True, "FAIL"),
])
def test_optuna_is_told_values_only_from_the_final_report(result, error, state):
    told, values = told_state(result, error, [m for m, _ in OBJECTIVES])
    assert told.name == state
    assert values == ([0.2, 0.7] if state == "COMPLETE" else None)


def test_the_searcher_tells_the_study_and_survives_a_second_report(tmp_path):
    from ray import tune

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    storage, study = open_study(url, "s", OBJECTIVES)
    searcher = study_searcher(storage, "s", OBJECTIVES, seen=0)
    searcher.set_search_properties(None, None, {"alpha": tune.uniform(0.0, 0.4)})
    assert searcher.metric is None  # Tune must not demand the objectives at every step
    for tid, result in (("a", DONE), ("b", {"val_mse": 0.3, "step": 10}), ("c", None)):
        assert 0.0 <= searcher.suggest(tid)["alpha"] <= 0.4
        searcher.on_trial_complete(tid, result, error=result is None)
    searcher.on_trial_complete("a", None, error=True)  # reported again (a resumed driver): ignored
    searcher.on_trial_complete("b", DONE)  # a pruned trial reported again stays pruned
    states = [t.state.name for t in optuna.load_study(study_name="s", storage=url).trials]
    assert states == ["COMPLETE", "PRUNED", "FAIL"]
    searcher.on_trial_complete("c", DONE)  # the failed trial, run again by --resume to the end: a new trial
    trials = optuna.load_study(study_name="s", storage=url).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED", "FAIL", "COMPLETE"]
    assert trials[3].params == trials[2].params and trials[3].values == [0.2, 0.7]
    # A crash leaves a trial running: the next run fails it, and it does not count against --samples.
    searcher.suggest("d")
    _, study = open_study(url, "s", OBJECTIVES)
    assert study.trials[-1].state.name == "FAIL" and study.trials[-1].user_attrs[CRASHED_ATTR]
    assert finished_in_study(study) == 4


def test_objectives_need_the_evaluation():
    assert parse_objectives("val_mse,unlearning_score", evaluate=True) == [("val_mse", "min"),
                                                                          ("unlearning_score", "max")]
    with pytest.raises(ValueError, match="evaluation, which is off"):
        parse_objectives("forget_acc_at_retain98", evaluate=False)


def test_the_declared_headline_and_the_probe_are_objectives_to_maximise():
    assert parse_objectives("frontier_area,sparse_probe_mean_k1", evaluate=True) == [
        ("frontier_area", "max"), ("sparse_probe_mean_k1", "max")]
    with pytest.raises(ValueError, match="evaluation, which is off"):
        parse_objectives("frontier_area", evaluate=False)


# Four grid settings whose select and test questions disagree (select chooses setting 1 where test would choose
# setting 2; only select questions put setting 0 at retain 1): an area chosen or read on the wrong questions, or
# on all of them, differs from the verdict's, chosen on select and read on test.
PLANTED = {"forget_acc_select": [0.9, 0.5, 0.6, 0.3], "retain_acc_select": [1.0, 0.97, 0.95, 0.92],
           "forget_acc_test": [0.85, 0.55, 0.2, 0.4], "retain_acc_test": [0.99, 0.96, 0.94, 0.91],
           "forget_acc": [0.875, 0.525, 0.4, 0.35], "retain_acc": [0.995, 0.965, 0.945, 0.915]}


def test_a_rows_frontier_area_is_the_verdicts_and_reaches_the_study():
    import pandas as pd

    from hsae.results import evaluation_values
    from hsae.scoring import SELECT_TEST_COLUMNS, area, area_select_test, grid_metrics
    from tune.trainable import final_values

    grid = [{**{k: v[i] for k, v in PLANTED.items()}, "grid": "saebench", "features_selected": 3} for i in range(4)]
    out = {"unlearning": {"score": 0.1, "tied_settings": 0, "n_forget": 20, "n_retain": 40, "grid": grid},
           "sparse_probe": {"columns": {"sparse_probe_mean_k1": 0.75}}}
    row = evaluation_values(out, 1.0)
    f_sel, r_sel, f_test, r_test = (PLANTED[k] for k in SELECT_TEST_COLUMNS)
    fold_a, fold_b = area_select_test(f_sel, r_sel, f_test), area_select_test(f_test, r_test, f_sel)
    assert fold_a != pytest.approx(fold_b)  # the planted folds differ: the row must hold the reported one
    expect = fold_a  # fold A: chosen on select and read on test
    assert row["frontier_area"] == pytest.approx(expect)
    assert row["frontier_area"] == pytest.approx(grid_metrics(pd.DataFrame(grid))["frontier_area"])
    others = (fold_b, (fold_a + fold_b) / 2, area(PLANTED["forget_acc"], PLANTED["retain_acc"]), area(f_test, r_test),
              area(f_sel, r_sel), area_select_test(f_test, r_sel, f_test))
    assert all(abs(o - expect) > 0.02 for o in others)  # the planted grid tells the rules apart
    # The trial's final report (what the searcher reads) carries both, and Optuna is told them.
    report = final_values({"status": "completed", **row}, steps=40)
    assert report["frontier_area"] == pytest.approx(expect) and report["sparse_probe_mean_k1"] == 0.75
    state, values = told_state(report, False, ["frontier_area", "sparse_probe_mean_k1"])
    assert state.name == "COMPLETE" and values == pytest.approx([expect, 0.75])


def fake_trial(tid, variant="relu", seed=42, params=None):
    trial = {"experiment": "e", "space": "s", "variant": variant, "params": params or {}, "seed": seed,
             "context": "c" * 16}
    return SimpleNamespace(trial_id=tid, config={"trial": trial})


def test_sweep_progress_prints_one_line_per_trial_and_an_eta(tmp_path, capsys, monkeypatch):
    clock = iter(range(0, 10_000, 100))
    monkeypatch.setattr("tune.progress.time.monotonic", lambda: next(clock))
    progress = SweepProgress(str(tmp_path), total=3, steps=100, every_s=150)
    a, b = fake_trial("a"), fake_trial("b", "topk", 43, {"k": 8})
    for t in (a, b):
        progress.on_trial_start(0, [a, b], t)
    progress.on_trial_result(0, [a, b], a, {"step": 100})
    progress.on_trial_result(0, [a, b], b, {"step": 40})
    progress.on_step_end(0, [a, b])
    progress.on_trial_complete(0, [a, b], a)  # no row: a scheduler stopped it
    progress.on_trial_error(0, [a, b], b)
    lines = capsys.readouterr().out.splitlines()
    # The first logged interval gives the sweep's ETA at once, before any trial has finished.
    assert lines[0].startswith("[hsae] first steps measured: ") and "2 at once; 3 to go, sweep ETA ~" in lines[0]
    assert "for training alone" in lines[0]
    assert lines[1].startswith("[hsae] 0/3 trials done, 2 running: relu seed 42 evaluating; topk seed 43 (k=8) "
                               "step 40/100")
    assert "sweep ETA ~" in lines[1]  # the status line carries the early ETA until a trial finishes
    assert lines[2].startswith("[hsae] trial 1/3 done in ") and "stopped early at step 100" in lines[2]
    assert "2 to go, ETA ~" in lines[2]
    assert "topk seed 43 (k=8): FAILED" in lines[3] and "1 to go" in lines[3]


def test_a_trial_finished_before_is_counted_done_but_never_times_the_eta(tmp_path, capsys, monkeypatch):
    clock = iter(range(0, 10_000, 100))
    monkeypatch.setattr("tune.progress.time.monotonic", lambda: next(clock))
    progress = SweepProgress(str(tmp_path), total=3, steps=100)
    old, new = fake_trial("old"), fake_trial("new", seed=43)
    new.config["trial"]["arm"] = "relu_aa1"
    for t in (old, new):
        progress.on_trial_start(0, [old, new], t)
    progress.on_trial_result(0, [old, new], old, {"step": 101, "skipped": 1, "final": 1})
    progress.on_trial_complete(0, [old, new], old)
    progress.on_trial_result(0, [old, new], new, {"step": 50})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[hsae] trial 1/3 already finished: relu seed 42") and progress.durations == []
    assert "2 to go, sweep ETA ~" in lines[-1]  # from the step rate, not from a 0-s "trial time"
    assert progress.status_line([old, new]).startswith("[hsae] 1/3 trials done, 1 running: relu arm relu_aa1 seed 43")


def test_trials_a_resume_restored_as_finished_are_counted_done_once(tmp_path, capsys):
    """Tune does not run a trial it restored as TERMINATED again, so no callback reports it: the status line and
    the ETA must still count it (a resumed sweep said "0/18 done, 18 to go" with 6 finished)."""
    progress = SweepProgress(str(tmp_path), total=4, steps=100, every_s=0)
    done_a, done_b, running = fake_trial("a"), fake_trial("b", seed=43), fake_trial("c", seed=44)
    done_a.status = done_b.status = "TERMINATED"
    running.status = "RUNNING"
    trials = [done_a, done_b, running]
    progress.on_trial_start(0, trials, running)
    progress.on_trial_result(0, trials, running, {"step": 10})
    progress.on_step_end(0, trials)
    late = fake_trial("d", seed=45)
    late.status = "TERMINATED"  # a trial seen finished after the first step is on_trial_complete's to count
    progress.on_step_end(0, [*trials, late])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("[hsae] 2 trial(s) finished before the resume; 2/4 done; 2 to go")
    assert lines[2].startswith("[hsae] 2/4 trials done, 1 running") and "2 to go" in lines[2]
    assert not any("finished before" in line for line in lines[3:])
    running.status = "TERMINATED"
    progress.on_trial_complete(0, trials, running)  # reported by Tune: counted by the callback, not again
    progress.on_step_end(0, trials)
    assert progress.done == 3


def test_the_status_line_names_a_trial_past_its_budget_as_extended(tmp_path):
    trials = [fake_trial("a"), fake_trial("b", seed=43), fake_trial("c", seed=44)]
    for extensions, at_budget in ((2, "evaluating or extending"), (0, "evaluating")):
        progress = SweepProgress(str(tmp_path), total=3, steps=100, extension_steps=50, max_extensions=extensions)
        for t, step in zip(trials, (40, 100, 150), strict=True):
            progress.on_trial_start(0, trials, t)
            progress.on_trial_result(0, trials, t, {"step": step})
        line = progress.status_line(trials)
        assert f"relu seed 42 step 40/100; relu seed 43 {at_budget}; relu seed 44 step 150" in line
    progress = SweepProgress(str(tmp_path), total=3, steps=100, extension_steps=50, max_extensions=2)
    for t, step in zip(trials, (40, 151, 200), strict=True):
        progress.on_trial_start(0, trials, t)
        progress.on_trial_result(0, trials, t, {"step": step})
    assert progress.status_line(trials).startswith(
        "[hsae] 0/3 trials done, 3 running: relu seed 42 step 40/100; relu seed 43 step 151/200 (extension 2 of at "
        "most 2: up to 200 steps); relu seed 44 step 200/200 (extension 2 of at most 2: up to 200 steps)")


def test_the_eta_counts_the_steps_left_in_an_extension_and_what_extensions_may_add(tmp_path, capsys, monkeypatch):
    # Planted timings: budget 100 steps, extensions of 50 (at most 2: up to 200), 3 trials, 2 at once.
    now = [0.0]
    monkeypatch.setattr("tune.progress.time.monotonic", lambda: now[0])
    progress = SweepProgress(str(tmp_path), total=3, steps=100, every_s=1e9, extension_steps=50, max_extensions=2)
    a, b = fake_trial("a"), fake_trial("b", seed=43)
    for t in (a, b):
        progress.on_trial_start(0, [a, b], t)
    now[0] = 100.0
    progress.on_trial_result(0, [a, b], a, {"step": 125})  # in its first extension: 25 steps to 150
    progress.on_trial_result(0, [a, b], b, {"step": 75})  # 25 to its budget; 1.25 and 0.75 steps/s: 1 on average
    capsys.readouterr()
    # 25 + 25 + 100 (the third trial's budget) = 150 steps at 2 steps/s = 75 s; every trial to 200 steps would
    # leave 75 + 125 + 200 = 400: 250 more, 125 s.
    assert progress.eta() == ("; 3 to go, sweep ETA ~1 min 15 s for training alone; extensions may add up to "
                              "~2 min 5 s more (250 steps: every trial up to 200) (evaluation adds to it; refined "
                              "when the first trial finishes)")
    assert "relu seed 42 step 125/150 (extension 1 of at most 2: up to 200 steps)" in progress.status_line([a, b])
    now[0] = 150.0
    progress.on_trial_complete(0, [a, b], b)  # 150 s a trial; a's 25 extension steps at 1.25 steps/s add 20 s
    line = capsys.readouterr().out
    # (2 trials x 150 s + 20 s) / 2 at once = 160 s; a to 200 and the third trial to 200: 150 steps more, 60 s
    assert line.rstrip().endswith("; 2 to go, ETA ~2 min 40 s; extensions may add up to ~1 min 0 s more (150 "
                                  "steps: every trial up to 200)")


def test_the_early_eta_is_the_training_steps_left_at_the_measured_rate(tmp_path, capsys, monkeypatch):
    now = [0.0]
    monkeypatch.setattr("tune.progress.time.monotonic", lambda: now[0])
    progress = SweepProgress(str(tmp_path), total=4, steps=100, every_s=1e9)
    a, b = fake_trial("a"), fake_trial("b", "topk", 43, {"k": 8})
    for t in (a, b):
        progress.on_trial_start(0, [a, b], t)
    now[0] = 10.0
    progress.on_trial_result(0, [a, b], a, {"step": 10})  # 1 step/s per trial, 2 at once
    line = capsys.readouterr().out
    # 4 trials x 100 steps, 10 done: 390 steps at 2 steps/s = 195 s
    assert "1.00 steps/s per trial" in line and "sweep ETA ~3 min 15 s for training alone" in line
    progress.on_trial_result(0, [a, b], b, {"step": 10})
    assert capsys.readouterr().out == ""  # said once; later lines refine it


def test_row_numbers_read_nullable_and_degenerate_rows():
    import pandas as pd

    assert row_numbers({"status": "degenerate", "error": "L0 = 0", "converged": pd.NA}) == "degenerate: L0 = 0"
    text = row_numbers({"status": "completed", "explained_variance": 0.91, "l0": 40.0, "val_mse": 0.1,
                        "converged": pd.NA, "forget_acc_at_retain98": None, "unlearning_score": float("nan")})
    assert text == "EV 0.910, L0 40.0, val_mse 0.1, NOT converged"
    external = row_numbers({"status": "completed", "variant": "external:mine", "explained_variance": 0.91, "l0": 40.0,
                            "val_mse": None, "converged": pd.NA})
    assert external == "EV 0.910, L0 40.0, val_mse None, not trained here"  # an external arm trains nothing
