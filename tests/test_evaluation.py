import json

import numpy as np
import pytest
import torch

from hsae.config import SAEConfig
from hsae.corpora import FORGET, RETAIN
from hsae.evaluation.evaluator import EvalConfig, Evaluator, eval_cache_key
from hsae.evaluation.interventions import SAEClamp
from hsae.evaluation.questions import BankConfig
from hsae.evaluation.tail import full_log_probs, tail_hidden, token_logits
from hsae.evaluation.unlearning import UnlearningConfig, select_features, unlearning_score
from hsae.models import stopped_forward
from hsae.train import DegenerateRunError
from tests.helpers import assert_evaluation_held_out, served_evaluator

SMALL = EvalConfig(unlearning=UnlearningConfig(min_forget_questions=10, min_retain_questions=10),
                   ce_contexts_per_domain=2)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def tiny_world(tiny_root, ray_session):
    """The tiny profile's evaluator as its sweep builds it (held-out questions and activations only)."""
    ev = served_evaluator("tiny", tiny_root)
    assert_evaluation_held_out(ev, "tiny", tiny_root)
    return ev.loaded, ev.bank, ev


def test_question_bank_is_cached_on_disk(tiny_world, tiny_root, capsys):
    _, bank, _ = tiny_world
    capsys.readouterr()
    again = served_evaluator("tiny", tiny_root)
    printed = capsys.readouterr().out
    assert again.bank.prompts == bank.prompts and again.bank.key == bank.key
    assert "question bank" not in printed and "scoring" not in printed  # read back, not rebuilt


def test_the_plan_prints_the_banks_size_and_answered_share_once_it_is_built(tiny_world, tiny_root, tmp_path,
                                                                             monkeypatch, capsys):
    from tune import ablate

    _, bank, _ = tiny_world
    monkeypatch.setenv("HSAE_CACHE", str(tmp_path / "empty"))
    args = ["--profile", "tiny", "--space", "ortho", "--dry-run", "--precision", "fp32", "--out", str(tmp_path / "r")]
    assert ablate.main(args) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("questions"))
    assert "not built yet" in line and "caps 1000 forget / 1000 retain" in line
    monkeypatch.setenv("HSAE_CACHE", str(tiny_root))  # the cache where tiny_world's server built the bank
    assert ablate.main(args) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("questions"))
    forget = bank.candidates["forget"]
    assert bank.key[:8] in line and f"{bank.count(FORGET)} forget of {forget['answered']} answered correctly (" \
        f"{forget['answered'] / forget['candidates']:.0%} of {forget['candidates']} candidates)" in line


def identity_sae(d=64):
    """A ReLU SAE that reconstructs exactly: features +x and -x."""
    eye = torch.eye(d)
    state = {"W_enc": torch.cat([eye, -eye], 1), "b_enc": torch.zeros(2 * d),
             "W_dec": torch.cat([eye, -eye], 0), "b_dec": torch.zeros(d)}
    return SAEConfig("relu", d, 2 * d).to_dict(), {k: v.numpy() for k, v in state.items()}


def test_selection_follows_the_procedure_on_a_constructed_example():
    forget = np.array([0.50, 0.40, 0.40, 0.30, 0.20, 0.00, 0.90])
    retain = np.array([0.02, 0.00, 0.005, 0.00, 0.00, 0.00, 0.01])
    # threshold 0.01 drops features 0 and 6 (retain >= 0.01); 5 never fires on forget text.
    assert select_features(forget, retain, 0.01, 3).tolist() == [1, 2, 3]  # 1 and 2 tie: lower index first
    assert select_features(forget, retain, 0.001, 10).tolist() == [1, 3, 4]
    assert select_features(forget, retain, 0.5, 2).tolist() == [6, 0]


def _point(forget_sel, retain_sel, forget_test, retain_test):
    return {"forget_acc_select": forget_sel, "retain_acc_select": retain_sel, "forget_acc_test": forget_test,
            "retain_acc_test": retain_test}


