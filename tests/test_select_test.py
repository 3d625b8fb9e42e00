"""Selection on one part, measurement on another (docs/evaluation.md, "Select and test").

Held-out documents are split into select and test halves. Fold A's features and the control directions read only
select documents' activations, fold B's features only test documents'; the grid setting that meets a retain bar is
chosen on one part of the questions and its accuracy read on the other, both ways round (fold A chooses among its
own grid's settings on select questions and reads test questions, fold B the reverse), and a trial's value is the
mean of both. These tests prove it on the tiny profile's evaluator as a sweep builds it, with a spy on the selection
step and with each part's questions poisoned in turn.
"""

from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from hsae.config import SAEConfig
from hsae.corpora import FORGET, RETAIN, load_corpus, split_table
from hsae.evaluation.questions import QuestionBank, questions_table, require_bank_sizes
from hsae.scoring import area_select_test, matched_retain_select_test
from tests.helpers import served_evaluator

PROFILE = "tiny"


# -- the rule, as a pure function ---------------------------------------------------------------------
def test_setting_is_chosen_on_select_questions_and_reported_on_test_questions():
    forget_sel = [0.40, 0.30, 0.30, 0.10]
    retain_sel = [0.99, 0.995, 0.999, 0.90]  # the last removes most but fails the bar on select questions
    forget_test = [0.50, 0.60, 0.70, 0.00]
    retain_test = [0.98, 0.97, 0.96, 1.00]
    # Lowest select forget among select retain >= 0.99: settings 1 and 2 tie at 0.30; the higher select retain
    # (setting 2) wins; its *test* accuracies are reported.
    assert matched_retain_select_test(forget_sel, retain_sel, forget_test, retain_test, 0.99) == (0.70, 0.96)
    assert matched_retain_select_test(forget_sel, retain_sel, forget_test, retain_test, 0.90) == (0.00, 1.00)
    forget, retain = matched_retain_select_test(forget_sel, retain_sel, forget_test, retain_test, 0.9999)
    assert np.isnan(forget) and np.isnan(retain)  # nothing meets the bar on select questions


def test_the_rule_reads_test_accuracies_only_to_report_them():
    rng = np.random.default_rng(0)
    ids = np.arange(12, dtype=float)
    for _ in range(200):
        f_sel, r_sel = rng.choice([0.2, 0.5, 0.8, 1.0], 12), rng.choice([0.9, 0.95, 0.99, 1.0], 12)
        chosen, _ = matched_retain_select_test(f_sel, r_sel, ids, ids, 0.95)  # which setting is chosen
        f_test, r_test = rng.random(12), rng.random(12)
        got = matched_retain_select_test(f_sel, r_sel, f_test, r_test, 0.95)
        assert got == (f_test[int(chosen)], r_test[int(chosen)])  # whatever the test numbers are


def test_the_rule_on_resamples_is_the_rule_per_resample():
    rng = np.random.default_rng(1)
    f_sel, r_sel, f_test, r_test = (rng.choice([0.5, 0.9, 0.97, 0.99, 1.0], (6, 30)) for _ in range(4))
    forget, retain = matched_retain_select_test(f_sel, r_sel, f_test, r_test, 0.97)
    for b in range(30):
        one = matched_retain_select_test(f_sel[:, b], r_sel[:, b], f_test[:, b], r_test[:, b], 0.97)
        np.testing.assert_equal((forget[b], retain[b]), one)


def test_frontier_area_chooses_each_level_on_select_questions():
    # Setting 0 keeps retain 1.0 on select questions, setting 1 only 0.95. Levels 0.900..0.950 (11 of 21) choose
    # setting 1 (test forget 0.2: removal 0.8), the 10 levels above choose setting 0 (test forget 0.5: 0.5).
    got = area_select_test([0.4, 0.3], [1.0, 0.95], [0.5, 0.2])
    assert got == pytest.approx((11 * 0.8 + 10 * 0.5) / 21)


def test_a_bank_without_enough_test_questions_is_refused():
    bank = QuestionBank([[1]] * 20, [[[2], [3]]] * 20, [0] * 20, [FORGET] * 10 + [RETAIN] * 10,
                        [{"doc_id": str(i)} for i in range(20)], role=["select"] * 20)
    with pytest.raises(ValueError, match="test part"):
        require_bank_sizes(bank, 10, 10)
    with pytest.raises(ValueError, match="role"):
        replace(bank, role=[]).is_select()


# -- the tiny profile's evaluator, as a sweep builds it ------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_session):
    from hsae.activations import harvest
    from hsae.profiles import get_profile

    root = tmp_path_factory.mktemp("cache")
    ev = served_evaluator(PROFILE, root)
    cfg = get_profile(PROFILE).harvest
    return ev, harvest(cfg, root=root, progress=None), cfg, root


