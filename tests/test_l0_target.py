"""Training to a target L0 and reviving dead latents (docs/training.md, "Target L0", "Dead latents")."""

import math

import pytest
import torch

from hsae.config import SAEConfig, TrainConfig
from hsae.l0_control import L0Controller, target_met
from hsae.profiles import get_profile, parse_profile_settings
from hsae.train import ArrayBatches, Trainer, latest_checkpoint, to_batch

from .helpers import BATCH, D_IN, D_SAE, SMALL_PARAMS

# Planted data (conftest: 128 atoms in 32 dimensions, ~4 active per token); a few hundred steps.
STEPS = 300
# After the freeze the L0 drifts at the fixed coefficient: the batch L0 of relu at target 10 ranges 9.0-11.1 over
# steps 200-300 of this run, and docs/training.md ("Target L0", measured on planted data) has few-hundred-step runs
# ending 5-20% off (relu 10.7 for 10, static_hier 10.4 for 12). So the held-out L0 at the end is held to 15%; the 5%
# of l0_target_met is asserted on what the controller itself reads, the smoothed batch L0 at the freeze.
DRIFT_TOLERANCE = 0.15


def train(data, variant, steps=STEPS, checkpoint_dir=None, on_progress=None, train_overrides=None, **params):
    cfg = SAEConfig(variant, D_IN, D_SAE, {**SMALL_PARAMS.get(variant, {}), **params})
    settings = {"log_every": 25, "lr_decay_fraction": 0.2, "checkpoint_every": 10 if checkpoint_dir else 0,
                **(train_overrides or {})}
    tcfg = TrainConfig(steps=steps, batch_size=BATCH, lr=3e-3, **settings)
    trainer = Trainer(cfg, tcfg, on_progress=on_progress, checkpoint_dir=checkpoint_dir)
    n_train = len(data.x) - 2048
    source = ArrayBatches(data.x[:n_train], data.labels[:n_train], BATCH, tcfg.seed)
    return trainer, trainer.fit(source, eval_batch=to_batch(data.x[n_train:], data.labels[n_train:]))


@pytest.mark.parametrize("variant,target", [("relu", 10), pytest.param("static_hier", 12, marks=pytest.mark.slow)])
def test_controller_reaches_the_target_on_held_out_rows(synthetic, variant, target):
    _, free = train(synthetic, variant)
    assert abs(free.metrics["l0"] - target) > 2 * DRIFT_TOLERANCE * target  # the default coefficient lands elsewhere
    trainer, result = train(synthetic, variant, target_l0=target)
    assert target_met(trainer.controller.l0_ema, target), trainer.controller.l0_ema  # within 5% when it freezes
    assert abs(result.metrics["l0"] - target) <= DRIFT_TOLERANCE * target, result.metrics["l0"]
    # Calibrated, then frozen: the multiplier moved, and is one value over the last 40% of the steps.
    frozen = [h["sparsity_multiplier"] for h in result.history if h["step"] >= trainer.cfg.calibration_end()]
    assert len(set(frozen)) == 1 and frozen[0] != 1.0
    assert result.sparsity_coeff == pytest.approx(trainer.sae.p.l1_coeff * frozen[0])


def test_controller_moves_the_multiplier_toward_the_target_and_stops_at_the_end():
    ctl = L0Controller(target=32.0, start=2, end=5, gain=0.02, ema_decay=0.0)
    ctl.observe(0, 320.0)  # before the start: ignored
    assert ctl.multiplier == 1.0
    ctl.observe(2, 64.0)  # too many active latents: more pressure
    assert ctl.multiplier > 1.0
    up = ctl.multiplier
    ctl.observe(3, 16.0)  # too few: less
    assert ctl.multiplier < up
    held = ctl.multiplier
    ctl.observe(5, 1e6)  # the calibration is over: frozen
    assert ctl.multiplier == held


def test_one_observation_moves_the_multiplier_by_the_documented_formula():
    # log m += clamp(gain * log(L0_ema / target), +-0.05); L0_ema = d * L0_ema + (1 - d) * L0, the first L0 as it is.
    ctl = L0Controller(target=32.0, start=0, end=10, gain=0.02, ema_decay=0.9)
    ctl.observe(0, 64.0)
    assert ctl.l0_ema == 64.0 and ctl.multiplier == pytest.approx(math.exp(0.02 * math.log(64.0 / 32.0)), rel=1e-12)
    before = ctl.log_multiplier
    ctl.observe(1, 16.0)  # below the target, but the smoothed L0 (0.9 * 64 + 0.1 * 16 = 59.2) is still above it
    assert ctl.l0_ema == pytest.approx(59.2, rel=1e-12)
    assert ctl.log_multiplier == pytest.approx(before + 0.02 * math.log(59.2 / 32.0), rel=1e-12)


