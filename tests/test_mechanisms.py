"""Each variant's mechanism seen working on planted data (groups and domains known by construction).

These read the same curves the report plots (``Trainer.history``: the held-out diagnostics and the
variants' ``mechanism_metrics``), so a mechanism that stops acting fails here before it flattens a figure.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hsae.config import SAEConfig, TrainConfig
from hsae.synthetic import grouped_dictionary_data
from hsae.train import ArrayBatches, Trainer, to_batch
from hsae.variants.fixed_ortho import FixedOrthoSAE
from tests.helpers import SMALL_PARAMS

D_IN, D_SAE, BATCH = 32, 256, 256


@pytest.fixture(scope="module")
def planted():
    return grouped_dictionary_data(12_288, d=D_IN, seed=1)


def train_planted(data, variant, steps=150, lr=3e-3, log_every=10, **params):
    cfg = SAEConfig(variant, D_IN, D_SAE, {**SMALL_PARAMS.get(variant, {}), **params})
    trainer = Trainer(cfg, TrainConfig(steps=steps, batch_size=BATCH, lr=lr, log_every=log_every))
    n_train = len(data.x) - 2048
    trainer.fit(ArrayBatches(data.x[:n_train], data.labels[:n_train], BATCH, 42),
                eval_batch=to_batch(data.x[n_train:], data.labels[n_train:]))
    return trainer


def curve(trainer, name):
    return [h[name] for h in trainer.history if np.isfinite(h.get(name, np.nan))]


def test_orthogonality_lowers_held_out_inter_group_correlation_against_alpha_zero(planted):
    free = train_planted(planted, "fixed_ortho", alpha=0.0)
    penalised = train_planted(planted, "fixed_ortho", alpha=1.0)
    assert curve(penalised, "val_inter_group_correlation")[-1] < 0.8 * curve(free, "val_inter_group_correlation")[-1]


def test_adaptive_regrouping_moves_features_and_lowers_the_penalty(planted):
    trainer = train_planted(planted, "adaptive_ortho", steps=100, log_every=25, regroup_every=25)
    moved, ratio = curve(trainer, "regroup_moved"), curve(trainer, "regroup_penalty_ratio")
    assert len(moved) == 4 and all(m > 0 for m in moved), moved
    # Every regroup put co-firing features together: the cross-group coupling of its sample fell (a
    # random reshuffle leaves it at about 1).
    assert all(r < 0.995 for r in ratio) and min(ratio) < 0.98, ratio


def test_dynamic_assignment_moves_off_uniform(planted):
    trainer = train_planted(planted, "dynamic_hier", steps=200, log_every=20)
    entropy = curve(trainer, "assignment_entropy")
    assert entropy[-1] < 0.5 * entropy[0], entropy


def test_contrastive_training_separates_domains_in_group_codes(planted):
    trainer = train_planted(planted, "contrastive_hier", nce_weight=1.0)
    without = train_planted(planted, "contrastive_hier", nce_weight=0.0)
    nce = curve(trainer, "val_nce")
    assert nce[-1] < nce[0] - 0.05, nce
    assert nce[-1] < curve(without, "val_nce")[-1] - 0.05


def test_static_hierarchy_keeps_features_with_their_parent(planted):
    hierarchy = train_planted(planted, "static_hier", alpha_l1=1.0, alpha_l2=0.0)
    flat = train_planted(planted, "static_hier", alpha_l1=0.0, alpha_l2=0.0)

    def cross_over_sibling(trainer):
        return curve(trainer, "val_cross_parent_rms")[-1] / curve(trainer, "val_sibling_rms")[-1]

    # Co-activation moves inside parents: across parents it falls relative to across siblings.
    assert cross_over_sibling(hierarchy) < 0.8 * cross_over_sibling(flat)


def test_gram_regroup_and_nce_sample_is_uniform_over_the_batch(monkeypatch):
    """The sample behind Gram matrices, regrouping and InfoNCE (``gram_rows``) reaches every row of a batch,
    each about equally often, although the batch source hands rows over in sorted order."""
    n, k, steps = 512, 64, 200
    x = np.random.default_rng(0).standard_normal((n, D_IN)).astype(np.float32)
    x[:, 0] = np.arange(n)  # a marker: the row's position in the batch the source gives
    seen: list[np.ndarray] = []
    step_x: list[torch.Tensor] = []
    structure_terms, gram_rows = FixedOrthoSAE.structure_terms, FixedOrthoSAE.gram_rows

    def record_x(self, x, f, labels, step):
        step_x.append(x)
        return structure_terms(self, x, f, labels, step)

    def record_rows(self, f):
        rows = gram_rows(self, f)
        position = [int((f == r).all(dim=1).nonzero()[0]) for r in rows]
        seen.append(step_x[-1][position, 0].detach().round().long().numpy())
        return rows

    monkeypatch.setattr(FixedOrthoSAE, "structure_terms", record_x)
    monkeypatch.setattr(FixedOrthoSAE, "gram_rows", record_rows)
    cfg = SAEConfig("fixed_ortho", D_IN, D_SAE, {"n_groups": 8, "gram_tokens": k})
    trainer = Trainer(cfg, TrainConfig(steps=steps, batch_size=n, lr=1e-4, normalize_activations=False))
    trainer.fit(ArrayBatches(x, None, n, 0), guard=False)
    counts = np.bincount(np.concatenate(seen), minlength=n)
    assert len(seen) == steps and counts.sum() == steps * k
    assert (counts > 0).all(), f"{int((counts == 0).sum())} rows of the batch are never sampled"
    expected = steps * k / n
    # Uniform: the first and last quarters of the (sorted) batch are sampled alike, and the counts scatter
    # like a multinomial's.
    assert abs(counts[: n // 4].mean() - counts[-n // 4 :].mean()) < 0.2 * expected
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < n + 4 * np.sqrt(2 * n), chi2
