"""External arms (hsae/external.py): SAEs in SAELens's layout loaded instead of trained, judged as trained arms are.

The round trip is the proof: a trial's SAE, exported (hsae.export) and imported as an external arm of the same seed,
gets its original row's metrics and grid to float tolerance, for every variant. SAEs built and saved by SAELens's
own code load for every supported architecture and reconstruct as SAELens's ``sae(x)`` does. A width, layer or
model mismatch is refused before compute, naming both values. The evaluation here is a stand-in that is a function
of the SAE the evaluator rebuilds (``sae_from_weights``, the server's own): its features on fixed raw rows and its
reconstruction error, so any difference in either changes the grid.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from sae_lens import SAE as SAELensSAE  # no skip: CI installs SAELens with the `saelens` extra
from sae_lens import (
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    GatedSAEConfig,
    JumpReLUSAEConfig,
    StandardSAEConfig,
    TopKSAEConfig,
)
from sae_lens.saes.sae import SAEMetadata

from hsae.evaluation.evaluator import sae_from_weights
from hsae.external import (
    ExternalSAEError,
    ExternalSource,
    check_matches,
    load_external,
)
from hsae.models import ModelInfo
from hsae.profiles import PROFILES, override
from hsae.results import ResultsStore
from hsae.schema import SAE_METRICS
from hsae.spaces import SpaceError, grid_trials, parse_space
from hsae.train import ArrayBatches, to_batch
from hsae.trial import ExternalRun, TrialRun
from hsae.variants import VARIANTS
from tests.helpers import TINY_PARAMS

D_IN, D_SAE, LAYER = 24, 64, 3
MODEL = ModelInfo(source="toy-lm", family="toy", layer=LAYER, d_model=D_IN, n_layers=6, bos_id=None, eos_id=None,
                  dtype="float32", identity={}, name="toy-lm")
PROFILE = override(PROFILES["tiny"], {"d_sae": D_SAE, "train.steps": 30, "train.batch_size": 128, "train.log_every": 5,
                                      "train.checkpoint_every": 0})
RTOL = 1e-4


def activations(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw rows with structure (low rank + offset, far from unit scale) and two domains."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    basis = rng.standard_normal((6, D_IN))
    z = rng.standard_normal((n, 6)) * (1.0 + labels[:, None])
    x = (z @ basis + 0.1 * rng.standard_normal((n, D_IN)) + 3.0) * 40.0
    return x.astype(np.float32), labels


TRAIN_X, TRAIN_LABELS = activations(0, 2048)
EVAL = to_batch(*activations(1, 512))
PROBE = torch.as_tensor(activations(2, 256)[0])  # the stand-in evaluation's "questions" (raw activations)


def stand_in_evaluate(cfg: dict, state: dict) -> dict:
    """An evaluation answer that depends on the SAE's features and reconstruction on raw rows (PROBE)."""
    sae = sae_from_weights(cfg, state)
    with torch.no_grad():
        x_hat, f = sae(PROBE)
        freq = (sae.encode(PROBE) > 0).double().mean(dim=0)
    err = float(((x_hat - PROBE).norm(dim=1) / PROBE.norm(dim=1)).mean())
    order = torch.argsort(freq, descending=True, stable=True)
    grid = [{"grid": "saebench", "retain_threshold": 0.01 * i, "n_features": i + 1, "multiplier": 10.0,
             "features_selected": int(order[i]), "forget_acc": float(freq[order[i]]) * 0.5 + err,
             "retain_acc": 1.0 - float(freq[order[-1 - i]]) * 0.01} for i in range(4)]
    for g in grid:  # chosen on "select" questions, reported on "test" ones (here the same numbers, shifted)
        g.update(forget_acc_select=g["forget_acc"] + 0.01, retain_acc_select=g["retain_acc"],
                 forget_acc_test=g["forget_acc"], retain_acc_test=g["retain_acc"])
    unlearning = {"score": 1.0 - grid[0]["forget_acc"], "tied_settings": 0, "n_forget": 10, "n_retain": 10,
                  "grid": grid, "random_feature_score": err, "random_feature_grid": []}
    return {"unlearning": unlearning, "ce": {"ce_score_forget": 1.0 - err, "ce_score_retain": 1.0 - 2 * err,
                                             "kl_forget": err, "kl_retain": err / 2}}