def test_a_large_error_moves_the_multiplier_by_the_clamp_and_no_more():
    ctl = L0Controller(target=32.0, start=0, end=10, gain=1.0, ema_decay=0.0)
    ctl.observe(0, 320.0)  # 1.0 * log(10) = 2.3: clamped to +0.05
    assert ctl.log_multiplier == pytest.approx(0.05, rel=1e-12) and ctl.multiplier == pytest.approx(math.exp(0.05))
    ctl.observe(1, 0.0)  # no latent fires: log(1e-3 / 32) = -10.4, clamped to -0.05
    assert ctl.log_multiplier == pytest.approx(0.0, abs=1e-12)
    ctl.observe(2, 32.0 * math.exp(0.01))  # inside the clamp: the proportional step itself
    assert ctl.log_multiplier == pytest.approx(0.01, rel=1e-9)


def test_target_met_is_within_five_percent():
    assert target_met(33.5, 32) and not target_met(34.0, 32) and target_met(None, None) is None


def test_topk_takes_k_from_the_target_and_refuses_a_conflicting_k():
    assert SAEConfig("topk", D_IN, D_SAE, {"target_l0": 24}).resolved.k == 24
    assert SAEConfig("matryoshka_batchtopk", D_IN, D_SAE, {"target_l0": 24}).resolved.k == 24
    with pytest.raises(ValueError, match="k=16 and target_l0=24 disagree"):
        SAEConfig("topk", D_IN, D_SAE, {"k": 16, "target_l0": 24})


@pytest.mark.parametrize("value", [0, -3, 2.5, D_SAE + 1])
def test_bad_targets_name_the_field(value):
    with pytest.raises(ValueError, match="target_l0"):
        SAEConfig("relu", D_IN, D_SAE, {"target_l0": value})


def test_target_reaches_trials_from_the_profile_and_the_command_line():
    profile = get_profile("tiny")
    settings = parse_profile_settings(["target_l0=32", "resample_every=50"], profile)
    assert settings == {"target_l0": 32, "train.resample_every": 50}  # flat names read as their paths
    chosen = get_profile("tiny", **settings)
    assert chosen.trial_params({"alpha": 0.1}) == {"alpha": 0.1, "target_l0": 32}
    assert chosen.trial_params({"target_l0": 16}) == {"target_l0": 16}  # a block's own target wins
    assert chosen.train_config(42).resample_every == 50
    with pytest.raises(ValueError, match="target_l0: expected a int"):
        parse_profile_settings(["target_l0=many"], profile)


def kill(trainer, latents):
    """Make ``latents`` dead for good: their pre-activations are far below zero on every input."""
    with torch.no_grad():
        trainer.sae.b_enc[latents] = -1e3


@pytest.mark.parametrize("resample_every", [0, 50])
def test_resampled_latents_fire_afterwards(synthetic, resample_every):
    dead = torch.arange(0, D_SAE, 4)  # a quarter of the dictionary
    cfg = SAEConfig("relu", D_IN, D_SAE, {"dead_tokens": 5 * BATCH})
    tcfg = TrainConfig(steps=200, batch_size=BATCH, lr=3e-3, log_every=25, resample_every=resample_every)
    trainer = Trainer(cfg, tcfg)
    kill(trainer, dead)
    n_train = len(synthetic.x) - 2048
    source = ArrayBatches(synthetic.x[:n_train], synthetic.labels[:n_train], BATCH, tcfg.seed)
    result = trainer.fit(source, eval_batch=to_batch(synthetic.x[n_train:]))
    _, f = result.sae(to_batch(synthetic.x[n_train:]).x * result.scale)
    fired = (f[:, dead] > 0).any(dim=0).float().mean().item()
    if resample_every == 0:
        assert fired == 0.0 and result.revived_latents == 0
        return
    assert fired > 0.9, fired
    assert result.revived_latents >= len(dead)
    revived = [(h["step"], h["revived_latents"]) for h in result.history if h["revived_latents"]]
    assert revived and all(step <= tcfg.calibration_end() for step, _ in revived)