def test_score_formula_matches_a_hand_computed_grid():
    grid = [
        {"forget_acc": 0.40, "retain_acc": 0.95},  # retain too low: effect 1
        {"forget_acc": 0.70, "retain_acc": 0.99},  # counts: effect 0.70
        {"forget_acc": 0.80, "retain_acc": 1.00},
    ]
    assert unlearning_score(grid) == pytest.approx(0.30)
    assert unlearning_score([{"forget_acc": 0.1, "retain_acc": 0.5}]) == 0.0


def test_bank_is_answered_correctly_by_the_unmodified_model(tiny_world):
    loaded, bank, ev = tiny_world
    assert bank.count(FORGET) >= 10 and bank.count(RETAIN) >= 10
    b = ev.batches[0]
    hidden = tail_hidden(loaded, b["resid"])
    ids = torch.tensor([[o[0] for o in q] for q in b["options"]])
    scores = token_logits(loaded, hidden[torch.arange(len(ids)), b["last"]], ids)
    assert torch.equal(scores.argmax(-1), b["answer"])


def test_the_continuous_outcome_is_the_softmax_of_the_scores_argmax_reads(tiny_world):
    """Beside the bit (argmax of the options' scores) every answer keeps the softmax probability of the correct option
    over those same scores, quantised to 16 bits; an edited question carries its re-run probability."""
    from hsae.scoring import P_SCALE, decode_p

    loaded, bank, ev = tiny_world
    b = ev.batches[0]
    hidden = tail_hidden(loaded, b["resid"])
    ids = torch.tensor([[o[0] for o in q] for q in b["options"]])
    scores = token_logits(loaded, hidden[torch.arange(len(ids)), b["last"]], ids).double()
    p = torch.softmax(scores, -1).gather(1, b["answer"][:, None])[:, 0].numpy()
    np.testing.assert_array_equal(ev.baseline_p[b["idx"]], np.rint(p * P_SCALE).astype(np.uint16))
    assert (ev.baseline_p[b["idx"]] > P_SCALE / len(ids[0])).all()  # answered correctly: above chance
    cfg, state = identity_sae()
    out = ev.unlearning(cfg, state)
    base = out["baseline"]
    assert base["forget_correct"] == "1" * bank.count(FORGET)
    np.testing.assert_array_equal(decode_p([base["forget_p_correct"]])[0],
                                  ev.baseline_p[np.asarray(bank.domain) == FORGET])
    for g in out["grid"]:  # every setting: probabilities where the bits are, agreeing with them
        q = decode_p([g["forget_p_correct"]])[0]
        assert len(q) == bank.count(FORGET) and g["forget_p"] == q.sum() / (P_SCALE * len(q))
        if g["questions_touched"] == 0:
            assert g["forget_p_correct"] == base["forget_p_correct"]


def test_baselines_are_measured_on_the_unmodified_model(tiny_world):
    from dataclasses import replace

    loaded, bank, ev = tiny_world
    assert ev.baseline_correct.all()  # the bank keeps only what the unmodified model answers correctly
    # A bank whose first forget question names the wrong option: the unmodified model now gets it wrong.
    wrong = bank.domain.index(FORGET)
    answers = list(bank.answer)
    answers[wrong] = (answers[wrong] + 1) % len(bank.options[wrong])
    tokens, domains = np.zeros((1, 32), dtype=np.int64), np.zeros(1, dtype=np.int64)
    flawed = Evaluator(loaded, replace(bank, answer=answers), ev.select_x, ev.select_labels, tokens, domains, SMALL)
    n_forget = bank.count(FORGET)
    assert np.flatnonzero(~flawed.baseline_correct).tolist() == [wrong]
    cfg, state = identity_sae()
    out = flawed.unlearning(cfg, state)
    assert out["baseline_forget_acc"] == pytest.approx((n_forget - 1) / n_forget) and out["baseline_retain_acc"] == 1.0
    assert flawed.controls()["positive"]["baseline_forget_acc"] == out["baseline_forget_acc"]
    # An intervention that touches no prompt leaves every question with the unmodified model's answer.
    from hsae.evaluation.evaluator import sae_from_weights

    sae = sae_from_weights(cfg, state)
    noop = flawed.accuracy(SAEClamp(sae.encode, sae.W_dec.detach(), torch.tensor([], dtype=torch.long), 0.0))
    assert noop.touched == 0 and np.array_equal(noop.correct, flawed.baseline_correct)


