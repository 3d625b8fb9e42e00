"""The convergence rule (docs/training.md): pure functions, the profile's log spacing, and rows that agree
with the curves they are recomputed from."""

import math

import pytest

from hsae.config import TrainConfig
from hsae.convergence import (
    END_POINTS,
    WINDOW,
    convergence_verdict,
    end_levels,
    is_converged,
    plateau_window,
    val_mse_rel_change,
)
from hsae.profiles import get_profile


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


def logged_steps(steps: int, log_every: int) -> list[int]:
    """The steps a run of ``steps`` logs held-out MSE at (the trainer's rule, checkpoints aside): every
    ``log_every``-th step after the first and the last step."""
    return sorted({*range(log_every, steps + 1, log_every), steps})


def points_in_window(logged: list[int], end: float, total_steps: int) -> list[int]:
    """The logged steps of the window that ends at ``end`` and spans WINDOW of ``total_steps``, from the last
    logged step at or before its start (where ``val_mse_rel_change`` starts reading)."""
    start = max((s for s in logged if s <= end - WINDOW * total_steps + 1e-9), default=None)
    return [s for s in logged if start is not None and start <= s <= end]


@pytest.mark.parametrize("profile", ["embedded", "real", "tiny"])
@pytest.mark.parametrize("steps", [None, 7, 30, 40, 333, 5000])
def test_every_profile_logs_enough_points_for_both_ends_of_each_window_also_after_an_extension(profile, steps):
    # Each end's level is the median of END_POINTS logged points, so a window needs 2 x END_POINTS of them; a
    # window of fewer steps than that can only be logged at every step.
    budget = get_profile(profile, steps=steps).train_config(42)
    for extensions in range(budget.max_extensions + 1):
        cfg = budget.extended(extensions)
        logged = logged_steps(cfg.steps, cfg.log_every)
        for end in (cfg.steps, cfg.decay_start()):  # the end check's window, the plateau's (before any decay)
            inside = points_in_window(logged, end, cfg.steps)
            if WINDOW * cfg.steps >= 2 * END_POINTS:
                assert len(inside) >= 2 * END_POINTS, (extensions, cfg.log_every, inside)
            else:
                assert cfg.log_every == 1 and inside == list(range(inside[0], end + 1)), (extensions, inside)


def test_lr_schedule_warms_up_holds_and_decays_to_zero():
    cfg = TrainConfig(steps=1000, lr=2e-3, lr_warmup_steps=50, lr_decay_fraction=0.2)
    lrs = [cfg.lr_at(s) for s in range(cfg.steps)]
    assert lrs[0] == pytest.approx(cfg.lr / cfg.lr_warmup_steps)
    assert lrs[cfg.lr_warmup_steps] == pytest.approx(cfg.lr)
    assert cfg.decay_start() == 800 and lrs[799] == pytest.approx(cfg.lr)
    assert all(b < a for a, b in zip(lrs[800:], lrs[801:], strict=False))
    assert 0 < lrs[-1] < 0.01 * cfg.lr


def test_embedded_profile_holds_its_rate_to_the_end_and_freezes_the_coefficient_for_the_last_fifth():
    # No decay: the plateau is read on the last 20% of the steps, one fixed objective at a constant rate.
    cfg = get_profile("embedded").train_config(42)
    lrs = [cfg.lr_at(s) for s in range(cfg.steps)]
    assert lrs[0] == pytest.approx(cfg.lr / cfg.lr_warmup_steps)
    assert all(lr == pytest.approx(cfg.lr) for lr in lrs[cfg.lr_warmup_steps:])
    logged = list(range(0, cfg.steps + 1, cfg.log_every))
    window = plateau_window(logged, [1.0] * len(logged), cfg.steps, warm_until=cfg.lr_warmup_steps,
                            decay_start=cfg.decay_start())
    assert window == (cfg.calibration_end(), cfg.steps) == (0.8 * cfg.steps, cfg.steps)


# 1,000 steps logged every 50: constant rate to 800 (the plateau window 600..800), linear decay to 0 over the last 200.
STEPS_1K = list(range(0, 1001, 50))


def curve(before_decay_rate: float, during_decay_rate: float) -> list[float]:
    """Held-out MSE falling by ``before_decay_rate`` per 50 steps up to step 800, then ``during_decay_rate``."""
    out, mse = [], 1.0
    for s in STEPS_1K:
        out.append(mse)
        mse *= 1 - (before_decay_rate if s < 800 else during_decay_rate)
    return out


