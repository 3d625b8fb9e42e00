"""Keys cover everything that changes a result: another model (or new files at the same path) is new work."""

import pandas as pd
import pytest
import torch

from hsae.keys import content_key
from hsae.models import ModelSpec, byte_tokenizer, describe_model, spec_identity, tiny_gemma2
from tests.helpers import small_space
from tune import ablate


def save_tiny(path, seed):
    """A random tiny Gemma-2 and its byte tokenizer saved as a local HF folder."""
    model = tiny_gemma2(ModelSpec("tiny", seed=seed))
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)


def test_content_key_covers_names_dtypes_shapes_and_bytes():
    base = content_key({"a": 1}, {"w": torch.zeros(2, 3)})
    assert base == content_key({"a": 1}, {"w": torch.zeros(2, 3)})
    for other in (content_key({"a": 2}, {"w": torch.zeros(2, 3)}), content_key({"a": 1}, {"v": torch.zeros(2, 3)}),
                  content_key({"a": 1}, {"w": torch.zeros(3, 2)}),
                  content_key({"a": 1}, {"w": torch.zeros(2, 3, dtype=torch.float64)}),
                  content_key({"a": 1}, {"w": torch.ones(2, 3)})):
        assert other != base


def test_local_model_identity_follows_its_files(tmp_path):
    save_tiny(tmp_path / "m", seed=0)
    first = spec_identity(ModelSpec(str(tmp_path / "m")))
    assert first == spec_identity(ModelSpec(str(tmp_path / "m")))
    save_tiny(tmp_path / "m", seed=1)  # same path, other weights
    assert spec_identity(ModelSpec(str(tmp_path / "m")))["files"] != first["files"]


def test_model_facts_are_read_from_the_model(tmp_path):
    save_tiny(tmp_path / "m", seed=0)
    info = describe_model(ModelSpec(str(tmp_path / "m")))
    assert (info.family, info.n_layers, info.d_model, info.layer) == ("gemma2", 4, 64, 2)
    assert (info.bos_id, info.eos_id) == (2, 1)


@pytest.fixture
def sweep(ray_session, tmp_path, monkeypatch):
    monkeypatch.setenv("HSAE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "results"

    def run(*args):
        return ablate.main(["--profile", "tiny", "--space", small_space("groups"), "--no-eval", "--out", str(out),
                            *args])

    return run, out


@pytest.mark.slow  # three sweeps (32 s): in the full suite, out of the fast loop
def test_rerun_into_the_same_folder_with_another_model_gets_new_rows(sweep, tmp_path, capsys):
    run, out = sweep
    save_tiny(tmp_path / "m", seed=1)
    assert run("--model", str(tmp_path / "m")) == 0
    save_tiny(tmp_path / "m", seed=2)  # the files at that path replaced: stale activations must not be reused
    assert run("--model", str(tmp_path / "m")) == 0
    assert run() == 0  # the built-in tiny model, same experiment name
    assert "nothing to run" not in capsys.readouterr().out
    trials = pd.read_parquet(out / "trials.parquet")
    assert len(trials) == 6 and trials["trial_id"].is_unique and set(trials["status"]) == {"completed"}
    assert trials.groupby("model").size().to_dict() == {str(tmp_path / "m"): 4, "tiny": 2}
    # Same seed and space entry, other weights: other numbers (stale activations would repeat them).
    assert trials[trials["model"] != "tiny"]["explained_variance"].nunique() == 4
    assert run() == 0 and "already finished" in capsys.readouterr().out


def test_the_default_profiles_keep_their_trial_keys():
    """Keys computed at commit 78d7e1e, before extensions became a fraction of the budget (extension_steps=1500
    then a profile field) and before trial ids became content only: the sweep context is unchanged, and the id
    of then is the spec's ``legacy_key``, which a results directory of these profiles is translated from
    (``ResultsStore.adopt_legacy``), so it resumes and skips its finished trials. Declaring the verdict's fields
    (margin, stages) changes neither."""
    from dataclasses import replace

    from hsae.profiles import get_profile, override
    from hsae.spaces import TrialSpec, sweep_context

    embedded = get_profile("embedded")
    expected = {"embedded": (embedded, "5d932a810a753565", "171003b2ebe89ad6"),
                "tiny": (get_profile("tiny"), "b8276ba1cd5c9790", "0a35a2c6782291d2"),
                "asha": (override(embedded, {"train.max_extensions": 0}), "a5ca71a99651bef0", "1ef4f3a2706d6b9f"),
                "stream": (get_profile("embedded", activations="stream"), "cb4c4ceca0d42224", "f11c3604aa6ebd68")}
    for name, (profile, context, key) in expected.items():
        got = sweep_context(profile, "0123456789abcdef")
        trial = TrialSpec("embedded-variants", "variants", "relu", {"target_l0": 64}, 42, got)
        assert (got, trial.legacy_key()) == (context, key), name
        staged = replace(profile, equivalence_margin=0.02, seed_looks=4, max_seeds=11, seeds_per_stage=4)
        assert sweep_context(staged, "0123456789abcdef") == context, name
    # Another budget is another trial; so is another extension size at the same budget.
    assert sweep_context(get_profile("embedded", steps=30), "0123456789abcdef") != expected["embedded"][1]
    assert sweep_context(get_profile("embedded", extension_fraction=0.5), "0123456789abcdef") != expected["embedded"][1]