@pytest.mark.parametrize("activation", ["softplus", "relu"])
def test_the_pre_activation_aux_loss_revives_latents_without_resampling(synthetic, monkeypatch, activation):
    # A quarter of the latents pushed below zero on every input (as the hierarchies' penalties leave them), no
    # resampling: L1 variants' softplus aux loss brings them back; the ReLU form (TopK's) passes them no gradient.
    if activation == "relu":
        monkeypatch.setattr("hsae.variants.base.SAE.aux_activation", lambda self, pre: torch.relu(pre))
    dead = torch.arange(0, D_SAE, 4)
    cfg = SAEConfig("relu", D_IN, D_SAE, {"dead_tokens": 5 * BATCH})
    tcfg = TrainConfig(steps=200, batch_size=BATCH, lr=3e-3, log_every=25)
    trainer = Trainer(cfg, tcfg)
    n_train = len(synthetic.x) - 2048
    held_out = to_batch(synthetic.x[n_train:])
    with torch.no_grad():
        trainer.sae.b_enc[dead] = -4.0
        trainer._initialise_from(held_out)
        assert not (trainer.sae(held_out.x * trainer.scale)[1][:, dead] > 0).any()
    source = ArrayBatches(synthetic.x[:n_train], synthetic.labels[:n_train], BATCH, tcfg.seed)
    result = trainer.fit(source, eval_batch=held_out)
    _, f = result.sae(held_out.x * result.scale)
    fired = (f[:, dead] > 0).any(dim=0).float().mean().item()
    assert result.revived_latents == 0
    if activation == "relu":
        assert fired == 0.0
    else:
        assert fired > 0.9, fired


def test_resume_restores_controller_and_resampling_exactly(synthetic, tmp_path):
    overrides = {"resample_every": 8, "calibration_fraction": 0.8}
    params = {"target_l0": 12, "dead_tokens": 2 * BATCH}
    _, whole = train(synthetic, "relu", steps=30, checkpoint_dir=tmp_path / "a", train_overrides=overrides, **params)

    def crash_at_20(progress):
        if progress.step == 20:
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        train(synthetic, "relu", steps=30, checkpoint_dir=tmp_path / "b", on_progress=crash_at_20,
              train_overrides=overrides, **params)
    assert latest_checkpoint(tmp_path / "b").name == "step_00000020"
    _, resumed = train(synthetic, "relu", steps=30, checkpoint_dir=tmp_path / "b", train_overrides=overrides,
                       **params)
    for name, value in whole.sae.state_dict().items():
        assert torch.equal(value, resumed.sae.state_dict()[name]), name
    assert whole.sparsity_coeff == resumed.sparsity_coeff and whole.revived_latents == resumed.revived_latents


# A budget too short for the planted data: the held-out MSE still falls over its last 20%.
SHORT = {"lr_decay_fraction": 0.0, "calibration_fraction": 0.6, "log_every": 2}


@pytest.mark.slow  # a run with an extension (≈ 9 s): in the full suite, out of the fast loop
def test_a_run_the_rule_fails_trains_on_and_recalibrates_before_a_new_frozen_window(synthetic):
    trainer, fixed = train(synthetic, "relu", steps=40, train_overrides=SHORT, target_l0=10)
    assert not trainer.convergence()["converged"] and fixed.steps == 40 and fixed.extensions == 0
    more = {**SHORT, "extension_steps": 40, "max_extensions": 2}
    trainer, extended = train(synthetic, "relu", steps=40, train_overrides=more, target_l0=10)
    assert extended.extensions >= 1 and extended.steps == 40 + 40 * extended.extensions
    assert extended.extensions == 2 or trainer.convergence()["converged"]
    # The same run up to the budget; then the controller acts again and freezes for the new last 40%.
    assert [h["val_mse"] for h in extended.history[:20]] == [h["val_mse"] for h in fixed.history]
    multiplier = {int(h["step"]): h["sparsity_multiplier"] for h in extended.history}
    assert multiplier[40] == multiplier[24] and multiplier[40] != multiplier[extended.steps]
    frozen = [m for s, m in multiplier.items() if s >= trainer.cfg.calibration_end()]
    assert trainer.cfg.calibration_end() == round(0.6 * extended.steps) and len(set(frozen)) == 1
    assert trainer.convergence()["plateau_end_step"] == extended.steps


def test_a_run_the_rule_passes_is_not_extended(synthetic, monkeypatch):
    # The planted data keep improving for longer than a test can train: the rule's answer is planted instead.
    verdicts = []

    def passes(trainer):
        verdicts.append(trainer.step)
        return {"converged": True}

    monkeypatch.setattr(Trainer, "convergence", passes)
    more = {**SHORT, "extension_steps": 40, "max_extensions": 2}
    _, result = train(synthetic, "relu", steps=40, train_overrides=more, target_l0=10)
    assert result.extensions == 0 and result.steps == 40 and verdicts == [40]


