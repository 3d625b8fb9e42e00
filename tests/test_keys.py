"""Keys cover everything that changes a result: another model (or new files at the same path) is new work."""

import pandas as pd
import pytest
import torch

from hsae.keys import content_key
from hsae.models import ModelSpec, byte_tokenizer, describe_model, spec_identity, tiny_gemma2
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
        return ablate.main(["--profile", "tiny", "--space", "groups", "--no-eval", "--out", str(out), *args])

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
