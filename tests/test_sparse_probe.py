"""k-sparse probing (hsae.evaluation.sparse_probe): planted topics, no peeking at test documents, the
harvest-to-document plumbing, and the server's per-SAE answer on the tiny model."""

from dataclasses import replace

import numpy as np
import pytest

from hsae import schema
from hsae.corpora import FORGET, RETAIN
from hsae.evaluation import sparse_probe as sp

D_IN, N_TOPICS, DOCS_PER_TOPIC, TOKENS = 48, 6, 24, 12


def planted_documents(seed: int = 0) -> tuple[sp.HeldoutDocuments, np.ndarray]:
    """Documents of N_TOPICS planted topics, each a unit direction, under token noise that is large off the
    topic directions (a random direction mostly reads the noise) and small on them; topic 0 is the forget
    domain. Returns the documents and the topic directions."""
    rng = np.random.default_rng(seed)
    directions = np.linalg.qr(rng.normal(size=(D_IN, N_TOPICS)))[0].T  # orthonormal rows
    n_docs = N_TOPICS * DOCS_PER_TOPIC
    topic_of = np.repeat(np.arange(N_TOPICS), DOCS_PER_TOPIC)
    doc_of_row = np.repeat(np.arange(n_docs), TOKENS)
    noise = rng.normal(size=(len(doc_of_row), D_IN))
    off_topic = 4.0 * (noise - noise @ directions.T @ directions) + 0.3 * noise
    rows = off_topic + 3.0 * directions[topic_of[doc_of_row]]
    role = np.where(np.arange(n_docs) % 2 == 0, "select", "test").astype(object)
    docs = sp.HeldoutDocuments(rows.astype(np.float32), doc_of_row, np.array([f"d{i}" for i in range(n_docs)]),
                               np.where(topic_of == 0, FORGET, RETAIN), np.array([f"t{t}" for t in topic_of]), role)
    return docs, directions


def relu_encoder(weights: np.ndarray):
    return lambda x: np.maximum(x @ weights, 0.0)


def aligned_and_random(docs: sp.HeldoutDocuments, directions: np.ndarray, n_latents: int = 96):
    rng = np.random.default_rng(1)
    aligned = np.concatenate([directions.T, rng.normal(size=(D_IN, n_latents - N_TOPICS)) / np.sqrt(D_IN)], axis=1)
    random = rng.normal(size=(D_IN, n_latents)) / np.sqrt(D_IN)
    return (sp.encode_pooled(relu_encoder(aligned), docs, 1000), sp.encode_pooled(relu_encoder(random), docs, 1000))


def test_a_dictionary_aligned_with_planted_topics_scores_near_one_and_beats_a_random_one():
    docs, directions = planted_documents()
    aligned, random = aligned_and_random(docs, directions)
    cfg = sp.ProbeConfig()
    good = sp.sparse_probe(aligned, docs, cfg).columns
    bad = sp.sparse_probe(random, docs, cfg).columns
    assert good["sparse_probe_tasks"] == N_TOPICS + 1  # the forget task and the six topics
    assert good["sparse_probe_forget_k1"] >= 0.95 and good["sparse_probe_mean_k1"] >= 0.95
    assert good["sparse_probe_mean_k1"] - bad["sparse_probe_mean_k1"] >= 0.2
    # the references: the raw ceiling separates the planted topics; random latents of the aligned SAE do not
    assert good["sparse_probe_raw_mean"] >= 0.95
    assert good["sparse_probe_random_mean_k1"] <= good["sparse_probe_mean_k1"] - 0.2


def test_the_probe_never_reads_a_test_document_before_scoring(monkeypatch):
    docs, directions = planted_documents()
    aligned, _ = aligned_and_random(docs, directions)
    fitted = []
    real_fit = sp.fit_logistic

    def spy(*args, **kwargs):
        probe = real_fit(*args, **kwargs)
        fitted.append(probe)
        return probe

    monkeypatch.setattr(sp, "fit_logistic", spy)
    cfg = sp.ProbeConfig(random_draws=1)
    before = sp.sparse_probe(aligned, docs, cfg)
    probes_before, fitted[:] = list(fitted), []
    # Scramble every test document: its features, its rows (the raw ceiling) and its topic label.
    test = docs.role == "test"
    rng = np.random.default_rng(7)
    scrambled = aligned.copy()
    scrambled[test] = rng.permutation(scrambled[test], axis=1) * 5.0
    rows = docs.rows.copy()
    on_test = test[docs.doc_of_row]
    rows[on_test] = rng.normal(size=(int(on_test.sum()), D_IN))
    topic = docs.topic.copy()
    topic[test] = rng.permutation(topic[test])
    altered = sp.HeldoutDocuments(rows, docs.doc_of_row, docs.doc_ids, docs.domain, topic, docs.role)
    after = sp.sparse_probe(scrambled, altered, cfg)
    chosen = [(g["task"], g["k"], g["latents"]) for g in before.grid if g["features"] == "sae"]
    assert chosen == [(g["task"], g["k"], g["latents"]) for g in after.grid if g["features"] == "sae"]
    assert len(probes_before) == len(fitted) > 0
    for a, b in zip(probes_before, fitted, strict=True):
        np.testing.assert_array_equal(a.weights, b.weights)
        assert a.bias == b.bias
    assert before.columns["sparse_probe_mean_k1"] != after.columns["sparse_probe_mean_k1"]  # test docs do count