def identity_sae(d: int):
    eye = torch.eye(d)
    state = {"W_enc": torch.cat([eye, -eye], 1), "b_enc": torch.zeros(2 * d),
             "W_dec": torch.cat([eye, -eye], 0), "b_dec": torch.zeros(d)}
    return SAEConfig("relu", d, 2 * d).to_dict(), {k: v.numpy() for k, v in state.items()}


def test_questions_and_contexts_carry_their_documents_role(world):
    from hsae.activations import Harvester

    ev, h, cfg, root = world
    split = split_table(load_corpus(cfg.corpus), cfg.holdout_fraction, cfg.seed)
    role_of = dict(zip(split["doc_id"], split["role"], strict=True))
    assert set(split.loc[split["part"] == "heldout", "role"]) == {"select", "test"}
    assert (split.loc[split["part"] == "train", "role"] == "train").all()
    table = pd.DataFrame(questions_table(ev.bank))
    assert (table["role"] == table["doc_id"].map(role_of)).all()  # every question inherits its document's role
    for domain in ("forget", "retain"):
        assert set(table.loc[table["domain"] == domain, "role"]) == {"select", "test"}
    # Every held-out context is packed from documents of one role, the role it is recorded with.
    harvester = Harvester(cfg, root, progress=None)
    doc_rows, docs = harvester.context_documents("eval")
    context_roles = harvester.cache.context_roles("eval")
    assert set(context_roles) == {"select", "test"}
    for roles_of_context, rows in zip(context_roles, doc_rows, strict=True):
        assert {role_of[docs[int(r)]["doc_id"]] for r in rows if r >= 0} == {roles_of_context}
    assert set(h.row_roles("eval")) == {"select", "test"}


def test_each_folds_selection_reads_only_its_documents_activations_and_ce_only_test_contexts(world):
    ev, h, cfg, _ = world
    x, labels = h.arrays("eval")
    content = ~np.isin(h.token_ids("eval"), [t for t in (ev.loaded.info.bos_id, ev.loaded.info.eos_id)
                                             if t is not None])
    select = content & (h.row_roles("eval") == "select")
    assert 0 < select.sum() < content.sum()  # test rows exist, and none of them is handed to fold A's selection
    np.testing.assert_array_equal(np.asarray(ev.select_x), x[select])
    np.testing.assert_array_equal(ev.select_labels, labels[select])
    test = content & (h.row_roles("eval") == "test")  # fold B's selection: the test documents' rows, and only them
    np.testing.assert_array_equal(np.asarray(ev.test_x), x[test])
    np.testing.assert_array_equal(ev.test_labels, labels[test])
    tokens = np.load(h.dir / "tokens_eval.npy")
    roles = np.asarray(["select", "test"], dtype=object)[np.load(h.dir / "roles_eval.npy") - 1]
    test_contexts = {t.tobytes() for t in tokens[roles == "test"]}
    for data in ev.ce_sets.values():
        assert all(row.numpy().tobytes() in test_contexts for row in data["ids"])


FOLD_PARTS = {"A": ("select", "test"), "B": ("test", "select")}  # fold -> (the part it chooses on, scores on)


def part_columns(part: str) -> tuple[str, str]:
    return f"forget_acc_{part}", f"retain_acc_{part}"


