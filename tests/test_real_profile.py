"""``--profile real`` end to end on local stand-ins of every hub name (tests/standins.py), offline.

The stand-ins have the real architectures at toy width: a random 20-layer Gemma-2 read at layer 19, its
-it twin with a chat template and a planted letter skill, the WMDP bio forget corpus as JSONL, WikiText,
WMDP-bio and MMLU in the hub's layouts. HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set for the whole
session (conftest.py, inherited by Ray's workers), so any hub name the sweep reached would fail it.
"""

import json

import pandas as pd
import pytest

from hsae.evaluation.questions import BankConfig, answers_correct, hub_letter_rows, letter_source
from hsae.models import ModelSpec, load_model
from tests import standins
from tune import ablate
from tune.report import build_report

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    return standins.save_all(tmp_path_factory.mktemp("hub"))


def real_args(hub, out, *extra):
    """The user's command with every hub name pointed at its local copy, and a toy budget."""
    return ["--profile", "real", "--out", str(out), "--model", str(hub["model"]), "--eval-model",
            str(hub["eval_model"]), "--forget-corpus", str(hub["forget"]), "--retain-corpus", str(hub["retain"]),
            "--wmdp", str(hub["wmdp"]), "--mmlu", str(hub["mmlu"]), "--n-ctxs", "48", "--d-sae", "128",
            "--steps", "40", "--seeds", "1", "--set", "batch_size=256", "--set", "n_eval_ctxs=16",
            "--set", "min_forget_questions=4", "--set", "min_retain_questions=8", "--set", "log_every=5",
            "--set", "checkpoint_every=20", *extra]


@pytest.fixture
def space(tmp_path):
    path = tmp_path / "two.yaml"
    path.write_text("description: relu and the paper's fixed orthogonality\nreference: relu\ntrials:\n"
                    "  - variant: relu\n"
                    "  - variant: fixed_ortho\n    params: {alpha: 0.1}\n")
    return str(path)


