"""The sweep service end to end on the tiny model: Ray Tune, Parquet rows, report, re-runs, failures."""

import json

import pandas as pd
import pytest

from hsae.convergence import MAX_LOG_GAP, TOLERANCE, convergence_verdict, val_mse_rel_change
from hsae.results import CURVE_COLUMNS, TRIAL_COLUMNS, ResultsStore
from hsae.scoring import P_SCALE, decode_p
from hsae.spaces import SpaceError, default_spaces_dir, grid_trials, load_space, parse_space
from tests.helpers import small_space
from tune import ablate
from tune import plan as tune_plan
from tune.report import build_report


@pytest.fixture
def sweep(ray_session, tmp_path, monkeypatch):
    monkeypatch.setenv("HSAE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "results"

    def run(*args, hooks=()):
        return ablate.main(["--profile", "tiny", "--out", str(out), *args], trial_hooks=hooks)

    return run, out


def test_sweep_with_asha_writes_documented_parquet_and_report(sweep, capsys):
    run, out = sweep
    assert run("--space", small_space("ortho"), "--scheduler", "asha") == 0
    trials = pd.read_parquet(out / "trials.parquet")
    curves = pd.read_parquet(out / "curves.parquet")
    assert len(trials) == 5
    for name, dtype in TRIAL_COLUMNS:
        assert name in trials.columns, name
        assert str(trials[name].dtype) == dtype or trials[name].isna().all(), (name, trials[name].dtype)
    assert "cfg_alpha" in trials and trials["cfg_alpha"].notna().all() and trials["cfg_lr"].notna().all()
    assert set(trials["status"]) <= {"completed", "early_stopped"}
    assert (trials["harvest_dtype"] == "float32").all()  # "auto" on a CPU
    completed = trials[trials.status == "completed"]
    assert len(completed) >= 1
    assert (completed["steps"] == 40).all() and completed["unlearning_score"].notna().all()
    assert completed["explained_variance"].gt(0).all() and completed["l0"].gt(0).all()
    assert set(CURVE_COLUMNS) <= set(curves.columns)
    assert set(curves["trial_id"]) == set(trials["trial_id"])  # early-stopped trials keep their curves
    assert list((out / "ray_results").rglob("events.out.tfevents*"))  # Tune's TensorBoard output
    # A finished trial's actor runs the next trial (reuse_actors): no new process and imports per trial.
    pids = [json.loads(f.read_text().splitlines()[0])["pid"] for f in (out / "ray_results").rglob("result.json")]
    assert len(set(pids)) < len(pids)  # some process ran two trials
    assert_convergence_recomputable(completed, curves)
    assert (completed["unique_train_tokens"] > 0).all()
    printed = capsys.readouterr().out
    assert "[hsae] wall time" in printed and all(f"  {p}" in printed for p in ("harvest", "train", "evaluate"))
    assert (out / "timings").is_dir()
    report = build_report(out)
    text = report.read_text()
    assert "## Ablation: orthogonality α" in text and "| fixed_ortho |" in text
    # The space's declaration was recorded by the sweep: its section, whatever the tiny run's convergence.
    assert json.loads((out / "spaces" / "ortho.json").read_text())["reference"]["params"] == {"alpha": 0.0}
    assert "## Ablation verdict: ortho" in text
    assert "## Convergence" in text
    for png in ("fig1a_unlearning.png", "fig1b_loss_curves.png", "alpha_vs_correlation.png", "l0_vs_ev.png",
                "mechanisms.png"):
        assert (report.parent / png).stat().st_size > 1000, png


def assert_convergence_recomputable(trials, curves):
    """Every row's convergence verdict follows from its curve in curves.parquet, logged every <= 2.5% of steps."""
    for row in trials.itertuples():
        curve = curves[curves["trial_id"] == row.trial_id].sort_values("step")
        assert curve["step"].diff().dropna().max() <= max(1, MAX_LOG_GAP * row.steps)
        change = val_mse_rel_change(curve["step"].tolist(), curve["val_mse"].tolist(), row.steps)
        assert change == pytest.approx(row.val_mse_rel_change)
        # No target in these sweeps (no controller curve): the window starts after the warm-ups at the latest.
        warm_until = max(row.cfg_l1_warmup_steps, row.cfg_lr_warmup_steps)
        decay_start = row.steps - round(row.cfg_lr_decay_fraction * row.steps)
        verdict = convergence_verdict(curve["step"].tolist(), curve["val_mse"].tolist(), row.steps, warm_until,
                                      decay_start)
        plateau = verdict["plateau_rel_change"]
        assert plateau == pytest.approx(row.plateau_rel_change, nan_ok=True)
        # The rule (docs/training.md): the end check is one-sided (a fall at the end is fine, a rise of TOLERANCE
        # is not), the plateau two-sided; NaN (a missing window) never converges.
        expected = change < TOLERANCE and abs(plateau) < TOLERANCE
        assert bool(row.converged) == verdict["converged"] == expected


def planted_row(mse_per_25_steps_after_800: float):
    """One trial of 1,000 steps logged every 25 (rate decayed over the last 200), flat before step 800, then the
    held-out MSE changing by the given fraction per 25 steps; its row as the trainer writes it."""
    steps = list(range(25, 1001, 25))
    mse = [0.5 * (1 + mse_per_25_steps_after_800) ** max(0, (s - 800) // 25) for s in steps]
    verdict = convergence_verdict(steps, mse, 1000, warm_until=0, decay_start=800)
    row = {"trial_id": "t", "steps": 1000, "cfg_l1_warmup_steps": 0, "cfg_lr_warmup_steps": 0,
           "cfg_lr_decay_fraction": 0.2, "val_mse_rel_change": verdict["val_mse_rel_change"],
           "plateau_rel_change": verdict["plateau_rel_change"],
           "converged": verdict["converged"]}
    return pd.DataFrame([row]), pd.DataFrame({"trial_id": "t", "step": steps, "val_mse": mse})


def test_the_recomputed_verdict_passes_a_run_that_anneals_at_the_end_and_catches_a_wrong_row():
    # 0.4% lower per 25 steps through the decay: the end falls ~3% (the old two-sided end check failed it).
    annealed, curves = planted_row(-0.004)
    assert annealed.loc[0, "val_mse_rel_change"] < -TOLERANCE and annealed.loc[0, "converged"]
    assert_convergence_recomputable(annealed, curves)
    rising, curves = planted_row(+0.004)  # ~3% higher at the end: not converged
    assert rising.loc[0, "val_mse_rel_change"] > TOLERANCE and not rising.loc[0, "converged"]
    assert_convergence_recomputable(rising, curves)
    with pytest.raises(AssertionError):  # a row that claims convergence while rising at the end
        assert_convergence_recomputable(rising.assign(converged=True), curves)


def test_rerun_with_same_experiment_skips_finished_trials(sweep, capsys):
    run, out = sweep
    assert run("--space", small_space("groups")) == 0
    first = pd.read_parquet(out / "trials.parquet").set_index("trial_id")["finished_at"]
    assert run("--space", small_space("groups")) == 0
    assert "already finished" in capsys.readouterr().out
    second = pd.read_parquet(out / "trials.parquet").set_index("trial_id")["finished_at"]
    assert len(second) == 2 and second.sort_index().equals(first.sort_index())


def test_steps_30_plans_and_trains_at_most_the_stated_maximum(sweep, tmp_path, capsys):
    """The issue's smoke test on the tiny profile (with extensions on, as the embedded profile has them): the plan
    states each trial's least and most steps, extensions are a share of the 30 steps, and no trial trains more."""
    import re

    run, out = sweep
    space = tmp_path / "one.yaml"
    space.write_text("trials:\n  - variant: relu\n")
    args = ["--space", str(space), "--steps", "30", "--seeds", "2", "--no-eval",
            "--set", "extension_fraction=0.5", "--set", "max_extensions=2"]
    assert run(*args, "--dry-run") == 0
    plan = capsys.readouterr().out
    found = re.search(r"each trial trains (\d+) to (\d+) steps: one the convergence rule fails trains on (\d+) "
                      r"steps \(1/2 of its 30: extension_fraction\) at a time, at most 2 times "
                      r"\(--set train.max_extensions=0: exactly 30\)", plan)
    assert found, plan
    least, most, extension = map(int, found.groups())
    assert (least, most, extension) == (30, 60, 15)
    assert run(*args) == 0
    assert "[hsae] training: each trial trains 30 to 60 steps" in capsys.readouterr().out
    rows = pd.read_parquet(out / "trials.parquet")
    assert len(rows) == 2 and (rows["status"] == "completed").all()
    assert (rows["cfg_extension_steps"] == extension).all() and (rows["cfg_max_extensions"] == 2).all()
    assert (rows["steps"] == least + rows["extensions"] * extension).all() and (rows["steps"] <= most).all()
    assert rows["extensions"].max() >= 1  # 30 steps do not converge here: the extensions were trained


@pytest.mark.slow  # an end-to-end fault run (≈ 15 s): in the full suite, out of the fast loop
def test_failing_trial_is_recorded_as_failed_and_exit_is_nonzero(sweep, capsys):
    run, out = sweep
    assert run("--space", small_space("groups"), hooks=["tests.faults:raise_in_adaptive_ortho"]) == 1
    trials = pd.read_parquet(out / "trials.parquet")
    assert set(trials["status"]) == {"failed"}
    assert trials["error"].str.contains("injected fault").all()
    assert "2 trial(s) failed" in capsys.readouterr().err
    # The failed trials are not "finished": a later run retries them.
    assert ResultsStore(out).finished_ids("tiny-groups") == set()


@pytest.mark.parametrize("args,message", [
    (["--space", "nope"], "unknown space 'nope'; valid spaces: ["),
    (["--space", "ortho", "--layer", "9"], "layer 9 is out of range for 'tiny': it has 4 layers"),
    (["--space", "ortho", "--model", "/no/such/model"], "cannot be found offline"),
    (["--space", "ortho", "--seeds", "0"], "--seeds must be >= 1"),
    (["--space", "ortho", "--n-ctxs", "2"], "fewer than one batch"),
    (["--space", "ortho", "--profile", "huge"], "unknown profile 'huge'"),
    (["--space", "ortho", "--objectives", "val_mse,nope"], "--objectives: unknown metric 'nope'; valid: ["),
    (["--space", "ortho", "--objectives", "forget_acc_at_retain98", "--no-eval"], "needs the evaluation"),
    (["--space", "ortho", "--search", "optuna", "--optuna-storage", "nope://x"], "is not a database URL"),
])
def test_bad_input_exits_2_before_compute(args, message, tmp_path, capsys):
    rc = ablate.main([*args, "--out", str(tmp_path / "r"), *(["--profile", "tiny"] if "--profile" not in args else [])])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r" / "trials.parquet").exists()


FIXED = "trials:\n  - variant: fixed_ortho\n    params: {alpha: 0.1}\n"


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
@pytest.mark.parametrize("space,message", [
    ("variants", "--search optuna samples one block's ranges, and space 'variants' has 7 blocks (relu, "),
    ("all", "space 'baselines' has 3 blocks (relu, topk, matryoshka_batchtopk)"),
    ("fixed.yaml", "space 'fixed' fixes every parameter of 'fixed_ortho', so there is nothing to sample"),
])
def test_a_space_the_search_cannot_run_exits_2_before_ray(space, message, dry_run, tmp_path, monkeypatch, capsys):
    (tmp_path / "fixed.yaml").write_text(FIXED)
    monkeypatch.setattr(ablate, "connect", lambda *a, **k: pytest.fail("Ray was started"))
    monkeypatch.setattr(tune_plan, "model_config", lambda *a, **k: pytest.fail("the model was read"))
    space = str(tmp_path / space) if space.endswith(".yaml") else space
    args = ["--profile", "tiny", "--space", space, "--search", "optuna", "--out", str(tmp_path / "r")]
    assert ablate.main(args + (["--dry-run"] if dry_run else [])) == 2
    err = capsys.readouterr().err
    assert err.startswith("hsae-ablate: error: ") and message in err and "use --search grid" in err
    assert not (tmp_path / "r").exists()


def test_unwritable_results_directory_exits_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert ablate.main(["--space", "ortho", "--profile", "tiny", "--out", str(blocker / "sub")]) == 2
    assert "is not writable" in capsys.readouterr().err


def test_space_files_parse_and_validate():
    names = sorted(p.stem for p in default_spaces_dir().glob("*.yaml"))
    assert {"variants", "ortho", "groups", "dynamic", "hier", "contrast", "baselines", "frontier"} <= set(names)
    for name in names:  # every shipped space file: one with malformed YAML once went unnoticed
        space = load_space(name)
        assert grid_trials(space, "e", [42]), name
    assert {t.variant for t in grid_trials(load_space("variants"), "e", [42])} == {
        "relu", "fixed_ortho", "adaptive_ortho", "enhanced_adaptive", "static_hier", "dynamic_hier",
        "contrastive_hier"}
    alphas = [t.params["alpha"] for t in grid_trials(load_space("ortho"), "e", [42, 43]) if t.variant == "fixed_ortho"]
    assert sorted(set(alphas)) == [0.0, 0.1, 0.2, 0.3, 0.4] and len(alphas) == 10


@pytest.mark.parametrize("text,message", [
    ("trials: [variant: relu", "malformed YAML"),
    ("trials: []", "non-empty 'trials' list"),
    ("trials:\n  - variant: fixed_ortho\n    params: {alpha: {grid: 0.1}}", "alpha.grid must be a non-empty list"),
    ("trials:\n  - variant: fixed_ortho\n    params: {alpha: {beta: [1, 2]}}", "unknown sampler 'beta'"),
    ("trials:\n  - variant: fixed_ortho\n    params: {alpha: {uniform: [a, b]}}", "must be [low, high] numbers"),
    ("trials:\n  - variant: relu\nschedule: asha", "unknown top-level key(s) ['schedule']"),
    ("trials:\n  - params: {alpha: 1}", "each block needs a 'variant'"),
])
def test_malformed_space_files_are_refused_with_the_field_named(text, message):
    with pytest.raises(SpaceError) as info:
        parse_space("x", text, "x.yaml")
    assert message in str(info.value) and "x.yaml" in str(info.value)


def test_grid_value_of_wrong_type_names_the_trial():
    from hsae.profiles import PROFILES
    from hsae.spaces import validate_trials

    space = parse_space("x", "reference: {variant: fixed_ortho, params: {alpha: 0.1}}\n"
                             "trials:\n  - variant: fixed_ortho\n    params: {alpha: {grid: [0.1, high]}}")
    with pytest.raises(SpaceError, match=r"variant 'fixed_ortho', params \{'alpha': 'high'\}: alpha must be a number"):
        validate_trials(grid_trials(space, "e", [42]), PROFILES["tiny"], 64)


def test_optuna_search_samples_the_space(sweep, tmp_path):
    run, out = sweep
    space = tmp_path / "search.yaml"
    space.write_text("trials:\n  - variant: fixed_ortho\n    params:\n      alpha: {uniform: [0.0, 0.4]}\n"
                     "      n_groups: {choice: [4, 8]}\n")
    assert run("--space", str(space), "--search", "optuna", "--samples", "2") == 0
    trials = pd.read_parquet(out / "trials.parquet")
    assert len(trials) == 2 and trials["trial_id"].is_unique
    assert trials["cfg_alpha"].between(0.0, 0.4).all() and set(trials["cfg_n_groups"]) <= {4, 8}


@pytest.mark.slow  # an end-to-end run of the controls gate (≈ 15 s; test_verdict checks the rule itself)
def test_controls_out_of_range_stop_the_verdict(sweep, monkeypatch, capsys):
    """A positive control that cannot reach its bar: rows carry controls_ok = false, exit code 3."""
    from dataclasses import replace

    from hsae.profiles import PROFILES

    run, out = sweep
    monkeypatch.setitem(PROFILES, "tiny", replace(PROFILES["tiny"], controls_required=True))
    monkeypatch.setattr(ablate, "POSITIVE_MIN", 2.0)  # no control can remove 200% of the answers
    assert run("--space", small_space("groups")) == ablate.EXIT_CONTROLS_FAILED == 3
    err = capsys.readouterr()
    assert "EVALUATION BROKEN" in err.out and "no unlearning number is a result" in err.err
    trials = pd.read_parquet(out / "trials.parquet")
    assert (trials["status"] == "completed").all() and (trials["controls_ok"] == False).all()  # noqa: E712
    report = build_report(out).read_text()
    assert "cannot detect removal" in report.split("##")[0] + report.split("##")[1]


def test_sweep_writes_split_questions_and_grid(sweep):
    run, out = sweep
    assert run("--space", small_space("groups")) in (0, ablate.EXIT_CONTROLS_FAILED)
    split, questions = pd.read_parquet(out / "split.parquet"), pd.read_parquet(out / "questions.parquet")
    grid, trials = pd.read_parquet(out / "grid.parquet"), pd.read_parquet(out / "trials.parquet")
    assert set(split["part"]) == {"train", "heldout"}
    assert set(questions["doc_id"]) <= set(split[split.part == "heldout"]["doc_id"])
    assert set(split.loc[split.part == "heldout", "role"]) == {"select", "test"}  # every held-out document's role
    assert set(split.loc[split.part == "train", "role"]) == {"train"}
    role_of = dict(zip(split["doc_id"], split["role"], strict=True))  # each question has its document's role
    assert (questions["role"] == questions["doc_id"].map(role_of)).all()
    assert set(questions["role"]) == {"select", "test"}
    assert set(grid["control"]) == {"sae", "random", "positive", "baseline"}
    assert set(grid[grid.control.isin(["sae", "random"])]["trial_id"]) == set(trials["trial_id"])
    # One unmodified-model row per trial and one for the positive control: the reference of every probability share.
    baseline = grid[grid.control == "baseline"]
    assert sorted(baseline["trial_id"]) == sorted([*trials["trial_id"], "positive-control"])
    n_forget = int((questions.domain == "forget").sum())
    assert grid["forget_correct"].str.len().eq(n_forget).all()
    # The continuous outcomes: every row (controls and baseline too) carries each question's probability of the
    # correct option, 4 hex digits each, and its means recompute exactly from those integers.
    assert grid["forget_p_correct"].str.len().eq(4 * n_forget).all()
    ints = decode_p(grid["forget_p_correct"])
    assert (grid["forget_p"].to_numpy() == ints.sum(axis=1) / (P_SCALE * n_forget)).all()
    for column in ("forget_acc_at_retain99", "forget_acc_at_retain98", "forget_acc_at_retain95", "frontier_area_p"):
        assert column in trials
    completed = trials[trials.status == "completed"]
    assert completed["frontier_area_p"].notna().all()