@pytest.mark.parametrize("poisoned_part", ["test", "select"])
def test_no_choice_reads_the_questions_that_score_it(world, monkeypatch, poisoned_part):
    """Poison every question of one part (a wrong answer key) and spy on the firing frequencies. Fold A chooses its
    features on select documents and its setting on select questions and scores on test ones, fold B the reverse:
    whichever part is poisoned, the features, the other part's accuracies and the setting chosen on it (by the fold
    that scores on the poisoned part) do not move; only the poisoned part's numbers do."""
    import hsae.evaluation.evaluator as evaluator_module
    from hsae.evaluation.evaluator import Evaluator
    from hsae.results import evaluation_values
    from hsae.scoring import crossfit

    ev, h, _, _ = world
    seen: list[np.ndarray] = []
    real = evaluator_module.firing_frequencies

    def spy(encode, x, labels, *args, **kwargs):
        seen.append(np.asarray(x[np.arange(len(labels))]))
        return real(encode, x, labels, *args, **kwargs)

    monkeypatch.setattr(evaluator_module, "firing_frequencies", spy)
    poison = ev.bank.is_select() == (poisoned_part == "select")
    poisoned_answers = [(a + 1) % len(o) if t else a for a, o, t in zip(ev.bank.answer, ev.bank.options, poison,
                                                                         strict=True)]
    poisoned = Evaluator(ev.loaded, replace(ev.bank, answer=poisoned_answers), ev.select_x, ev.select_labels,
                         np.zeros((1, 8), dtype=np.int64), np.zeros(1, dtype=np.int64), ev.cfg,
                         test_x=ev.test_x, test_labels=ev.test_labels)
    cfg, state = identity_sae(ev.batches[0]["resid"].shape[-1])
    clean_out, bad_out = ev.unlearning(cfg, state), poisoned.unlearning(cfg, state)
    # Each evaluator that selected (the clean one may answer from its cache) chose fold A's features from select
    # documents' activations and fold B's from test documents', never from anything else.
    assert seen and len(seen) % 2 == 0
    for fold_a, fold_b in zip(seen[::2], seen[1::2], strict=True):
        assert np.array_equal(fold_a, np.asarray(ev.select_x)) and np.array_equal(fold_b, np.asarray(ev.test_x))
    assert not np.array_equal(np.asarray(ev.select_x), np.asarray(ev.test_x))
    clean, bad = pd.DataFrame(clean_out["grid"]), pd.DataFrame(bad_out["grid"])
    assert sorted(set(clean["fold"])) == ["A", "B"]
    other = "select" if poisoned_part == "test" else "test"
    for column in ("fold", "features_selected", *part_columns(other)):
        pd.testing.assert_series_equal(clean[column], bad[column])
    assert not np.allclose(clean[f"forget_acc_{poisoned_part}"], bad[f"forget_acc_{poisoned_part}"])  # it reached them
    for fold in ("A", "B"):
        mine = [g[g["fold"] == fold] for g in (clean, bad)]
        ids = np.arange(len(mine[0]), dtype=float)
        for bar in (0.99, 0.98, 0.95, 0.5):
            pick = [matched_retain_select_test(*(g[c] for c in part_columns(other)), ids, ids, bar)[0] for g in mine]
            np.testing.assert_equal(pick[0], pick[1])
    # The rows follow the rule: each fold's value is the forget accuracy, on its scoring part, of the setting chosen
    # (among its own grid's settings) on its choosing part; the row holds the mean of both folds.
    for out, g in ((clean_out, clean), (bad_out, bad)):
        values = evaluation_values({"unlearning": out}, 1.0)
        folds = [matched_retain_select_test(*(g.loc[g["fold"] == fold, c] for c in (*part_columns(chooses),
                                                                                   *part_columns(scores))), 0.95)[0]
                 for fold, (chooses, scores) in FOLD_PARTS.items()]
        expect = crossfit(*folds)
        assert values["forget_acc_at_retain95"] == (None if np.isnan(expect) else pytest.approx(expect))
    # The positive control's direction and thresholds come from select activations, not from any answer key.
    clean_pos, bad_pos = (pd.DataFrame(e.controls()["positive"]["grid"]) for e in (ev, poisoned))
    for column in part_columns(other):
        pd.testing.assert_series_equal(clean_pos[column], bad_pos[column])


def test_row_values_recompute_from_grid_and_question_roles(world):
    """grid.parquet's per-question outcomes and probabilities and questions.parquet's roles give back every
    matched-retain value and frontier area of the trial row (what the report's verdict recomputes), each fold's setting
    chosen on one part and read on the other; the probability columns recompute exactly from their stored integers."""
    from hsae import schema
    from hsae.results import evaluation_values, grid_rows, typed_frame
    from hsae.scoring import P_SCALE, area_select_test, crossfit, decode_p

    ev, _, _, _ = world
    cfg, state = identity_sae(ev.batches[0]["resid"].shape[-1])
    out = {"unlearning": ev.unlearning(cfg, state)}
    frame = typed_frame(grid_rows("t", out), schema.GRID_COLUMNS)
    grid, baseline = frame[frame["control"] == "sae"], frame[frame["control"] == "baseline"].iloc[0]
    questions = typed_frame(questions_table(ev.bank), schema.QUESTION_COLUMNS)

    def mask(name: str, select: bool) -> np.ndarray:
        mine = questions[questions["domain"] == name].sort_values("question_id")
        return (mine["role"] == "select").to_numpy() == select

    def accuracies(rows: pd.DataFrame, name: str, select: bool) -> np.ndarray:
        correct = np.array([[c == "1" for c in s] for s in rows[f"{name}_correct"]])
        return correct[:, mask(name, select)].mean(axis=1)

    def shares(rows: pd.DataFrame, name: str, select: bool) -> np.ndarray:  # mean p kept, as the unmodified model's
        q, q0 = decode_p(rows[f"{name}_p_correct"]), decode_p([baseline[f"{name}_p_correct"]])[0]
        m = mask(name, select)
        return q[:, m].sum(axis=1) / (P_SCALE * m.sum()) / (q0[m].sum() / (P_SCALE * m.sum()))

    def parts(fold: str, of: Any) -> list[np.ndarray]:
        """(choose forget, choose retain, score forget, score retain) of the fold's own grid rows."""
        rows, chooses = grid[grid["fold"] == fold], fold == "A"  # A chooses on select questions, B on test ones
        return [of(rows, "forget", chooses), of(rows, "retain", chooses), of(rows, "forget", not chooses),
                of(rows, "retain", not chooses)]

    assert sorted(set(grid["fold"])) == ["A", "B"]
    values = evaluation_values(out, 1.0)
    for kind, of in (("acc", accuracies), ("p", shares)):
        by_fold = {fold: parts(fold, of) for fold in ("A", "B")}
        for bar in (0.99, 0.98, 0.95):
            expect = crossfit(*(matched_retain_select_test(*p, bar)[0] for p in by_fold.values()))
            got = values[f"forget_{kind}_at_retain{round(bar * 100)}"]
            assert (got is None and np.isnan(expect)) or got == pytest.approx(expect)
        expect = crossfit(*(area_select_test(p[0], p[1], p[2]) for p in by_fold.values()))
        assert values["frontier_area" if kind == "acc" else "frontier_area_p"] == pytest.approx(expect)
    for select in (True, False):
        for name in ("forget", "retain"):  # the row's accuracies, from the outcomes
            column = f"{name}_acc_{'select' if select else 'test'}"
            np.testing.assert_allclose(grid[column].to_numpy(float), accuracies(grid, name, select))
    for name, select in (("forget", True), ("retain", True), ("forget", False), ("retain", False)):
        column = f"{name}_p_{'select' if select else 'test'}"
        q = decode_p(frame[f"{name}_p_correct"])[:, mask(name, select)]
        assert (frame[column].to_numpy(float) == q.sum(axis=1) / (P_SCALE * q.shape[1])).all()  # exactly