def test_resume_inside_an_extension_finishes_the_same_run(synthetic, tmp_path):
    # Budget 20, one extension of 20: the controller acts again over 20..24 and is frozen over 24..40. The crash
    # at 22 falls inside the recalibration, so the resumed trainer must know the extended schedule to act there.
    more = {**SHORT, "extension_steps": 20, "max_extensions": 1, "checkpoint_every": 2}
    _, whole = train(synthetic, "relu", steps=20, checkpoint_dir=tmp_path / "a", train_overrides=more, target_l0=10)
    assert whole.extensions == 1

    def crash_at_22(progress):
        if progress.step == 22:
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        train(synthetic, "relu", steps=20, checkpoint_dir=tmp_path / "b", on_progress=crash_at_22,
              train_overrides=more, target_l0=10)
    cfg = SAEConfig("relu", D_IN, D_SAE, {"target_l0": 10})
    restored = Trainer(cfg, TrainConfig(steps=20, batch_size=BATCH, lr=3e-3, **more))
    restored.load_checkpoint(latest_checkpoint(tmp_path / "b"))
    assert (restored.step, restored.extensions, restored.cfg.steps, restored.controller.end) == (22, 1, 40, 24)
    _, resumed = train(synthetic, "relu", steps=20, checkpoint_dir=tmp_path / "b", train_overrides=more,
                       target_l0=10)
    assert resumed.steps == whole.steps == 40 and resumed.extensions == 1
    assert resumed.sparsity_coeff == whole.sparsity_coeff
    for name, value in whole.sae.state_dict().items():
        assert torch.equal(value, resumed.sae.state_dict()[name]), name


def test_extensions_need_a_constant_rate_and_end_where_the_budget_says():
    with pytest.raises(ValueError, match="max_extensions=2 .* lr_decay_fraction=0"):
        TrainConfig(steps=100, lr_decay_fraction=0.2, extension_steps=50, max_extensions=2)
    with pytest.raises(ValueError, match="extension_steps"):
        TrainConfig(steps=100, extension_steps=-1)
    cfg = TrainConfig(steps=100, extension_steps=50, max_extensions=2)
    assert cfg.max_steps() == 200 and cfg.extended(1).steps == 150 and cfg.extended(1).calibration_end() == 90
    with pytest.raises(ValueError, match="max_extensions=2 needs extension_steps > 0"):
        TrainConfig(steps=100, max_extensions=2)
    assert TrainConfig(steps=100, extension_steps=50).max_steps() == 100  # no extension allowed
    embedded = get_profile("embedded")
    assert embedded.train_config(42).max_steps() == 7500
    assert get_profile("embedded", activations="stream").train_config(42).max_extensions == 0


def test_an_extension_is_a_fraction_of_the_budget_so_steps_n_trains_at_most_a_stated_multiple_of_n():
    embedded = get_profile("embedded")
    assert embedded.train.extension_fraction == pytest.approx(1 / 3)
    cfg = embedded.train_config(42)  # the embedded profile's 4,500 steps: 1,500 a time, twice, as always
    assert (cfg.steps, cfg.extension_steps, cfg.max_extensions, cfg.max_steps()) == (4500, 1500, 2, 7500)
    short = get_profile("embedded", steps=30).train_config(42)  # the smoke test: 30 steps, not 3,030
    assert (short.extension_steps, short.max_steps()) == (10, 50)
    for steps in (1, 7, 30, 900, 4500, 9000):
        budget = get_profile("embedded", steps=steps).train_config(42)
        assert budget.extension_steps == max(1, round(steps / 3))  # at least a step: 1 step extends by 1
        assert budget.max_steps() == steps + 2 * budget.extension_steps
    off = get_profile("embedded", steps=30, **parse_profile_settings(["max_extensions=0"], embedded))
    assert off.train_config(42).max_steps() == 30  # the explicit way to turn extensions off
    with pytest.raises(ValueError, match="max_extensions=2 needs extension_steps > 0 or extension_fraction > 0"):
        get_profile("tiny", max_extensions=2)
    with pytest.raises(ValueError, match="extension_fraction must be a number"):
        get_profile("embedded", extension_fraction=-0.5)


def test_a_profile_written_with_extension_steps_reads_as_its_fraction():
    # A Tune experiment interrupted before extensions were fractions carries its profile as it was: --resume
    # rebuilds it with the same extension steps.
    from hsae.profiles import FLAT_NAMES, Profile

    embedded = get_profile("embedded")
    old = {"name": "embedded", "d_sae": 1280, "target_l0": 64,  # the flat profile of then, less its fraction
           **{flat: embedded.get(path) for flat, path in FLAT_NAMES.items() if flat != "extension_fraction"}}
    for steps, extension in ((4500, 1500), (30, 1500), (1000, 7)):
        profile = Profile.from_dict({**old, "steps": steps, "extension_steps": extension})
        assert profile.train_config(42).extension_steps == extension
    assert Profile.from_dict({**old, "extension_steps": 0, "max_extensions": 0}).train.extension_fraction == 0.0