def test_top_k_by_mean_difference_and_balanced_accuracy_by_hand():
    features = np.array([[0.0, 1.0, 5.0], [0.0, 1.0, 0.0], [0.0, 3.0, 0.0], [0.0, 3.0, 1.0]])
    y = np.array([True, True, False, False])
    np.testing.assert_array_equal(sp.top_k_by_mean_difference(features, y, 2), [1, 2])  # |-2| and |2|: lower first
    assert sp.top_k_by_mean_difference(features, y, 10).tolist() == [1, 2, 0]
    truth = np.array([True, False, False, False])
    assert sp.balanced_accuracy(truth, np.array([True, True, False, False])) == pytest.approx(0.5 * (1 + 2 / 3))
    assert sp.balanced_accuracy(truth, np.zeros(4, dtype=bool)) == 0.5  # all-negative: chance, not 0.75


def test_logistic_probe_separates_a_separable_set_with_class_balanced_weights():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(2.0, 1.0, size=(10, 3)), rng.normal(-2.0, 1.0, size=(90, 3))])
    y = np.arange(100) < 10
    probe = sp.fit_logistic(x, y, l2=1e-2)
    assert sp.balanced_accuracy(y, probe.predict(x)) >= 0.95


def test_tasks_need_documents_of_both_classes_in_both_roles():
    docs, _ = planted_documents()
    assert set(sp.probe_tasks(docs, 2)) == {"forget", *(f"t{t}" for t in range(N_TOPICS))}
    assert sp.probe_tasks(docs, DOCS_PER_TOPIC) == {}  # 12 per topic and role: none reaches 24
    no_topics = docs.with_roles(docs.role)
    object.__setattr__(no_topics, "topic", np.array([""] * docs.n_docs))
    assert set(sp.probe_tasks(no_topics, 2)) == {"forget"}


def test_split_noise_redraws_stratified_halves_and_reports_a_spread():
    docs, directions = planted_documents()
    _, random = aligned_and_random(docs, directions)
    roles = sp.redrawn_roles(docs.domain, seed=3)
    assert not np.array_equal(roles, sp.redrawn_roles(docs.domain, seed=4))
    for d in (RETAIN, FORGET):
        assert abs((roles[docs.domain == d] == "select").sum() - (roles[docs.domain == d] == "test").sum()) <= 1
    noise = sp.split_noise(random, docs, sp.ProbeConfig(random_draws=1), n_splits=3)
    assert noise["sparse_probe_mean_k1"]["splits"] == 3 and noise["sparse_probe_mean_k1"]["sd"] > 0
    with pytest.raises(ValueError, match="n_splits"):
        sp.split_noise(random, docs, sp.ProbeConfig(), n_splits=1)


def test_rows_are_placed_back_at_their_positions_when_sinks_were_dropped():
    positions = np.array([5, 7, 7, 9, 2])
    np.testing.assert_array_equal(sp.row_positions(positions, np.array([5, 7, 9, 2])), [0, 1, 3, 4])
    np.testing.assert_array_equal(sp.row_positions(positions, positions), np.arange(5))
    with pytest.raises(ValueError, match="subsequence"):
        sp.row_positions(positions, np.array([9, 5]))


