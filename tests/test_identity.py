"""A trial is what it is: the same configuration, seed, model and data is one trial in every space and experiment.

Its id hashes the variant, parameters, seed, arm and sweep context, never the space or experiment names, so a
results directory trains it once and reports it in every space that asks; rows written under the ids of before
(which hashed both names) are adopted under the content id.
"""

import json
from dataclasses import replace

import pandas as pd
import pytest
import yaml

from hsae.activations import harvest_key
from hsae.profiles import get_profile
from hsae.results import ResultsStore, asked_by, one_row_per_trial
from hsae.spaces import TrialSpec, sweep_context
from hsae.verdict import build_verdict
from tests.test_keys import save_tiny
from tune import ablate
from tune import plan as tune_plan
from tune.report import build_report


def spec(**changes):
    return replace(TrialSpec("tiny-variants", "variants", "relu", {"l1_coeff": 0.1}, 43, "ctx0123456789abc"), **changes)


def test_the_trial_id_is_content_only():
    base = spec()
    assert spec(experiment="other", space="baselines").key == base.key
    for other in (spec(variant="topk", params={"k": 8}), spec(params={"l1_coeff": 0.2}), spec(seed=44),
                  spec(arm="A"), spec(context="another-context")):
        assert other.key != base.key
    assert TrialSpec(**base.as_dict()) == base  # Tune's config still carries where the trial is reported


def test_the_legacy_id_is_the_id_of_before():
    """Ids written by the code before content-only ids (computed with it at 78d7e1e): what adoption looks for."""
    assert spec().legacy_key() == "83e3e8502b81b8d4"
    labelled = TrialSpec("e", "s", "topk", {"k": 8}, 42, "c", "A")
    assert labelled.legacy_key() == "28643ea5bfa4687e"
    assert spec(space="tmp").legacy_key("tiny-variants", "variants") == "83e3e8502b81b8d4"
    assert spec().key not in (spec().legacy_key(), spec().legacy_key("x", "y"))


def test_budget_layer_and_model_change_the_context(tmp_path, monkeypatch):
    monkeypatch.setenv("HSAE_CACHE", str(tmp_path / "cache"))
    save_tiny(tmp_path / "m", seed=1)

    def context(**fields):
        profile = get_profile("tiny", **fields)
        return sweep_context(profile, harvest_key(profile.harvest))

    base = context()
    others = [context(steps=30), context(layer=1), context(model=str(tmp_path / "m")), context(d_sae=128)]
    assert len({base, *others}) == 5
    assert {spec(context=c).key for c in others}.isdisjoint({spec(context=base).key})


def row(experiment, space, trial_id, status="completed", finished_at="2025-01-01T00:00:00"):
    return {"experiment": experiment, "space": space, "variant": "relu", "trial_id": trial_id, "seed": 42,
            "status": status, "finished_at": finished_at}


def test_consolidation_keeps_one_row_per_trial_and_every_space_that_asked(tmp_path):
    store = ResultsStore(tmp_path)
    store.write_trial(row("first", "variants", "t1", "failed"), grid=[{"trial_id": "t1", "control": "sae"}])
    store.write_trial(row("second", "baselines", "t1", finished_at="2025-01-02T00:00:00"),
                      grid=[{"trial_id": "t1", "control": "sae"}] * 2)
    store.write_trial(row("third", "baselines", "t1", finished_at="2025-01-03T00:00:00"),
                      grid=[{"trial_id": "t1", "control": "sae"}] * 3)  # a race: the later one is not kept
    store.write_trial(row("first", "variants", "t2"))
    store.record_asked("fourth", "mine", ["t1", "t9"])  # t9 has no row: nothing to attach it to
    store.consolidate()
    trials = pd.read_parquet(tmp_path / "trials.parquet").set_index("trial_id")
    assert sorted(trials.index) == ["t1", "t2"]
    assert trials.loc["t1", "experiment"] == "second" and trials.loc["t1", "status"] == "completed"
    assert json.loads(trials.loc["t1", "spaces"]) == ["baselines", "mine", "variants"]
    assert json.loads(trials.loc["t1", "experiments"]) == ["first", "fourth", "second", "third"]
    assert json.loads(trials.loc["t2", "spaces"]) == ["variants"]
    grid = pd.read_parquet(tmp_path / "grid.parquet")
    assert (grid["trial_id"] == "t1").sum() == 2  # the kept row's grid only
    # Every sweep finds the finished trial, whichever experiment asks; the row is the finished one.
    assert store.finished_ids() == {"t1", "t2"} and store.finished_ids("first") == {"t2"}
    assert store.row("first", "t1")["experiment"] == "second"
    assert len(store.grid("first", "t1")) == 2
    assert store.row("nobody", "t3") is None