def test_real_profile_sweep_on_standins(ray_session, hub, space, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HSAE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "results"
    code = ablate.main(real_args(hub, out, "--space", space))
    trials = pd.read_parquet(out / "trials.parquet")
    # The exit code and the rows' flag follow from the controls the run wrote, by the documented range (positive
    # >= 0.2, negative <= 0.05: docs/evaluation.md, "Controls"), whichever side of it the stand-ins land on here.
    controls = json.loads((out / "controls" / "real.json").read_text())
    in_range = controls["positive"]["score"] >= 0.2 and controls["negative"]["score"] <= 0.05
    assert code == (0 if in_range else ablate.EXIT_CONTROLS_FAILED), (code, controls)
    assert trials["controls_ok"].tolist() == [in_range, in_range]
    assert list(trials["status"]) == ["completed", "completed"]
    assert set(trials["model"]) == {str(hub["model"])} and set(trials["layer"]) == {19}
    assert set(trials["cfg_d_in"]) == {64}  # the stand-in's hidden size, read from the model
    assert trials["unlearning_score"].notna().all() and (trials["n_forget_questions"] == 6).all()
    assert_bank_is_the_twins_all_orderings_filter(hub, out)
    printed = capsys.readouterr().out
    assert "gemma-2-2b" in printed and "rows dropped as attention sinks" in printed
    text = build_report(out).read_text()
    assert "| relu |" in text and "| fixed_ortho |" in text


def assert_bank_is_the_twins_all_orderings_filter(hub, out):
    """The kept questions are exactly those the twin answers under all 24 orderings; the base answers none."""
    questions = pd.read_parquet(out / "questions.parquet")
    cfg = BankConfig(kind="letter", wmdp=str(hub["wmdp"]), mmlu=str(hub["mmlu"]))
    forget_rows, retain = hub_letter_rows(cfg)
    everything = forget_rows + [r for _, rows in retain for r in rows]
    assert set(questions["prompt"]) == standins.expected_kept(everything)
    assert len(questions) == 6 + 4 * 3
    twin, base = (load_model(ModelSpec(str(hub[k]), layer=19)) for k in ("eval_model", "model"))
    kept = [r for r in everything if r["question"] in set(questions["prompt"])]
    bank, orderings = letter_source(twin.tokenizer, kept, [])()
    assert orderings == 24 and answers_correct(twin, bank).all()
    base_bank, _ = letter_source(base.tokenizer, everything, [])()
    assert not answers_correct(base, base_bank).reshape(-1, 24).all(axis=1).any()


def test_letter_bank_keeps_what_the_twin_answers_under_all_orderings(hub, tmp_path):
    from hsae.corpora import CorpusSpec
    from hsae.evaluation.questions import bank_source, build_bank

    cfg = BankConfig(kind="letter", wmdp=str(hub["wmdp"]), mmlu=str(hub["mmlu"]))
    corpus = CorpusSpec("wmdp", forget=str(hub["forget"]), retain=str(hub["retain"]))
    twin = load_model(ModelSpec(str(hub["eval_model"]), layer=19))  # a GPU in bfloat16 where there is one
    bank = build_bank(twin, cfg, bank_source(twin, corpus, cfg, 0.1, 42), {"model": "twin"}, progress=None,
                      root=tmp_path)
    forget_rows, retain = hub_letter_rows(cfg)
    everything = forget_rows + [r for _, rows in retain for r in rows]
    assert {t["prompt"] for t in bank.text} == standins.expected_kept(everything)


def test_dry_run_prints_the_plan_and_writes_nothing(hub, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HSAE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "results"
    assert ablate.main(real_args(hub, out, "--space", "ortho", "--dry-run")) == 0
    printed = capsys.readouterr().out
    assert "gemma2, 20 layers x 64" in printed and "layer 19" in printed
    assert str(hub["eval_model"]) in printed and "space ortho" in printed and "6 trials (1 seeds)" in printed
    assert "activation cache" in printed and "tokens per trial   10,240" in printed
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_plan_that_does_not_fit_the_disk_exits_2_naming_the_size(hub, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HSAE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("hsae.preflight.free_disk_bytes", lambda path: 1_000_000)
    out = tmp_path / "results"
    assert ablate.main(real_args(hub, out, "--space", "ortho", "--dry-run")) == 2
    err = capsys.readouterr().err
    needed = (48 + 16) * 127 * 64 * 4  # (train + held-out contexts) x rows x the stand-in's width x float32
    assert f"the activation cache needs {needed / 2**20:.1f} MiB" in err and "has 1.0 MiB" in err
    assert "--cache" in err and "--n-ctxs" in err
    assert not out.exists()


def test_eval_model_of_another_width_is_refused_before_compute(hub, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HSAE_CACHE", str(tmp_path / "cache"))
    other = standins.save_models(tmp_path / "other", n_layers=20, width=32)[1]
    args = real_args(hub, tmp_path / "results", "--space", "ortho")
    args[args.index("--eval-model") + 1] = str(other)
    assert ablate.main(args) == 2
    assert "20 layers x 32, the base model 20 x 64" in capsys.readouterr().err


def test_bad_profile_setting_names_the_field_and_the_choices(hub, tmp_path, capsys):
    assert ablate.main(real_args(hub, tmp_path / "r", "--space", "ortho", "--set", "batch_sise=2")) == 2
    assert "--set 'batch_sise=2': expected PATH=VALUE with PATH a field path, one of" in capsys.readouterr().err
    assert ablate.main(real_args(hub, tmp_path / "r", "--space", "ortho", "--set", "steps=many")) == 2
    assert "--set steps: expected a int" in capsys.readouterr().err


def test_hsae_train_on_a_local_model(hub, tmp_path, monkeypatch):
    from hsae import cli

    monkeypatch.setenv("HSAE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert cli.main(["--model", str(hub["model"]), "--corpus", "wmdp", "--forget-corpus", str(hub["forget"]),
                     "--retain-corpus", str(hub["retain"]), "--layer", "19", "--n-ctxs", "32", "--steps", "20",
                     "--batch-size", "256", "--out", str(out)]) == 0
    cfg = json.loads((out / "saelens" / "cfg.json").read_text())
    assert cfg["d_in"] == 64 and cfg["hook_name"] == "blocks.19.hook_resid_post"