def train_and_export(variant: str, seed: int, tmp_path: Path):
    from hsae.spaces import TrialSpec

    spec = TrialSpec("exp", "s", variant, TINY_PARAMS.get(variant, {}), seed, "ctx")
    run = TrialRun(spec, PROFILE, MODEL, tmp_path / "ckpt")
    outcome = run.run(ArrayBatches(TRAIN_X, TRAIN_LABELS, PROFILE.train.batch_size, seed), EVAL, stand_in_evaluate)
    assert outcome.status == "completed", outcome.row.get("error")
    return outcome, run.export_sae(tmp_path / "export")


def external_spec(path: Path, seed: int, name: str = "mine"):
    from hsae.spaces import TrialSpec

    return TrialSpec("exp", "s", f"external:{name}", ExternalSource(str(path), "folder").params(), seed, "ctx")


def run_external(spec, seed: int):
    run = ExternalRun(spec, PROFILE, MODEL)
    return run.run(ArrayBatches(TRAIN_X, TRAIN_LABELS, PROFILE.train.batch_size, seed), EVAL, stand_in_evaluate)


def assert_same_numbers(got: dict, expected: dict, names: list[str]) -> None:
    for name in names:
        a, b = got.get(name), expected.get(name)
        if b is None or (isinstance(b, float) and math.isnan(b)):
            assert a is None or (isinstance(a, float) and math.isnan(a)), (name, a, b)
        else:
            assert a == pytest.approx(b, rel=RTOL, abs=1e-6), (name, a, b)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_round_trip_gives_the_original_rows_metrics_and_grid(variant, tmp_path):
    seed = 42 + sorted(VARIANTS).index(variant) % 3
    trained, folder = train_and_export(variant, seed, tmp_path)
    imported = run_external(external_spec(folder, seed), seed)
    assert imported.status == "completed", imported.row.get("error")
    row, original = imported.row, trained.row
    evaluation = ["unlearning_score", "random_feature_score", "forget_acc_at_retain99", "forget_acc_at_retain98",
                  "forget_acc_at_retain95", "ce_score_forget", "ce_score_retain", "kl_forget", "kl_retain"]
    assert_same_numbers(row, original, [*SAE_METRICS, *evaluation])
    got, expected = pd.DataFrame(imported.grid), pd.DataFrame(trained.grid)
    assert list(got["features_selected"]) == list(expected["features_selected"])
    np.testing.assert_allclose(got[["forget_acc", "retain_acc"]], expected[["forget_acc", "retain_acc"]], rtol=RTOL)
    # Where it came from, and nothing it did not do here: no training or configuration columns.
    assert (row["variant"], row["source"], row["source_path"]) == ("external:mine", "folder", str(folder))
    assert row["source_architecture"] == json.loads((folder / "cfg.json").read_text())["architecture"]
    assert row["harvest_dtype"] == original["harvest_dtype"] == MODEL.dtype
    assert not any(k.startswith("cfg_") for k in row) and imported.curves == []
    assert all(row.get(k) is None for k in ("steps", "tokens", "val_mse", "converged", "final_loss"))
    ResultsStore(tmp_path / "results").write_trial(row, imported.curves, imported.grid)  # the schema takes it


def test_the_unit_is_the_seeds_first_batch(tmp_path):
    """Imported as another seed, the metrics in normalised units move with that seed's scale; EV does not."""
    trained, folder = train_and_export("relu", 42, tmp_path)
    other = run_external(external_spec(folder, 43), 43).row
    assert other["explained_variance"] == pytest.approx(trained.row["explained_variance"], rel=RTOL)
    assert other["mse"] != pytest.approx(trained.row["mse"], rel=1e-6)


