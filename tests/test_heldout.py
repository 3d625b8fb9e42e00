"""Held out by construction: nothing that evaluates an SAE comes from a document it trained on."""

import numpy as np
import pytest

from hsae.corpora import FORGET, RETAIN, CorpusSpec, is_forget_article, load_corpus, split_documents, split_table
from hsae.evaluation.questions import BankConfig, cloze_source


@pytest.mark.parametrize("description,forget", [
    ("an organization of workers", False), ("a general of the army", False), ("an organ of the body", True),
    ("the study of genes", True), ("a generator of wind power", False), ("a viral infection", True),
])
def test_biology_words_match_whole_words_only(description, forget):
    assert is_forget_article({"topic": "Uncategorized", "title": "X", "description": description}) is forget


def test_the_articles_the_prefix_pattern_mislabelled_are_retain():
    corpus = load_corpus(CorpusSpec("embedded"))
    domain = dict(zip(corpus["doc_id"], corpus["domain"], strict=True))
    for title in ("Trade union", "Military", "Political party", "Napoleon", "Wind power"):
        assert domain[title] == RETAIN, title


@pytest.mark.parametrize("name", ["embedded", "toy"])
def test_split_is_by_document_stratified_and_disjoint(name):
    corpus = load_corpus(CorpusSpec(name))
    train, held = split_documents(corpus, 0.4, seed=42)
    assert not set(train["doc_id"]) & set(held["doc_id"]) and len(train) + len(held) == len(corpus)
    for d in (FORGET, RETAIN):
        n = int((np.asarray(corpus["domain"]) == d).sum())
        assert int((np.asarray(held["domain"]) == d).sum()) == round(0.4 * n)
    table = split_table(corpus, 0.4, seed=42)
    assert set(table[table.part == "heldout"]["doc_id"]) == set(held["doc_id"])
    assert table["doc_id"].is_unique  # doc_id names one document


def _check_bank_is_held_out(tokenizer, corpus):
    train, held = split_documents(corpus, 0.4, seed=42)
    bank, _ = cloze_source(tokenizer, held, BankConfig(candidates_per_domain=10_000), list(train["text"]))()
    assert bank.count(FORGET) > 0 and bank.count(RETAIN) > 0
    train_ids, haystack = set(train["doc_id"]), "\n".join(train["text"])
    for text in bank.text:
        assert text["doc_id"] not in train_ids
        assert text["prompt"] not in haystack
    return bank


def test_toy_bank_questions_are_held_out():
    from hsae.models import byte_tokenizer

    _check_bank_is_held_out(byte_tokenizer(), load_corpus(CorpusSpec("toy")))


@pytest.mark.slow
def test_embedded_bank_questions_are_held_out_and_never_verbatim_in_training_text():
    from hsae.models import ModelSpec, load_tokenizer

    corpus = load_corpus(CorpusSpec("embedded"))
    bank = _check_bank_is_held_out(load_tokenizer(ModelSpec("embedded")), corpus)
    assert bank.count(FORGET) >= 150  # enough candidates to keep a bank after the model's correctness filter


def test_questions_inherit_the_role_of_their_held_out_document():
    from hsae.models import byte_tokenizer

    corpus = load_corpus(CorpusSpec("toy"))
    table = split_table(corpus, 0.4, seed=42)
    held = table[table.part == "heldout"]
    # Each domain's held-out documents split in halves; training documents have role "train".
    assert (table.loc[table.part == "train", "role"] == "train").all()
    for _, docs in held.groupby("domain"):
        assert abs((docs.role == "select").sum() - (docs.role == "test").sum()) <= 1
    train, held_docs = split_documents(corpus, 0.4, seed=42)
    role_of = dict(zip(table.doc_id, table.role, strict=True))
    bank, _ = cloze_source(byte_tokenizer(), held_docs, BankConfig(candidates_per_domain=10_000),
                           list(train["text"]), role_of)()
    assert bank.role == [role_of[t["doc_id"]] for t in bank.text]
    for d in (FORGET, RETAIN):
        assert bank.count(d, "select") > 0 and bank.count(d, "test") > 0
    with pytest.raises(ValueError, match="held-out documents"):  # a training document has no held-out role
        cloze_source(byte_tokenizer(), corpus, BankConfig(), (), role_of)()