def test_no_features_or_zero_multiplier_leaves_logits_unchanged(tiny_world):
    loaded, bank, ev = tiny_world
    cfg, state = identity_sae()
    from hsae.evaluation.evaluator import sae_from_weights

    sae = sae_from_weights(cfg, state)
    b = ev.batches[0]
    noop = SAEClamp(sae.encode, sae.W_dec.detach(), torch.tensor([], dtype=torch.long), 0.0)
    edited, changed = noop.apply(b["resid"], b["valid"])
    assert torch.equal(edited, b["resid"]) and not changed.any()
    outcome = ev.accuracy(noop)
    assert outcome.correct.all() and outcome.touched == 0 and outcome.exact and outcome.edit_ratio != outcome.edit_ratio
    # The re-run path itself: layer-L residual -> later layers equals the model's own full forward.
    ids = torch.tensor([bank.prompts[int(i)] + [0] * (b["resid"].shape[1] - len(bank.prompts[int(i)]))
                        for i in b["idx"]])
    with torch.no_grad():
        full = torch.log_softmax(loaded.model(input_ids=ids).logits, dim=-1)
    hidden = tail_hidden(loaded, stopped_forward(loaded, ids))
    rerun = full_log_probs(loaded, hidden.reshape(-1, hidden.shape[-1])).reshape(full.shape)
    torch.testing.assert_close(rerun, full, rtol=1e-5, atol=1e-5)


def test_sae_with_no_firing_features_is_degenerate_not_zero(tiny_world):
    _, _, ev = tiny_world
    cfg, state = identity_sae()
    state["b_enc"] = np.full_like(state["b_enc"], -1e9)
    with pytest.raises(DegenerateRunError, match="no SAE feature fires"):
        ev.unlearning(cfg, state)


def test_unlearning_returns_grid_counts_baselines_and_controls(tiny_world):
    _, bank, ev = tiny_world
    cfg, state = identity_sae()
    out = ev.unlearning(cfg, state)
    # Cross-fitted: each fold's own grid (features chosen on select, then on test documents), rows naming their fold.
    for fold in ("A", "B"):
        mine = [g for g in out["grid"] if g["fold"] == fold]
        saebench = [g for g in mine if g["grid"] == "saebench"]
        # 16 SAEBench settings; the extended grid adds thresholds 0.003 and 0.03 and, for 128 features, the count 4:
        # 8 new (threshold, count) pairs at 2 multipliers.
        assert len(saebench) == 16 and len(mine) == 16 + 8 * 2
        # SAEBench's settings; thresholds don't apply to random features
        assert len([g for g in out["random_feature_grid"] if g["fold"] == fold]) == 8
    assert len(out["grid"]) == 2 * (16 + 8 * 2) and len(out["random_feature_grid"]) == 2 * 8
    assert out["n_forget"] == bank.count(FORGET) and out["n_retain"] == bank.count(RETAIN)
    assert out["baseline_forget_acc"] == 1.0 and out["baseline_retain_acc"] == 1.0
    assert 0.0 <= out["score"] <= 1.0
    assert {"retain_threshold", "n_features", "multiplier", "forget_acc", "retain_acc", "features_selected"} <= set(
        out["grid"][0])
    assert ev.unlearning(cfg, state) is out  # same weights + config: served from the content-keyed cache
    controls = ev.controls()
    assert {"positive", "negative"} <= set(controls) and len(controls["positive"]["grid"]) == 12
    # Every grid point keeps its per-question outcomes, consistent with its accuracies on all, select and test
    # questions (the roles of questions.parquet, in the same order).
    for g in out["grid"] + controls["positive"]["grid"]:
        assert len(g["forget_correct"]) == bank.count(FORGET) and len(g["retain_correct"]) == bank.count(RETAIN)
        for name, d in (("forget", FORGET), ("retain", RETAIN)):
            correct = np.array([c == "1" for c in g[f"{name}_correct"]])
            select = ev.is_select[ev.domains == d]
            assert 0 < select.sum() < len(select)
            assert correct.mean() == pytest.approx(g[f"{name}_acc"])
            assert correct[select].mean() == pytest.approx(g[f"{name}_acc_select"])
            assert correct[~select].mean() == pytest.approx(g[f"{name}_acc_test"])