# -- SAEs built and saved by SAELens --------------------------------------------------------------
META = SAEMetadata(model_name="toy-lm", hook_name=f"blocks.{LAYER}.hook_resid_post")


@torch.no_grad()
def saelens_saved(architecture: str, path: Path) -> Path:
    """An SAE built by SAELens with random, live weights, saved by SAELens (batchtopk: its inference save)."""
    gen = torch.Generator().manual_seed(len(architecture))
    if architecture == "batchtopk":
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=8, metadata=META))
    else:
        config = {"standard": StandardSAEConfig, "topk": TopKSAEConfig, "jumprelu": JumpReLUSAEConfig,
                  "gated": GatedSAEConfig}[architecture]
        kwargs = {"k": 8} if architecture == "topk" else {}
        sae = SAELensSAE.from_dict(config(d_in=D_IN, d_sae=D_SAE, metadata=META, **kwargs).to_dict())
    # Paired directions +-d reconstruct: sum_d relu(<d, v>) d - relu(-<d, v>) d = D^T D v ~ (n/2 / d_in) v.
    half = torch.nn.functional.normalize(torch.randn(D_SAE // 2, D_IN, generator=gen), dim=1)
    for p in sae.parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    sae.W_dec.copy_(torch.cat([half, -half]))
    sae.W_enc.copy_(sae.W_dec.T * (2 * D_IN / D_SAE))
    sae.b_dec.copy_(torch.as_tensor(TRAIN_X[:256]).mean(dim=0))
    if hasattr(sae, "threshold"):
        sae.threshold.copy_(torch.rand(D_SAE, generator=gen) * 0.05)
    if architecture == "batchtopk":
        sae.topk_threshold.fill_(0.05)
        sae.save_inference_model(path)
    else:
        sae.save_model(path)
    return path


@pytest.mark.parametrize("architecture", ["standard", "topk", "batchtopk", "jumprelu", "gated"])
def test_saelens_saved_sae_loads_evaluates_and_reconstructs_as_saelens(architecture, tmp_path):
    folder = saelens_saved(architecture, tmp_path / architecture)
    theirs = SAELensSAE.load_from_disk(folder, device="cpu")
    x = torch.as_tensor(activations(3, 256)[0])
    mine = load_external(ExternalSource(str(folder), "folder"))
    with torch.no_grad():
        expected, got = theirs(x), mine.module()(x)[0]
        l0 = float((mine.module().encode(x) > 0).sum(dim=1).float().mean())
    assert 0 < l0 < D_SAE, l0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    assert mine.architecture == ("jumprelu" if architecture == "batchtopk" else architecture)
    outcome = run_external(external_spec(folder, 42, architecture), 42)
    assert outcome.status == "completed", outcome.row.get("error")
    assert outcome.row["source_architecture"] == mine.architecture and outcome.row["l0"] > 0
    assert len(outcome.grid) == 4 and outcome.row["unlearning_score"] is not None


def test_registry_entry_folds_its_scaling_factor_as_saelens_does(tmp_path):
    folder = saelens_saved("standard", tmp_path / "hub" / "layer3")
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "expected_average_only_in"}))
    registry = {"rel": {"repo_id": "org/rel", "model": "toy-lm", "conversion_func": None,
                        "saes": [{"id": "l3", "path": "layer3", "norm_scaling_factor": 0.025}]}}
    (tmp_path / "hub" / "pretrained_saes.yaml").write_text(yaml.safe_dump(registry))
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump({"trials": [{"external": {
        "name": "reg", "saes": ["l3"], "release": "rel", "registry": "hub/pretrained_saes.yaml"}}]}))
    space = parse_space("s", space_file.read_text(), str(space_file))
    (spec,) = grid_trials(space, "exp", [42, 43, 44], "ctx")
    assert spec.seed == 42 and spec.params["norm_scaling_factor"] == 0.025 and spec.params["path"] == str(folder)
    source = ExternalSource.from_params(spec.params)
    check_matches(source, D_IN, LAYER, {"toy-lm"})
    x = torch.as_tensor(activations(4, 64)[0])
    expected_sae = SAELensSAE.load_from_disk(folder, device="cpu")
    expected_sae.fold_activation_norm_scaling_factor(0.025)
    with torch.no_grad():
        torch.testing.assert_close(load_external(source).module()(x)[0], expected_sae(x), rtol=1e-5, atol=1e-4)
    with pytest.raises(ExternalSAEError, match="needs the registry entry's norm_scaling_factor"):
        check_matches(ExternalSource(str(folder), "folder"), D_IN, LAYER, {"toy-lm"})