def test_cache_keys_change_with_the_rule(monkeypatch):
    import hsae.activations as activations
    import hsae.evaluation.evaluator as evaluator_module
    from hsae.activations import HarvestConfig, harvest_key
    from hsae.evaluation.evaluator import EvalConfig, eval_cache_key
    from hsae.models import ModelSpec

    cfg, state = identity_sae(8)
    before = eval_cache_key(cfg, state, EvalConfig(), "u")
    monkeypatch.setattr(evaluator_module, "EVAL_FORMAT", evaluator_module.EVAL_FORMAT - 1)
    assert eval_cache_key(cfg, state, EvalConfig(), "u") != before
    harvest_cfg = HarvestConfig(model=ModelSpec("tiny"), n_eval_ctxs=8)
    key = harvest_key(harvest_cfg)
    monkeypatch.setattr(activations, "FORMAT_VERSION", activations.FORMAT_VERSION - 1)
    assert harvest_key(harvest_cfg) != key


def test_each_folds_features_come_from_its_own_documents_activations(world):
    """Cross-fitting at the evaluator: scrambling the test documents' activation labels (what chooses fold B's
    features) changes fold B's grid and leaves fold A's row for row; an evaluator without test activations (or with
    EvalConfig.crossfit off) builds fold A's grid alone."""
    from hsae.evaluation.evaluator import Evaluator

    ev, _, _, _ = world
    rng = np.random.default_rng(0)
    scrambled = Evaluator(ev.loaded, ev.bank, ev.select_x, ev.select_labels, np.zeros((1, 8), dtype=np.int64),
                          np.zeros(1, dtype=np.int64), ev.cfg, test_x=ev.test_x,
                          test_labels=rng.permutation(ev.test_labels))
    cfg, state = identity_sae(ev.batches[0]["resid"].shape[-1])
    clean, dirty = (pd.DataFrame(e.unlearning(cfg, state)["grid"]) for e in (ev, scrambled))
    a, b = (clean["fold"] == "A").to_numpy(), (clean["fold"] == "B").to_numpy()
    assert a.sum() == b.sum() > 0
    kept = ["features_selected", *part_columns("select"), *part_columns("test"), "forget_correct", "retain_correct"]
    pd.testing.assert_frame_equal(clean.loc[a, kept], dirty.loc[a, kept])
    assert not clean.loc[b, kept].equals(dirty.loc[b, kept])
    single = Evaluator(ev.loaded, ev.bank, ev.select_x, ev.select_labels, np.zeros((1, 8), dtype=np.int64),
                       np.zeros(1, dtype=np.int64), replace(ev.cfg, crossfit=False), test_x=ev.test_x,
                       test_labels=ev.test_labels)
    only_a = pd.DataFrame(single.unlearning(cfg, state)["grid"])
    assert set(only_a["fold"]) == {"A"}
    pd.testing.assert_frame_equal(only_a[kept], clean.loc[a, kept].reset_index(drop=True))
