import math

import pytest

from hsae.config import SAEConfig, TrainConfig


def test_unknown_variant_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown variant 'hierarchical'.*valid variants: \[.*'static_hier'"):
        SAEConfig("hierarchical", 16, 64)


def test_groups_must_divide_dictionary():
    with pytest.raises(ValueError, match=r"n_groups=30 does not divide the dictionary size d_sae=2048"):
        SAEConfig("fixed_ortho", 64, 2048, {"n_groups": 30})
    with pytest.raises(ValueError, match=r"n_groups_l1 \* n_groups_l2=64 does not divide .*d_sae=1000"):
        SAEConfig("static_hier", 64, 1000)


@pytest.mark.parametrize("field,value", [("alpha", -0.1), ("alpha", math.nan), ("l1_coeff", -1.0),
                                         ("alpha", math.inf)])
def test_negative_or_nan_coefficients(field, value):
    with pytest.raises(ValueError, match=rf"{field} must be a finite number >= 0"):
        SAEConfig("fixed_ortho", 16, 64, {"n_groups": 4, field: value})


def test_wrong_type_names_field():
    with pytest.raises(ValueError, match=r"alpha must be a number, got 'big'"):
        SAEConfig("fixed_ortho", 16, 64, {"n_groups": 4, "alpha": "big"})


@pytest.mark.parametrize("value", [0.0, -1.0])
def test_temperature_must_be_positive(value):
    with pytest.raises(ValueError, match=r"temperature_init must be > 0|temperature_init must be a finite number >= 0"):
        SAEConfig("dynamic_hier", 16, 128, {"temperature_init": value})
    with pytest.raises(ValueError, match=r"nce_temperature"):
        SAEConfig("contrastive_hier", 16, 128, {"nce_temperature": value})


def test_unknown_parameter_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['alpa'\] for variant 'fixed_ortho'.*'alpha'"):
        SAEConfig("fixed_ortho", 16, 64, {"alpa": 0.1})


@pytest.mark.parametrize("steps", [0, -5])
def test_steps_must_be_positive(steps):
    with pytest.raises(ValueError, match=r"steps must be an integer >= 1"):
        TrainConfig(steps=steps)


def test_adaptive_range_ordered():
    with pytest.raises(ValueError, match=r"alpha_min=0.3 must be <= alpha_max=0.2"):
        SAEConfig("adaptive_ortho", 16, 64, {"n_groups": 4, "alpha_min": 0.3, "alpha_max": 0.2})


def test_paper_defaults_and_flat_columns():
    cfg = SAEConfig("enhanced_adaptive", 64, 2048)
    p = cfg.resolved
    assert (p.n_groups, p.alpha_min, p.alpha_max, p.regroup_every) == (64, 0.2, 0.4, 50)
    assert SAEConfig("adaptive_ortho", 64, 2048).resolved.n_groups == 32
    hier = SAEConfig("contrastive_hier", 64, 2048).resolved
    assert (hier.alpha_l1, hier.alpha_l2, hier.nce_temperature, hier.nce_weight, hier.entropy_coeff) == (
        0.4, 0.2, 0.1, 0.1, 0.01)
    flat = cfg.flat()
    assert flat["variant"] == "enhanced_adaptive" and flat["n_groups"] == 64
    assert SAEConfig.from_dict(cfg.to_dict()) == cfg


def test_train_defaults_follow_paper():
    t = TrainConfig()
    assert (t.lr, t.weight_decay, t.batch_size, t.seed, t.steps) == (3e-4, 0.01, 2048, 42, 1000)