# -- the space block and the checks before compute -------------------------------------------------
def test_space_block_makes_one_seed_per_folder(tmp_path):
    for i in range(3):
        saelens_saved("standard", tmp_path / f"sae{i}")
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump({"reference": "relu", "trials": [
        {"variant": "relu"}, {"external": {"name": "my_relu", "paths": ["sae0", "sae1", str(tmp_path / "sae2")]}}]}))
    space = parse_space("mine", space_file.read_text(), str(space_file))
    trials = grid_trials(space, "exp", [42, 43], "ctx")
    external = [t for t in trials if t.variant == "external:my_relu"]
    assert [t.variant for t in trials].count("relu") == 2
    assert [(t.seed, t.params["path"]) for t in external] == [(42 + i, str(tmp_path / f"sae{i}")) for i in range(3)]
    assert len({t.key for t in external}) == 3


@pytest.mark.parametrize("block, message", [
    ({"name": "x"}, "exactly one of 'paths'"),
    ({"name": "x", "paths": []}, "non-empty list"),
    ({"name": "bad name", "paths": ["a"]}, "external.name"),
    ({"name": "x", "paths": ["nowhere"]}, "lacks cfg.json, sae_weights.safetensors"),
    ({"name": "x", "paths": ["a"], "weights": 1}, "unknown key(s) ['weights']"),
    ({"name": "x", "saes": ["a"]}, "needs 'release'"),
])
def test_bad_blocks_name_the_field(block, message):
    with pytest.raises(SpaceError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        parse_space("s", yaml.safe_dump({"trials": [{"external": block}]}))


@pytest.mark.parametrize("change, message", [
    ({"d_in": 32}, "d_in 32 does not match the sweep's model width 24"),
    ({"hook_name": "blocks.5.hook_resid_post"}, "(layer 5) does not match the sweep's blocks.3.hook_resid_post"),
    ({"model_name": "other-lm"}, "model_name 'other-lm' does not match the sweep's model ['toy-lm']"),
    ({"architecture": "temporal"}, "architecture 'temporal' is not supported"),
    ({"normalize_activations": "layer_norm"}, "normalize_activations 'layer_norm' is not supported"),
])
def test_mismatch_names_both_values(change, message, tmp_path):
    folder = saelens_saved("standard", tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.update({k: v for k, v in change.items() if k in ("d_in", "architecture", "normalize_activations")})
    cfg["metadata"].update({k: v for k, v in change.items() if k in ("hook_name", "model_name")})
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ExternalSAEError) as err:
        check_matches(ExternalSource(str(folder), "folder"), D_IN, LAYER, {"toy-lm"})
    assert message in str(err.value)


def test_the_next_blocks_resid_pre_is_the_same_stream(tmp_path):
    folder = saelens_saved("standard", tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = f"blocks.{LAYER + 1}.hook_resid_pre"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    check_matches(ExternalSource(str(folder), "folder"), D_IN, LAYER, {"toy-lm"})
    with pytest.raises(ExternalSAEError, match="layer 4"):
        check_matches(ExternalSource(str(folder), "folder"), D_IN, LAYER + 1, {"toy-lm"})


@pytest.mark.parametrize("d_in, hook, message", [
    (D_IN, "blocks.2.hook_resid_post", "d_in 24 does not match the sweep's model width 64"),
    (64, "blocks.5.hook_resid_post", "hook_name 'blocks.5.hook_resid_post' (layer 5) does not match the sweep's "
                                     "blocks.2.hook_resid_post (layer 2)"),
])
def test_sweep_exits_2_before_compute_naming_both_values(d_in, hook, message, tmp_path, capsys):
    from tune.ablate import EXIT_BAD_INPUT, main

    meta = SAEMetadata(model_name="tiny", hook_name=hook)
    SAELensSAE.from_dict(StandardSAEConfig(d_in=d_in, d_sae=32, metadata=meta).to_dict()).save_model(tmp_path / "sae")
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"reference": "relu",
                                     "trials": [{"variant": "relu"}, {"external": {"name": "x", "paths": ["sae"]}}]}))
    out = tmp_path / "out"
    assert main(["--space", str(space), "--profile", "tiny", "--out", str(out)]) == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err
    assert not out.exists()