def test_asked_by_reads_the_list_and_falls_back_to_the_own_space():
    trials = pd.DataFrame({"space": ["variants", "variants", "ortho"],
                           "spaces": pd.array(['["baselines", "variants"]', '["variants"]', None], dtype="string")})
    assert asked_by(trials, "baselines").tolist() == [True, False, False]
    assert asked_by(trials, "ortho").tolist() == [False, False, True]
    assert asked_by(trials.drop(columns="spaces"), "variants").tolist() == [True, True, False]
    kept, homes = one_row_per_trial(pd.DataFrame([row("e", "s", "a"), row("f", "s", "a", "failed")]), [])
    assert len(kept) == 1 and homes == {"a": "e"}


def write_space(path, blocks):
    path.write_text(yaml.safe_dump({"scheduler": "fifo", "reference": "relu", "trials": blocks}))
    return str(path)


@pytest.fixture
def sweep(ray_session, tmp_path, monkeypatch):
    monkeypatch.setenv("HSAE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "results"

    def run(*args):
        return ablate.main(["--profile", "tiny", "--out", str(out), *args])

    return run, out


@pytest.mark.slow  # three tiny sweeps with evaluation (≈ 100 s on the shared 2-core machine, niced)
def test_the_same_configuration_in_two_spaces_trains_once_and_is_reported_in_both(sweep, tmp_path, capsys):
    run, out = sweep
    spaces = tmp_path / "spaces"
    spaces.mkdir()
    # Named like the shipped spaces, so the report has a section for each.
    variants = write_space(spaces / "variants.yaml", [{"variant": "relu"}])
    baselines = write_space(spaces / "baselines.yaml", [{"variant": "relu"}, {"variant": "topk", "params": {"k": 16}}])
    assert run("--space", variants, "--experiment", "first", "--seeds", "2") == 0
    first = pd.read_parquet(out / "trials.parquet").set_index("trial_id")
    capsys.readouterr()
    assert run("--space", baselines, "--experiment", "second", "--seeds", "2") == 0
    assert "2 of 4 trials already finished" in capsys.readouterr().out  # relu: found; topk (a new parameter): runs
    trials = pd.read_parquet(out / "trials.parquet")
    assert len(trials) == 4 and trials["trial_id"].is_unique
    assert trials.groupby(["variant", "seed"]).size().eq(1).all()
    relu = trials[trials["variant"] == "relu"].set_index("trial_id")
    assert relu["finished_at"].equals(first.loc[relu.index, "finished_at"])  # not trained again
    assert (relu["experiment"] == "first").all()
    assert [json.loads(s) for s in relu["spaces"]] == [["baselines", "variants"]] * 2
    assert [json.loads(e) for e in relu["experiments"]] == [["first", "second"]] * 2
    assert list(trials.loc[trials["variant"] == "topk", "spaces"].unique()) == ['["baselines"]']
    grid = pd.read_parquet(out / "grid.parquet")
    verdict = build_verdict(trials, grid, n_boot=50)
    assert len(verdict.per_trial) == 4 and verdict.per_trial.groupby(["arm", "seed"]).size().eq(1).all()
    text = build_report(out).read_text()
    section = {title: text.split(f"## {title}")[1].split("\n## ")[0] for title in ("Six variants", "Baselines")}
    assert "| relu |" in section["Six variants"] and "| topk |" not in section["Six variants"]
    assert "| relu |" in section["Baselines"] and "| topk |" in section["Baselines"]
    # Another budget (the same space, a third experiment name): trains anew.
    assert run("--space", variants, "--experiment", "third", "--seeds", "1", "--steps", "30") == 0
    assert "nothing to run" not in capsys.readouterr().out
    trials = pd.read_parquet(out / "trials.parquet")
    assert len(trials) == 5 and sorted(trials.loc[trials["variant"] == "relu", "steps"]) == [30, 40, 40]


def as_legacy(out, experiment, new, legacy):
    """A trial's parts and SAE folder as the code before content ids wrote them: under ``legacy``, and without the
    columns it did not write."""
    parts = out / "parts"
    for kind in ("trials", "curves", "grid", "probe"):
        path = parts / kind / experiment / f"{new}.parquet"
        if path.is_file():
            frame = pd.read_parquet(path).assign(trial_id=legacy)
            if kind == "trials":
                frame = frame.drop(columns=["spaces", "experiments"]).assign(sae_path=f"saes/{legacy}")
            frame.to_parquet(parts / kind / experiment / f"{legacy}.parquet")
            path.unlink()
    (out / "saes" / new).rename(out / "saes" / legacy)
    cfg = out / "saes" / legacy / "cfg.json"
    doc = json.loads(cfg.read_text())
    doc["metadata"]["hsae_trial"]["trial_id"] = legacy
    cfg.write_text(json.dumps(doc))


@pytest.mark.slow  # two sweeps (≈ 12 s): in the full suite, out of the fast loop
def test_a_results_directory_with_old_ids_resumes_without_training_again(sweep, tmp_path, capsys):
    run, out = sweep
    variants = write_space(tmp_path / "variants.yaml", [{"variant": "relu"}])
    assert run("--space", variants, "--experiment", "old", "--no-eval") == 0
    trained = pd.read_parquet(out / "trials.parquet").iloc[0]
    new = trained["trial_id"]
    args = ablate.build_parser().parse_args(["--profile", "tiny", "--space", variants, "--no-eval"])
    profile = tune_plan.resolve_profile(args)
    spec_now = TrialSpec("old", "variants", "relu", {}, 42,
                         sweep_context(profile, harvest_key(profile.harvest)))
    assert spec_now.key == new
    # The directory as the old code left it: the row, its curves and its SAE under the id that hashed the names.
    legacy = spec_now.legacy_key()
    as_legacy(out, "old", new, legacy)
    # The case: the same relu run again by another space of the same experiment, under its own old id.
    other = spec_now.legacy_key("old", "relu_and_external")
    rows = out / "parts" / "trials" / "old"
    pd.read_parquet(rows / f"{legacy}.parquet").assign(trial_id=other, space="relu_and_external", sae_path=None,
                                                       finished_at="2999-01-01T00:00:00").to_parquet(
        rows / f"{other}.parquet")
    capsys.readouterr()
    assert run("--space", variants, "--experiment", "old", "--no-eval") == 0
    printed = capsys.readouterr().out
    assert "2 row(s) recorded under an old trial id" in printed and "already finished; nothing to run" in printed
    trials = pd.read_parquet(out / "trials.parquet")
    assert trials["trial_id"].tolist() == [new] and trials["finished_at"].iloc[0] == trained["finished_at"]
    assert trials["sae_path"].iloc[0] == f"saes/{new}" and (out / "saes" / new / "cfg.json").is_file()
    assert json.loads((out / "saes" / new / "cfg.json").read_text())["metadata"]["hsae_trial"]["trial_id"] == new
    assert json.loads(trials["spaces"].iloc[0]) == ["relu_and_external", "variants"]
    curves = pd.read_parquet(out / "curves.parquet")
    assert set(curves["trial_id"]) == {new} and len(curves) > 0
    assert (out / "parts" / "superseded" / "trials" / "old" / f"{other}.parquet").is_file()  # kept, not reported
    assert not list((out / "parts").glob(f"*/old/{legacy}.*"))