def test_documents_from_harvest_pools_a_document_across_contexts_and_drops_special_tokens():
    bos, eos = 100, 101
    # two contexts of 5 tokens: doc 0 spans both (cut at the context edge), then doc 2; doc 1 is never packed
    contexts = np.array([[bos, 1, 2, 3, 4], [bos, 5, eos, 6, 7]])
    doc_rows = np.array([[-1, 0, 0, 0, 0], [-1, 0, 0, 2, 2]])
    x = np.arange(8, dtype=np.float32)[:, None] * np.ones((1, 2), dtype=np.float32)
    tokens = contexts[:, 1:].reshape(-1)
    corpus = sp.CorpusDocuments(np.array(["a", "b", "c"]), np.array([RETAIN, FORGET, FORGET]),
                                np.array(["", "", ""]), np.array(["select", "test", "test"], dtype=object))
    docs = sp.documents_from_harvest([(x[:4], tokens[:4]), (x[4:], tokens[4:])], contexts, doc_rows, 1,
                                     [bos, eos], corpus)
    assert docs.doc_ids.tolist() == ["a", "c"] and docs.role.tolist() == ["select", "test"]
    np.testing.assert_allclose(docs.raw[:, 0], [np.mean([0, 1, 2, 3, 4]), np.mean([6, 7])])  # the EOS row (5) dropped


def test_row_columns_are_declared_in_the_schema_and_documented():
    from tests.test_schema import _documented_names

    assert set(sp.ROW_COLUMNS) <= set(schema.TRIAL_COLUMN_NAMES)
    missing = [c for c in (*sp.ROW_COLUMNS, *(c.name for c in schema.PROBE_COLUMNS)) if c not in _documented_names()]
    assert not missing


def test_bad_documents_name_the_field():
    docs, _ = planted_documents()
    with pytest.raises(ValueError, match="role"):
        docs.with_roles(np.array(["train"] * docs.n_docs, dtype=object))
    with pytest.raises(ValueError, match="ks"):
        sp.ProbeConfig(ks=(0,))
    with pytest.raises(ValueError, match="latents"):
        sp.sparse_probe(np.zeros((3, 4)), docs, sp.ProbeConfig())


def test_server_probes_one_sae_on_held_out_documents(ray_session, tiny_harvest_cfg, tmp_path):
    import torch

    from hsae.config import SAEConfig
    from hsae.server import ActivationServer

    cfg = replace(tiny_harvest_cfg, n_eval_ctxs=128)  # the toy documents are ~270 tokens: enough of them
    server = ActivationServer(cfg, cache_root=str(tmp_path))
    docs = server.heldout_documents()
    info, harvest = server.prepare().model, server.harvester.run(("eval",))
    x, labels = harvest.arrays("eval")
    content = ~np.isin(harvest.token_ids("eval"), [info.bos_id, info.eos_id])
    x, labels = x[content], labels[content]
    np.testing.assert_array_equal(docs.rows, x)  # every content row (no BOS / EOS), in harvest order
    np.testing.assert_array_equal(docs.domain[docs.doc_of_row], labels)  # a row's document has its domain
    assert set(docs.role) == {"select", "test"}
    d = server.prepare().model.d_model
    torch.manual_seed(0)
    state = {"W_enc": torch.randn(d, 64), "b_enc": torch.zeros(64), "W_dec": torch.randn(64, d),
             "b_dec": torch.zeros(d)}
    answer = server.sparse_probe(SAEConfig("relu", d, 64).to_dict(), {k: v.numpy() for k, v in state.items()})
    assert set(answer["columns"]) == set(sp.ROW_COLUMNS)
    assert {g["features"] for g in answer["grid"]} == {"sae", "random", "raw"}
    assert 0.0 <= answer["columns"]["sparse_probe_forget_k1"] <= 1.0  # a number (NaN fails)
    # The unit path on the same documents: this ReLU SAE's latents by hand (zero biases: relu(x W_enc)), pooled per
    # document, probed with the default config, the raw ceiling computed afresh rather than read from the server.
    w_enc = state["W_enc"].numpy()
    expected = sp.sparse_probe(sp.encode_pooled(lambda rows: np.maximum(rows @ w_enc, 0.0), docs, 1000), docs,
                               sp.ProbeConfig())
    timing = "sparse_probe_s"  # seconds the probe took: the one column that is not a function of the inputs
    assert set(answer["columns"]) == set(expected.columns)
    for name, value in expected.columns.items():
        if name != timing:
            assert answer["columns"][name] == pytest.approx(value, rel=1e-6, abs=1e-9, nan_ok=True), name
    assert len(answer["grid"]) == len(expected.grid) and expected.columns["sparse_probe_tasks"] >= 1
    for got, want in zip(answer["grid"], expected.grid, strict=True):
        assert {k: v for k, v in got.items() if k != "accuracy"} == {k: v for k, v in want.items() if k != "accuracy"}
        assert got["accuracy"] == pytest.approx(want["accuracy"], rel=1e-6, nan_ok=True), got