# -- an external arm through a real sweep: the trainable, the activation server, the verdict -------------------
@pytest.mark.slow
def test_an_external_arm_runs_through_a_tiny_sweep_and_is_tested_against_relu_on_its_seeds(ray_session, tmp_path,
                                                                                             monkeypatch, capsys):
    """A first sweep trains relu (seeds 42, 43) and exports its SAEs; a second sweep's space loads those exports as
    an external arm beside relu (whose trials it finds finished): the external rows are completed, untrained
    (converged null) and paired with relu's seeds 42, 43 in the verdict, which the report computes with no
    mismatch between the rows and grid.parquet."""
    from hsae.verdict import build_verdict
    from tune.ablate import main
    from tune.report import build_report

    monkeypatch.setenv("HSAE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "results"
    relu_space, aa_space = tmp_path / "relu.yaml", tmp_path / "aa.yaml"
    relu_space.write_text(yaml.safe_dump({"trials": [{"variant": "relu"}]}))
    sweep = ["--profile", "tiny", "--out", str(out), "--seeds", "2"]
    assert main(["--space", str(relu_space), *sweep]) == 0
    relu = pd.read_parquet(out / "trials.parquet").sort_values("seed")
    assert list(relu["seed"]) == [42, 43] and (relu["status"] == "completed").all()
    aa_space.write_text(yaml.safe_dump({"reference": "relu", "trials": [
        {"variant": "relu"}, {"external": {"name": "aa_relu", "paths": [str(out / p) for p in relu["sae_path"]]}}]}))
    capsys.readouterr()
    assert main(["--space", str(aa_space), *sweep]) == 0
    assert "2 of 4 trials already finished" in capsys.readouterr().out  # relu's: not trained again

    trials = pd.read_parquet(out / "trials.parquet")
    external = trials[trials["variant"] == "external:aa_relu"].sort_values("seed")
    assert list(external["seed"]) == [42, 43] and (external["status"] == "completed").all()
    assert external["converged"].isna().all() and external["steps"].isna().all()  # loaded, not trained
    assert list(external["source_path"]) == [str(out / p) for p in relu["sae_path"]]
    assert external["frontier_area"].notna().all()
    # The i-th folder is seed 42 + i, measured in that seed's unit: relu's own SAE of that seed, its own numbers.
    for name in ("explained_variance", "l0", "mse"):
        assert list(external[name]) == pytest.approx(list(relu[name]), rel=RTOL), name

    grid, questions = pd.read_parquet(out / "grid.parquet"), pd.read_parquet(out / "questions.parquet")
    v = build_verdict(trials, grid, questions=questions, n_boot=20)
    assert v.boot.select_test and v.mismatches == [] and v.excluded == {}
    assert v.boot.reported == ("A", "B")  # the external arm's grid is cross-fitted like a trained arm's
    tested = v.main.by_arm()["external:aa_relu"]
    assert v.main.baseline == "relu" and tested.n == 2 and tuple(tested.seeds) == (42, 43)

    # The report's verdict over the same rows (on this random tiny model the controls are out of range, so it is
    # headed "Diagnostics"): both arms with their 2 seeds, and no row that disagrees with grid.parquet.
    text = build_report(out, n_boot=50, exploratory=True).read_text()
    assert "| external:aa_relu | 2 |" in text and "Matched retain and frontier area are cross-fitted" in text
    assert "Mismatch" not in text
