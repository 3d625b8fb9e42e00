"""Small shared pieces for the tests: quick synthetic training at test-friendly sizes."""

from __future__ import annotations

from hsae.config import SAEConfig, TrainConfig
from hsae.train import ArrayBatches, Trainer, to_batch

D_IN, D_SAE, BATCH = 32, 256, 256

# Group counts that divide a 64-feature dictionary; everything else at the defaults (contract and export tests).
TINY_PARAMS = {
    "fixed_ortho": {"n_groups": 8},
    "adaptive_ortho": {"n_groups": 8},
    "enhanced_adaptive": {"n_groups": 8},
    "static_hier": {"n_groups_l1": 4, "n_groups_l2": 4},
    "dynamic_hier": {"n_groups_l1": 4, "n_groups_l2": 4},
    "contrastive_hier": {"n_groups_l1": 4, "n_groups_l2": 4},
    "topk": {"k": 8},
    "matryoshka_batchtopk": {"k": 8},
}

# Group counts that fit a 256-feature dictionary at test size; everything else stays at paper defaults.
SMALL_PARAMS = {
    "fixed_ortho": {"n_groups": 8},
    "adaptive_ortho": {"n_groups": 8, "regroup_every": 50},
    "enhanced_adaptive": {"n_groups": 16, "regroup_every": 25},
    "static_hier": {"n_groups_l1": 4, "n_groups_l2": 4},
    "dynamic_hier": {"n_groups_l1": 4, "n_groups_l2": 4, "refresh_every": 25},
    "contrastive_hier": {"n_groups_l1": 4, "n_groups_l2": 4, "refresh_every": 25},
    "topk": {"k": 16},
    "matryoshka_batchtopk": {"k": 16},
}


def train_small(data, variant, steps=200, lr=3e-3, checkpoint_dir=None, checkpoint_every=0,
                on_progress=None, log_every=50, guard=True, **params):
    cfg = SAEConfig(variant, D_IN, D_SAE, {**SMALL_PARAMS.get(variant, {}), **params})
    tcfg = TrainConfig(steps=steps, batch_size=BATCH, lr=lr, log_every=log_every,
                       checkpoint_every=checkpoint_every)
    trainer = Trainer(cfg, tcfg, on_progress=on_progress, checkpoint_dir=checkpoint_dir)
    n_train = len(data.x) - 2048
    source = ArrayBatches(data.x[:n_train], data.labels[:n_train], BATCH, tcfg.seed)
    result = trainer.fit(source, eval_batch=to_batch(data.x[n_train:], data.labels[n_train:]), guard=guard)
    return trainer, result
