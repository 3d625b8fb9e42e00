"""A seed's arms trained together on one batch stream (``hsae.train.train_together``) are the SAEs each arm's
own ``fit`` makes: the same weights bit for bit, the same curves, the same extensions, also after a crash and
a resume from checkpoints taken at different steps."""

from __future__ import annotations

import pytest
import torch

from hsae.config import SAEConfig, TrainConfig
from hsae.train import ArrayBatches, Trainer, latest_checkpoint, to_batch, train_together

from .helpers import BATCH, D_IN, D_SAE, SMALL_PARAMS

# An arm with an L0 controller, one that needs domain labels and regroups, and a TopK: the most state per step.
ARMS = (("relu", {"target_l0": 10}), ("contrastive_hier", {}), ("topk", {}))
STEPS = 20
SCHEDULE = {"log_every": 5, "lr_decay_fraction": 0.0, "calibration_fraction": 0.6, "extension_steps": 10,
            "max_extensions": 1}


class Crash(Exception):
    pass


def trainers(tmp_path, name: str, every: tuple[int, ...] = (10, 10, 10), on_progress=None) -> list[Trainer]:
    out = []
    for (variant, params), checkpoint_every in zip(ARMS, every, strict=True):
        cfg = SAEConfig(variant, D_IN, D_SAE, {**SMALL_PARAMS.get(variant, {}), **params})
        tcfg = TrainConfig(steps=STEPS, batch_size=BATCH, lr=3e-3, checkpoint_every=checkpoint_every, **SCHEDULE)
        callback = None if on_progress is None else (lambda p, v=variant: on_progress(v, p))
        out.append(Trainer(cfg, tcfg, on_progress=callback, checkpoint_dir=tmp_path / name / variant))
    return out


def data_of(synthetic):
    n_train = len(synthetic.x) - 2048
    source = ArrayBatches(synthetic.x[:n_train], synthetic.labels[:n_train], BATCH, 42)
    return source, to_batch(synthetic.x[n_train:], synthetic.labels[n_train:])


@pytest.fixture
def only_relu_extends(monkeypatch):
    """The convergence rule, made to say: relu unconverged (one extension), the others converged."""
    def verdict(self):
        return {"converged": self.sae_cfg.variant != "relu"}

    monkeypatch.setattr(Trainer, "convergence", verdict)


def assert_same(a, b) -> None:
    assert (a.steps, a.extensions, a.sparsity_coeff) == (b.steps, b.extensions, b.sparsity_coeff)
    for name, value in a.sae.state_dict().items():
        assert torch.equal(value, b.sae.state_dict()[name]), name
    drop = {"wall_s", "tokens_per_s"}  # each trainer's own clock
    assert [{k: v for k, v in h.items() if k not in drop} for h in a.history] == \
           [{k: v for k, v in h.items() if k not in drop} for h in b.history]
    assert a.metrics == b.metrics


def test_arms_trained_together_are_the_arms_trained_alone(synthetic, tmp_path, only_relu_extends):
    source, held_out = data_of(synthetic)
    alone = [t.fit(source, held_out) for t in trainers(tmp_path, "alone")]
    together = train_together(trainers(tmp_path, "together"), source, held_out)
    for a, b in zip(alone, together, strict=True):
        assert_same(a, b)
    # relu extended alone once the others had stopped; every arm saved its own checkpoints
    assert [r.steps for r in together] == [STEPS + 10, STEPS, STEPS] and together[0].extensions == 1
    assert latest_checkpoint(tmp_path / "together" / "relu").name == f"step_{STEPS + 10:08d}"
    assert all(r.wall_s > 0 for r in together)


def test_a_group_resumed_from_checkpoints_at_different_steps_finishes_the_same_run(synthetic, tmp_path,
                                                                                   only_relu_extends):
    source, held_out = data_of(synthetic)
    every = (10, 5, 4)  # the crash at step 16 leaves relu at 10, contrastive_hier at 15 and topk at 16
    whole = train_together(trainers(tmp_path, "whole", every), source, held_out)

    def crash(variant, progress):
        if variant == "topk" and progress.step == 16:  # after its checkpoint there
            raise Crash

    with pytest.raises(Crash):
        train_together(trainers(tmp_path, "crashed", every, crash), source, held_out)
    steps = [int(latest_checkpoint(tmp_path / "crashed" / v).name.split("_")[1]) for v, _ in ARMS]
    assert steps == [10, 15, 16]
    resumed = train_together(trainers(tmp_path, "crashed", every), source, held_out)
    for a, b in zip(whole, resumed, strict=True):
        assert_same(a, b)