def test_a_setting_that_selects_nothing_is_recorded_as_such(tiny_world):
    from dataclasses import replace

    from hsae.results import evaluation_values

    loaded, bank, ev = tiny_world
    # A retain threshold of 0 admits no feature (a frequency is never < 0): nothing to clamp.
    none_cfg = replace(SMALL, unlearning=replace(SMALL.unlearning, retain_thresholds=(0.0,), extended_thresholds=(),
                                                 extended_feature_fractions=()), random_feature_control=False)
    assert len(none_cfg.unlearning.settings(128)) == 8
    nothing = Evaluator(loaded, bank, ev.select_x, ev.select_labels, np.zeros((1, 32), dtype=np.int64),
                        np.zeros(1, dtype=np.int64), none_cfg)
    cfg, state = identity_sae()
    out = nothing.unlearning(cfg, state)
    assert all(g["features_selected"] == 0 and g["forget_acc"] == 1.0 and g["retain_acc"] == 1.0
               and g["questions_touched"] == 0 for g in out["grid"])
    values = evaluation_values({"unlearning": out}, 1.0)
    assert values["settings_selecting_none"] == len(out["grid"]) == 8
    assert values["forget_acc_at_retain99"] == 1.0 and values["unlearning_score"] == 0.0


def test_matched_retain_columns_equal_a_hand_computation():
    from hsae.results import evaluation_values

    points = [  # (select forget, select retain, test forget, test retain, features selected)
        (0.40, 0.96, 0.45, 0.95, 20),
        (0.55, 0.985, 0.60, 0.99, 20),
        (0.70, 0.99, 0.65, 0.97, 10),
        (0.90, 1.00, 0.95, 1.00, 10),
        (1.00, 1.00, 1.00, 1.00, 0),
        (0.10, 0.50, 0.05, 0.995, 40),  # test retain meets every bar, select retain none: only fold B chooses it
    ]
    grid = [{**_point(*p[:4]), "forget_acc": p[0], "retain_acc": p[1], "features_selected": p[4]} for p in points]
    unlearning = {"score": 0.3, "tied_settings": 0, "n_forget": 100, "n_retain": 200, "grid": grid}
    values = evaluation_values({"unlearning": unlearning}, 1.0)
    # Fold A (reported) chooses on select questions and reports test ones (0.65, 0.60, 0.45 at the three bars);
    # fold B (kept, not reported) would choose on test questions and report select ones (0.10).
    assert values["forget_acc_at_retain99"] == pytest.approx(0.65)
    assert values["forget_acc_at_retain98"] == pytest.approx(0.60)
    assert values["forget_acc_at_retain95"] == pytest.approx(0.45)
    assert values["settings_selecting_none"] == 1
    high = evaluation_values({"unlearning": {**unlearning, "grid": grid[-1:]}}, 1.0)
    assert high["forget_acc_at_retain95"] is None  # no setting keeps retain >= 0.95 on the select questions
    assert high["frontier_area_p"] is None  # the grid records no probabilities of the correct option


def test_identity_sae_recovers_all_of_the_ce_loss(tiny_world):
    _, _, ev = tiny_world
    cfg, state = identity_sae()
    ce = ev.ce_scores(cfg, state)
    for name in ("forget", "retain"):
        assert ce[f"ce_score_{name}"] == pytest.approx(1.0, abs=1e-4)
        assert ce[f"kl_{name}"] == pytest.approx(0.0, abs=1e-4)


def test_eval_cache_keys_are_content_hashes():
    cfg, state = identity_sae(8)
    other = {k: v.copy() for k, v in state.items()}
    other["b_dec"][0] = 1e-6
    assert eval_cache_key(cfg, state, SMALL, "u") == eval_cache_key(cfg, {k: v.copy() for k, v in state.items()},
                                                                    SMALL, "u")
    assert eval_cache_key(cfg, state, SMALL, "u") != eval_cache_key(cfg, other, SMALL, "u")
    assert eval_cache_key(cfg, state, SMALL, "u") != eval_cache_key(cfg, state, EvalConfig(), "u")


