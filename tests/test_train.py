import math

import numpy as np
import pytest
import torch

from hsae import metrics as M
from hsae.config import SAEConfig
from hsae.train import ArrayBatches, DegenerateRunError, IteratorBatches, check_trained, latest_checkpoint
from hsae.variants import build_sae

from .helpers import train_small


class Crash(Exception):
    pass


# In the fast loop the variant with the most state to restore (attention assignment, temperature, InfoNCE);
# the others (plain, regrouping, thresholds) with the slow tests.
SLOW_RESUME_VARIANTS = ("relu", "enhanced_adaptive", "matryoshka_batchtopk")


@pytest.mark.parametrize("variant", ["contrastive_hier",
                                     *(pytest.param(v, marks=pytest.mark.slow) for v in SLOW_RESUME_VARIANTS)])
def test_resume_from_checkpoint_reproduces_final_weights_exactly(synthetic, tmp_path, variant):
    _, uninterrupted = train_small(synthetic, variant, steps=30, checkpoint_dir=tmp_path / "a",
                                   checkpoint_every=10, log_every=1)

    def crash_at_17(progress):
        if progress.step == 17:
            raise Crash

    with pytest.raises(Crash):
        train_small(synthetic, variant, steps=30, checkpoint_dir=tmp_path / "b", checkpoint_every=10,
                    on_progress=crash_at_17, log_every=1)
    assert latest_checkpoint(tmp_path / "b").name == "step_00000010"
    _, resumed = train_small(synthetic, variant, steps=30, checkpoint_dir=tmp_path / "b", checkpoint_every=10,
                             log_every=1)
    a, b = uninterrupted.sae.state_dict(), resumed.sae.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [h["loss"] for h in uninterrupted.history] == [h["loss"] for h in resumed.history]
    assert uninterrupted.metrics == resumed.metrics


def test_checkpoints_are_pruned_and_complete(synthetic, tmp_path):
    train_small(synthetic, "relu", steps=40, checkpoint_dir=tmp_path, checkpoint_every=10)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["step_00000030", "step_00000040"]
    assert all((tmp_path / n / "state.json").is_file() for n in names)


def test_zero_steps_raise_the_guard():
    with pytest.raises(DegenerateRunError, match="trained 0 steps"):
        check_trained(0, 0.1, {"explained_variance": 0.9, "l0": 5.0, "dead_fraction": 0.0})


def test_an_untrained_all_zero_sae_cannot_be_scored():
    # The seed paper's failure: weights left at an all-zero init, no feature ever fires.
    sae = build_sae(SAEConfig("relu", 16, 64))
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
    x = torch.randn(256, 16)
    metrics = M.evaluate(sae, x)
    assert metrics["l0"] == 0 and metrics["explained_variance"] <= 0
    with pytest.raises(DegenerateRunError, match="L0 = 0"):
        check_trained(1000, 0.5, metrics)


@pytest.mark.parametrize("metrics,match", [
    ({"explained_variance": -0.79, "l0": 3.0, "dead_fraction": 0.5}, "explained variance = -0.79"),
    ({"explained_variance": 0.5, "l0": 3.0, "dead_fraction": 1.0}, "every feature is dead"),
])
def test_guard_refuses_bad_reconstruction_or_all_dead(metrics, match):
    with pytest.raises(DegenerateRunError, match=match):
        check_trained(100, 0.5, metrics)


def test_non_finite_loss_is_degenerate(synthetic):
    with pytest.raises(DegenerateRunError, match="not finite"):
        check_trained(100, math.nan, {"explained_variance": 0.5, "l0": 3.0, "dead_fraction": 0.0})
    # A learning rate that blows the run up ends in the guard, not in a score.
    with pytest.raises(DegenerateRunError):
        train_small(synthetic, "relu", steps=20, lr=1e6)


def test_metrics_callback_and_history(synthetic):
    seen = []
    _, result = train_small(synthetic, "fixed_ortho", steps=30, log_every=10,
                            on_progress=lambda p: seen.append((p.step, p.record)))
    assert [s for s, _ in seen] == [10, 20, 30]
    assert {"loss", "mse", "l1", "ortho", "l0", "tokens_per_s"} <= set(seen[-1][1])
    assert result.tokens == 30 * 256 and result.wall_s > 0


def test_array_batches_are_a_pure_function_of_seed_and_step():
    x = np.arange(100, dtype=np.float32)[:, None].repeat(4, 1)
    a, b = ArrayBatches(x, batch_size=10, seed=3), ArrayBatches(x, batch_size=10, seed=3)
    order = [a.batch_at(s).x[:, 0].tolist() for s in range(25)]
    assert [b.batch_at(s).x[:, 0].tolist() for s in reversed(range(25))] == order[::-1]
    epoch0 = sorted(v for s in range(10) for v in order[s])
    assert epoch0 == list(range(100))  # one epoch covers every row once
    assert order[:10] != order[10:20]  # and the next epoch reshuffles


def test_iterator_source_trains_and_refuses_to_rewind(synthetic):
    items = ((synthetic.x[i : i + 256], synthetic.labels[i : i + 256]) for i in range(0, 10_000, 256))
    src = IteratorBatches(items)
    assert src.batch_at(0).x.shape == (256, 32)
    src.batch_at(3)
    with pytest.raises(ValueError, match="cannot rewind"):
        src.batch_at(1)


def test_contrastive_variant_requires_labels(synthetic):
    from hsae.config import TrainConfig
    from hsae.train import Trainer

    trainer = Trainer(SAEConfig("contrastive_hier", 32, 256, {"n_groups_l1": 4, "n_groups_l2": 4}),
                      TrainConfig(steps=2, batch_size=256))
    with pytest.raises(ValueError, match="needs domain labels"):
        trainer.fit(ArrayBatches(synthetic.x, None, 256))


def test_bf16_autocast_trains_and_refuses_unknown_modes(synthetic):
    from hsae.config import TrainConfig
    from hsae.train import Trainer

    cfg = SAEConfig("static_hier", 32, 256, {"n_groups_l1": 4, "n_groups_l2": 4})
    result = Trainer(cfg, TrainConfig(steps=100, batch_size=256, lr=3e-3, autocast="bf16")).fit(
        ArrayBatches(synthetic.x, synthetic.labels, 256))
    assert result.metrics["explained_variance"] > 0.7 and result.sae.W_dec.dtype == torch.float32
    with pytest.raises(ValueError, match="autocast must be one of"):
        TrainConfig(autocast="fp8")


@pytest.mark.slow
def test_compiled_loss_gives_the_eager_numbers(synthetic):
    from hsae.config import TrainConfig
    from hsae.train import Trainer

    cfg = SAEConfig("fixed_ortho", 32, 256, {"n_groups": 8})
    # fp32 both ways: "auto" takes bf16 on a CPU where it is faster, and compiled bf16 rounds differently.
    runs = [Trainer(cfg, TrainConfig(steps=20, batch_size=256, lr=3e-3, compile=c, autocast="none")).fit(
        ArrayBatches(synthetic.x, synthetic.labels, 256), guard=False) for c in (False, True)]
    for name, value in runs[0].sae.state_dict().items():
        torch.testing.assert_close(runs[1].sae.state_dict()[name], value, rtol=1e-4, atol=1e-5)
