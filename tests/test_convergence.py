"""The convergence rule (docs/training.md): pure functions, the profile's log spacing, and rows that agree
with the curves they are recomputed from."""

import math

import pytest

from hsae.convergence import is_converged, log_every_for, val_mse_rel_change
from hsae.spaces import get_profile


def test_relative_change_is_read_over_the_last_fifth():
    steps = [0, 20, 40, 60, 80, 100]
    still_falling = [1.0, 0.6, 0.5, 0.45, 0.40, 0.39]
    assert val_mse_rel_change(steps, still_falling, 100) == pytest.approx(-0.025)
    assert not is_converged(val_mse_rel_change(steps, still_falling, 100))
    flat = [1.0, 0.6, 0.5, 0.45, 0.40, 0.396]
    assert is_converged(val_mse_rel_change(steps, flat, 100))
    rising = [1.0, 0.6, 0.5, 0.45, 0.40, 0.42]
    assert not is_converged(val_mse_rel_change(steps, rising, 100))


def test_window_starts_at_the_last_point_before_eighty_percent():
    # No point at step 80: the window starts at 75.
    assert val_mse_rel_change([0, 75, 90, 100], [2.0, 1.0, 0.5, 0.99], 100) == pytest.approx(-0.01)


def test_missing_points_give_no_verdict():
    assert math.isnan(val_mse_rel_change([0, 50], [1.0, 0.5], 100))  # no final point
    assert math.isnan(val_mse_rel_change([90, 100], [1.0, 0.5], 100))  # nothing before the window
    assert not is_converged(float("nan"))


@pytest.mark.parametrize("profile", ["embedded", "real", "tiny"])
@pytest.mark.parametrize("steps", [None, 7, 40, 333, 5000])
def test_every_profile_logs_at_least_every_five_percent(profile, steps):
    cfg = get_profile(profile, steps=steps).train_config(42)
    assert cfg.log_every <= max(1, 0.05 * cfg.steps)
    assert log_every_for(cfg.steps) >= cfg.log_every


def test_lr_schedule_warms_up_holds_and_decays_to_zero():
    cfg = get_profile("embedded").train_config(42)
    lrs = [cfg.lr_at(s) for s in range(cfg.steps)]
    assert lrs[0] == pytest.approx(cfg.lr / cfg.lr_warmup_steps)
    assert lrs[cfg.lr_warmup_steps] == pytest.approx(cfg.lr)
    half = cfg.steps // 2
    assert lrs[half - 1] == pytest.approx(cfg.lr)
    assert all(b <= a for a, b in zip(lrs[half:], lrs[half + 1:], strict=False))
    assert 0 < lrs[-1] < 0.01 * cfg.lr