def test_server_evaluates_sae_by_value(ray_session, tiny_harvest_cfg, tmp_path):
    from hsae.server import create_activation_server

    ray = ray_session
    server = create_activation_server(tiny_harvest_cfg, name="test-eval", cache_root=str(tmp_path), num_cpus=0,
                                      eval_cfg=SMALL, bank_cfg=BankConfig(max_forget=1000, max_retain=1000))
    cfg, state = identity_sae()
    out = ray.get(server.evaluate.remote(cfg, state))
    saebench = [g for g in out["unlearning"]["grid"] if g["grid"] == "saebench"]
    assert len(saebench) == 2 * 16 and {g["fold"] for g in saebench} == {"A", "B"}  # cross-fitted by default
    assert out["ce"]["ce_score_retain"] == pytest.approx(1.0, abs=1e-4)
    ray.kill(server)


def random_sae(seed, d=64, n=256):
    """A random ReLU SAE: features fire on part of every prompt, so its clamps re-run prompts."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, d, generator=g)
    state = {"W_enc": w.T.clone() / d**0.5, "b_enc": torch.zeros(n), "W_dec": w / w.norm(dim=1, keepdim=True),
             "b_dec": torch.zeros(d)}
    return SAEConfig("relu", d, n).to_dict(), {k: v.numpy() for k, v in state.items()}


@pytest.mark.slow  # three evaluations (≈ 12 s): in the full suite, out of the fast loop
def test_two_evaluators_give_one_evaluators_numbers_at_once(ray_session, tiny_harvest_cfg, tmp_path):
    # Evaluations on two threads (each with its model copy) return what one evaluator returns, SAE by SAE.
    from hsae.server import create_activation_server

    ray = ray_session
    saes = [random_sae(0), random_sae(1), identity_sae()]
    results = {}
    for evaluators in (1, 2):
        server = create_activation_server(tiny_harvest_cfg, name=f"test-eval-{evaluators}", cache_root=str(tmp_path),
                                          num_cpus=0, eval_cfg=SMALL, evaluators=evaluators,
                                          bank_cfg=BankConfig(max_forget=1000, max_retain=1000))
        ray.get(server.controls.remote())
        results[evaluators] = ray.get([server.evaluate.remote(cfg, state) for cfg, state in saes])
        ray.kill(server)
    def same(a, b):  # NaN (an edit ratio where nothing was edited) equal to NaN
        return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)

    for one, two in zip(results[1], results[2], strict=True):
        assert same(one["unlearning"]["grid"], two["unlearning"]["grid"])
        assert same(one["unlearning"]["random_feature_grid"], two["unlearning"]["random_feature_grid"])
        untimed = [{k: v for k, v in r["sparse_probe"]["columns"].items() if not k.endswith("_s")} for r in (one, two)]
        assert one["ce"] == two["ce"] and untimed[0] == untimed[1]
    assert any(g["questions_touched"] for g in results[2][0]["unlearning"]["grid"])


def test_answers_shared_between_settings_that_edit_a_prompt_alike_leave_every_number_unchanged(tiny_world,
                                                                                                 monkeypatch):
    # Settings whose selected features fire alike on a prompt edit it identically: with the memo its answer is
    # computed once, and the grid (accuracies, per-question outcomes, prompts touched) is what it was without.
    from hsae.evaluation.evaluator import sae_from_weights
    from hsae.evaluation.unlearning import firing_frequencies

    _, _, ev = tiny_world
    cfg, state = random_sae(0)
    sae = sae_from_weights(cfg, state)
    forget_freq, retain_freq = firing_frequencies(sae.encode, ev.select_x, ev.select_labels)
    settings = ev.cfg.unlearning.settings(sae.cfg.d_sae)
    chosen = {(s["retain_threshold"], s["n_features"]): select_features(forget_freq, retain_freq,
                                                                        s["retain_threshold"], s["n_features"])
              for s in settings}
    rerun = []
    answered = ev._answered
    monkeypatch.setattr(ev, "_answered", lambda b, rows, resid: rerun.append(len(rows)) or answered(b, rows, resid))
    grids = {}
    for name, memo in (("plain", None), ("memo", {})):
        rerun.clear()
        result = ev._clamp_grid(sae, settings, lambda s: chosen[(s["retain_threshold"], s["n_features"])], memo)
        grids[name] = (json.dumps(result.grid, sort_keys=True), sum(rerun))
    assert grids["memo"][0] == grids["plain"][0]
    assert 0 < grids["memo"][1] < grids["plain"][1]


def test_an_evaluator_replica_has_its_own_model(tiny_world):
    _, _, ev = tiny_world
    twin = ev.replica()
    assert twin.loaded.model is not ev.loaded.model and twin.loaded.lock is not ev.loaded.lock
    assert twin.bank is ev.bank and twin.batches is ev.batches
    for a, b in zip(twin.loaded.model.parameters(), ev.loaded.model.parameters(), strict=True):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()


def test_stopping_retain_early_keeps_the_score_and_forget_accuracy_exact(tiny_world):
    from dataclasses import replace

    from hsae.evaluation.interventions import ConditionalProjection

    loaded, bank, ev = tiny_world
    exact_cfg = replace(SMALL, unlearning=replace(SMALL.unlearning, stop_retain_early=False))
    fast_cfg = replace(SMALL, unlearning=replace(SMALL.unlearning, stop_retain_early=True))
    fast = Evaluator(loaded, bank, ev.select_x, ev.select_labels, np.zeros((1, 32), dtype=np.int64),
                     np.zeros(1, dtype=np.int64), fast_cfg)
    exact = Evaluator(loaded, bank, ev.select_x, ev.select_labels, np.zeros((1, 32), dtype=np.int64),
                      np.zeros(1, dtype=np.int64), exact_cfg)
    d = ev.batches[0]["resid"].shape[-1]
    direction = torch.nn.functional.normalize(torch.randn(d, generator=torch.Generator().manual_seed(0)), dim=0)
    wrecking = ConditionalProjection(direction, torch.zeros(d), threshold=-1e9, strength=50.0)
    def point(evaluator):
        from hsae.evaluation.unlearning import grid_point

        return grid_point({}, evaluator.accuracy(wrecking), ev.domains, ev.is_select)

    fast_point, exact_point = point(fast), point(exact)
    assert exact_point["retain_acc_exact"] and exact_point["retain_acc_select"] < 0.99  # the edit breaks retain
    assert not fast_point["retain_acc_exact"]  # retain questions were skipped: flagged
    for name in ("forget_acc", "forget_acc_select", "forget_acc_test"):
        assert fast_point[name] == exact_point[name]
    for name in ("retain_acc", "retain_acc_select", "retain_acc_test"):
        assert fast_point[name] >= exact_point[name]  # an upper bound
    assert fast_point["retain_acc"] < 0.99 and fast_point["retain_acc_select"] < 0.99  # still fails both bars
    assert unlearning_score([fast_point]) == unlearning_score([exact_point])


def test_letter_bank_keeps_only_questions_right_under_all_orderings(tiny_world):
    from hsae.evaluation.questions import answers_correct, keep_answered, letter_candidates

    loaded, _, _ = tiny_world
    rows = [{"question": "Which is a gene?", "choices": ["cell", "city", "king", "poem"], "answer": 0},
            {"question": "Which is a river?", "choices": ["gene", "virus", "river", "cell"], "answer": 2}]
    bank = letter_candidates(loaded.tokenizer, rows, FORGET, "biology")
    assert len(bank) == 48  # 24 orderings each
    assert sorted(bank.text[i]["question_id"] for i in range(48)) == [0] * 24 + [1] * 24
    # The answer letter follows the correct choice through every ordering.
    for i in range(48):
        text = loaded.tokenizer.decode(bank.prompts[i])
        right = "cell" if i < 24 else "river"
        assert f"{'ABCD'[bank.answer[i]]}. {right}\n" in text
    assert len({tuple(p) for p in bank.prompts}) == 48
    correct = answers_correct(loaded, bank)
    kept = keep_answered(bank, correct, BankConfig(max_forget=10, max_retain=10), group_size=24)
    expected = int(correct[:24].all()) + int(correct[24:].all())
    assert len(kept) == expected