def test_a_decay_alone_does_not_pass_a_run_still_improving_at_the_constant_rate():
    # Improving 1% per 50 steps before the decay, flat during it: the old end-of-run rule passes it.
    verdict = convergence_verdict(STEPS_1K, curve(0.01, 0.0), 1000, warm_until=600, decay_start=800)
    assert is_converged(verdict["val_mse_rel_change"])
    # Five points in 600..800: each end's level is the median (here the mean) of two, 150 steps apart.
    assert verdict["plateau_rel_change"] == pytest.approx((0.99**3 - 1) * 200 / 150)
    assert (verdict["plateau_start_step"], verdict["plateau_end_step"]) == (600, 800)
    assert verdict["converged"] is False


def test_a_plateau_before_the_decay_converges():
    verdict = convergence_verdict(STEPS_1K, curve(0.001, 0.0), 1000, warm_until=600, decay_start=800)
    assert verdict["converged"] is True


def test_what_a_decay_gains_at_the_end_does_not_unconverge_a_plateau_but_a_rise_does():
    # Flat before the decay, then 3% lower through it (annealing): converged; rising 3% at the end: not.
    annealed = convergence_verdict(STEPS_1K, curve(0.001, 0.0075), 1000, warm_until=600, decay_start=800)
    assert annealed["val_mse_rel_change"] < -0.02 and annealed["converged"] is True
    rising = convergence_verdict(STEPS_1K, curve(0.001, -0.0075), 1000, warm_until=600, decay_start=800)
    assert rising["val_mse_rel_change"] > 0.02 and rising["converged"] is False


def test_a_short_window_is_judged_at_its_rate_and_a_missing_one_never_converges():
    # Warm-ups to 700: the window 700..800 is 10% of the steps, its change counted per 20%.
    short = convergence_verdict(STEPS_1K, curve(0.006, 0.0), 1000, warm_until=700, decay_start=800)
    assert short["plateau_rel_change"] == pytest.approx((0.994**2 - 1) * 2)
    assert short["converged"] is False
    # Warm-ups to 750: 50 steps of constant rate are not enough to judge anything.
    none = convergence_verdict(STEPS_1K, curve(0.0, 0.0), 1000, warm_until=750, decay_start=800)
    assert none["plateau_start_step"] is None and math.isnan(none["plateau_rel_change"])
    assert none["converged"] is False


def test_a_flat_mse_with_the_l0_controller_still_moving_is_not_converged():
    # The controller acts up to the decay: the MSE is flat in 600..800 but only because the coefficient kept
    # falling (3% per 50 steps). Not a fixed objective, so not converged; a coefficient that held still is.
    moving = [1.0 * 0.97 ** (min(s, 800) / 50) for s in STEPS_1K]
    held = [0.8] * len(STEPS_1K)
    flat = curve(0.001, 0.0)
    verdict = convergence_verdict(STEPS_1K, flat, 1000, warm_until=0, decay_start=800, multiplier=moving)
    assert verdict["plateau_multiplier_change"] == pytest.approx((0.97**3 - 1) * 200 / 150)
    assert verdict["converged"] is False
    steady = convergence_verdict(STEPS_1K, flat, 1000, warm_until=0, decay_start=800, multiplier=held)
    assert steady["plateau_multiplier_change"] == 0.0 and steady["converged"] is True
    assert convergence_verdict(STEPS_1K, flat, 1000, 0, 800)["plateau_multiplier_change"] is None


# 1,000 steps logged every 25, no decay: nine points in the window 800..1,000, three at each end.
STEPS_DENSE = list(range(0, 1001, 25))


def test_an_end_is_the_median_of_its_three_nearest_points():
    points = {800.0: 1.0, 825.0: 5.0, 850.0: 0.9, 875.0: 0.7, 950.0: 0.6, 975.0: 0.1, 1000.0: 0.5}
    assert end_levels(points, (800.0, 1000.0)) == ((825.0, 1.0), (975.0, 0.5))
    assert end_levels({0.0: 1.0, 10.0: 2.0}, (0.0, 10.0)) == ((0.0, 1.0), (10.0, 2.0))
    assert end_levels(points, (790.0, 1000.0)) is None


def test_one_evaluation_on_a_transient_neither_fails_a_flat_curve_nor_passes_a_falling_one():
    # A held-out evaluation that lands on a transient (a resampling, a jump of the assignment) is 5% off.
    def verdict(rate: float, spike_at: float, spike: float) -> dict:
        mse = [0.5 * (1 - rate) ** (s / 25) * (1 + spike * (s == spike_at)) for s in STEPS_DENSE]
        return convergence_verdict(STEPS_DENSE, mse, 1000, warm_until=50, decay_start=1000)

    flat_with_high_start = verdict(0.0, 800, 0.05)  # end minus a high start: -4.8% by two points
    assert flat_with_high_start["plateau_rel_change"] == 0.0 and flat_with_high_start["converged"] is True
    falling_with_high_end = verdict(0.004, 1000, 0.05)  # -3.1% per window; +1.7% by two points
    assert falling_with_high_end["plateau_rel_change"] < -0.02 and falling_with_high_end["converged"] is False
