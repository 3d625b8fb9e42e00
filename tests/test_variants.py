import pytest
import torch

from hsae import metrics as M
from hsae.variants import VARIANTS

from .helpers import train_small


def test_registry_holds_exactly_the_study_variants():
    assert set(VARIANTS) == {
        "relu", "fixed_ortho", "adaptive_ortho", "enhanced_adaptive", "static_hier", "dynamic_hier",
        "contrastive_hier", "topk", "matryoshka_batchtopk",
    }


@pytest.mark.slow  # every variant trained (≈ 15 s): in the full suite; the mechanism tests stay fast
def test_every_variant_learns_the_synthetic_dictionary(synthetic):
    for name in VARIANTS:
        _, result = train_small(synthetic, name, steps=200)
        m = result.metrics
        assert result.steps == 200, name
        assert m["explained_variance"] > 0.8, (name, m["explained_variance"])
        assert m["l0"] > 0, name


def test_ortho_penalty_lowers_inter_group_correlation(synthetic):
    for variant, off, on in [
        ("fixed_ortho", {"alpha": 0.0}, {"alpha": 1.0}),
        ("static_hier", {"alpha_l1": 0.0, "alpha_l2": 0.0}, {"alpha_l1": 1.0, "alpha_l2": 0.5}),
    ]:
        _, free = train_small(synthetic, variant, **off)
        _, constrained = train_small(synthetic, variant, **on)
        assert constrained.metrics["inter_group_correlation"] < free.metrics["inter_group_correlation"], variant


def _assignment_trace(synthetic, variant, buffer, every, steps=12):
    trace = {}

    def record(progress):
        trace[progress.step] = getattr(trainer_box[0].sae, buffer).detach().clone()

    trainer_box = []
    from hsae.config import SAEConfig, TrainConfig
    from hsae.train import ArrayBatches, Trainer

    params = {"adaptive_ortho": {"n_groups": 8, "regroup_every": every},
              "dynamic_hier": {"n_groups_l1": 4, "n_groups_l2": 4, "refresh_every": every}}[variant]
    trainer = Trainer(SAEConfig(variant, 32, 256, params), TrainConfig(steps=steps, batch_size=256, lr=3e-3,
                                                                          log_every=1), on_progress=record)
    trainer_box.append(trainer)
    initial = getattr(trainer.sae, buffer).detach().clone()
    trainer.fit(ArrayBatches(synthetic.x, synthetic.labels, 256, 42), guard=False)
    return initial, trace


def test_regrouping_changes_assignments_only_at_the_interval(synthetic):
    for variant, buffer in [("adaptive_ortho", "group_of"), ("dynamic_hier", "assignment_l2")]:
        initial, trace = _assignment_trace(synthetic, variant, buffer, every=5)
        previous = initial
        changed_at = []
        for step in range(1, 13):
            if not torch.equal(trace[step], previous):
                changed_at.append(step)
            previous = trace[step]
        assert changed_at and set(changed_at) <= {5, 10}, (variant, changed_at)


def test_adaptive_alpha_stays_in_its_range(synthetic):
    trainer, _ = train_small(synthetic, "enhanced_adaptive", steps=60)
    alpha = trainer.sae.pair_alpha
    off = ~torch.eye(alpha.shape[0], dtype=torch.bool)
    assert float(alpha[off].min()) >= 0.2 - 1e-6 and float(alpha[off].max()) <= 0.4 + 1e-6
    assert float(alpha[off].max()) - float(alpha[off].min()) > 0.1  # it actually adapts per pair
    assert torch.all(alpha.diagonal() == 0)


def test_entropy_term_raises_assignment_entropy(synthetic):
    _, without = train_small(synthetic, "dynamic_hier", entropy_coeff=0.0)
    _, with_term = train_small(synthetic, "dynamic_hier", entropy_coeff=1.0)
    assert with_term.metrics["group_entropy"] > without.metrics["group_entropy"]


def test_info_nce_separates_domain_labelled_clusters(synthetic):
    _, without = train_small(synthetic, "contrastive_hier", nce_weight=0.0)
    _, with_term = train_small(synthetic, "contrastive_hier", nce_weight=1.0)
    assert with_term.metrics["nce"] < without.metrics["nce"] - 0.05


def test_dynamic_temperature_is_learned(synthetic):
    trainer, _ = train_small(synthetic, "dynamic_hier", steps=50)
    assert trainer.sae.log_temperature.grad is not None
    assert float(trainer.sae.temperature.detach()) != 1.0


def _prefix_ev(sae, x, sizes):
    sae.eval()
    with torch.no_grad():
        f = sae.encode(x)
        return [M.explained_variance(x, f[:, :m] @ sae.W_dec[:m] + sae.b_dec) for m in sizes]


def test_matryoshka_prefixes_each_reconstruct(synthetic):
    trainer, _ = train_small(synthetic, "matryoshka_batchtopk")
    plain, _ = train_small(synthetic, "matryoshka_batchtopk", prefix_fractions=[1.0])
    x = torch.as_tensor(synthetic.x[-2048:]) * trainer.scale
    sizes = trainer.sae.sizes
    nested = _prefix_ev(trainer.sae, x, sizes)
    flat = _prefix_ev(plain.sae, torch.as_tensor(synthetic.x[-2048:]) * plain.scale, sizes)
    assert all(ev > 0.2 for ev in nested), nested
    # Larger prefixes reconstruct at least about as well (the last ones may tie).
    assert all(b > a - 0.01 for a, b in zip(nested, nested[1:], strict=False)), nested
    assert nested[-1] > nested[0]
    # Without the nested loss the first eighth of the dictionary reconstructs far worse.
    assert nested[0] > flat[0] + 0.1, (nested, flat)
