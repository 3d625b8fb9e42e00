"""Precision and concurrency chosen for the machine in front of us, never part of a trial's identity."""

import math

import pytest
import torch

from hsae import machine
from hsae.config import SAEConfig, TrainConfig
from hsae.machine import RunSettings, default_layout, measure_bf16_speedup, resolve_precision
from hsae.profiles import get_profile, parse_profile_settings
from hsae.train import Trainer, step_seconds
from hsae.variants import VARIANTS
from tests.helpers import small_space
from tune import ablate
from tune import plan as tune_plan


@pytest.fixture
def probe(monkeypatch, tmp_path):
    """The CPU probe replaced by a planted speed-up; counts how often it is measured."""
    monkeypatch.setenv("HSAE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(machine, "_MEASURED", {})
    calls = []

    def plant(speedup):
        def fake(d_in, d_out, threads=1, budget_s=machine.PROBE_BUDGET_S, matmul=None):
            calls.append((d_in, d_out, threads))
            return speedup
        monkeypatch.setattr(machine, "measure_bf16_speedup", fake)
        return calls

    return plant


def test_auto_is_fp32_where_bf16_is_slow_and_says_why(probe):
    calls = probe(1 / 70)
    choice = resolve_precision("auto", torch.device("cpu"), 640, 1280, threads=1)
    assert (choice.precision, choice.autocast) == ("fp32", "none")
    assert "bf16 is 70x slower on this CPU" in choice.reason
    resolve_precision("auto", torch.device("cpu"), 640, 1280, threads=1)
    assert calls == [(640, 1280, 1)]  # measured once, then cached


def test_auto_is_bf16_where_bf16_is_fast(probe):
    probe(1.6)
    choice = resolve_precision("auto", torch.device("cpu"), 640, 1280, threads=1)
    assert (choice.precision, choice.autocast) == ("bf16", "bf16")
    assert choice.reason.startswith("bf16: 1.6x faster")


def test_the_probe_is_cached_per_machine_on_disk(probe):
    calls = probe(1.6)
    resolve_precision("auto", torch.device("cpu"), 64, 128, threads=1)
    machine._MEASURED.clear()  # a new process on the same machine reads the cache file
    resolve_precision("auto", torch.device("cpu"), 64, 128, threads=1)
    assert len(calls) == 1 and machine.probe_cache_path().is_file()
    resolve_precision("auto", torch.device("cpu"), 64, 256, threads=1)  # other shapes: another probe
    assert len(calls) == 2


@pytest.mark.parametrize("capability, expected", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp32")])
def test_cuda_decides_by_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    choice = resolve_precision("auto", torch.device("cuda", 0), 2304, 16384)
    assert choice.precision == expected
    assert f"{capability[0]}.{capability[1]}" in choice.reason


def test_forced_precision_is_kept_and_bad_values_name_the_choices():
    assert resolve_precision("fp32", torch.device("cpu"), 8, 16).precision == "fp32"
    assert resolve_precision("bf16", torch.device("cpu"), 8, 16).precision == "bf16"
    with pytest.raises(ValueError, match=r"precision must be one of \['auto', 'bf16', 'fp32'\]"):
        RunSettings(precision="fp16")


class Clock:
    """A module's ``time``: perf_counter reads a planted clock that only the planted work advances."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def planted_products(clock, fp32_s, bf16_s, calls):
    """A matmul for measure_bf16_speedup whose products take the planted seconds (one value, or one per call of
    that precision), recording each call's precision."""
    def matmul(a, w, bf16):
        took = bf16_s if bf16 else fp32_s
        clock.now += took[sum(c == bf16 for c in calls)] if isinstance(took, list) else took
        calls.append(bf16)
        return a @ w
    return matmul


@pytest.mark.parametrize("fp32_s, bf16_s, rounds", [
    (0.001, 0.6, 1),  # a bf16 product slower than the 0.5 s budget: the warm-up round alone
    (0.05, 0.1, 4),  # 0.15 s a round: 0.60 s > 0.5 s after the fourth, so it stops there
    (0.002, 0.001, 7),  # 0.003 s a round: never spends the budget, stops at the 7-round cap
])
def test_the_probe_alternates_products_and_stops_once_the_budget_is_spent(monkeypatch, fp32_s, bf16_s, rounds):
    clock, calls = Clock(), []
    monkeypatch.setattr(machine, "time", clock)
    speedup = measure_bf16_speedup(32, 64, budget_s=0.5, matmul=planted_products(clock, fp32_s, bf16_s, calls))
    assert calls == [False, True] * rounds
    assert speedup == pytest.approx(fp32_s / bf16_s)


def test_the_probe_compares_the_best_time_of_each_precision(monkeypatch):
    clock, calls = Clock(), []
    monkeypatch.setattr(machine, "time", clock)
    fp32 = [0.009, 0.004, 0.006, 0.005, 0.004, 0.007, 0.008]  # a burst of other load hits some products
    bf16 = [0.010, 0.003, 0.002, 0.004, 0.009, 0.002, 0.005]
    speedup = measure_bf16_speedup(32, 64, budget_s=1.0, matmul=planted_products(clock, fp32, bf16, calls))
    assert len(calls) == 14 and speedup == pytest.approx(0.004 / 0.002)


def test_the_real_probe_multiplies_in_bf16_only_under_autocast_and_runs_at_most_seven_rounds():
    a, w = torch.ones(4, 8), torch.ones(8, 16)
    assert machine.autocast_matmul(a, w, False).dtype == torch.float32
    assert machine.autocast_matmul(a, w, True).dtype == torch.bfloat16
    calls = []

    def counted(a, w, bf16):
        calls.append(bf16)
        return machine.autocast_matmul(a, w, bf16)

    speedup = measure_bf16_speedup(64, 128, matmul=counted)
    rounds = len(calls) // 2
    assert calls == [False, True] * rounds and 1 <= rounds <= 7  # the probe's cap, whatever this machine's speed
    assert math.isfinite(speedup) and speedup > 0


def test_the_trainer_uses_the_resolved_precision(probe):
    probe(1 / 70)
    trainer = Trainer(SAEConfig("relu", 16, 32), TrainConfig(steps=2, batch_size=8))
    assert trainer.precision.precision == "fp32"
    assert trainer._autocast()._enabled is False


def test_precision_is_a_run_setting_not_a_profile_field():
    with pytest.raises(ValueError, match="a run setting, not part of the study"):
        parse_profile_settings(["autocast=bf16"], get_profile("embedded"))
    assert get_profile("embedded").train_config(42).autocast == "auto"
    assert get_profile("embedded").train_config(42, RunSettings(precision="fp32")).autocast == "none"


def test_trial_keys_do_not_depend_on_precision_or_layout(probe, tmp_path):
    probe(1.6)
    keys = []
    for extra in (["--precision", "bf16"], ["--precision", "fp32", "--max-concurrent", "1"]):
        args = ablate.build_parser().parse_args(["--profile", "tiny", "--space", "ortho", "--dry-run",
                                                 "--out", str(tmp_path / "r"), *extra])
        plan = tune_plan.resolve(args)
        keys.append(sorted(t.key for t in plan.trials["ortho"]))
    assert keys[0] == keys[1]


def test_asha_trains_every_trial_its_budget_and_a_grid_extends(probe, tmp_path):
    # ASHA compares trials at fixed steps: a rung past the budget would cut an extension, so it gets none.
    probe(1.6)
    extensions = ["--set", "extension_fraction=0.5", "--set", "max_extensions=1"]
    chosen = {}
    for search in (["--search", "optuna", "--objectives", "val_mse"], []):
        args = ablate.build_parser().parse_args(["--profile", "tiny", "--space", small_space("ortho"), "--dry-run",
                                                 "--out", str(tmp_path / "r"), *extensions, *search])
        chosen[bool(search)] = tune_plan.resolve(args).profile.train_config(42).max_steps()
    assert chosen == {True: 40, False: 60}


@pytest.mark.parametrize("speedup, says", [(1 / 70, "fp32: bf16 is 70x slower"), (1.6, "bf16: 1.6x faster")])
def test_the_plan_prints_the_precision_choice_and_the_layout(probe, tmp_path, capsys, speedup, says):
    probe(speedup)
    assert ablate.main(["--profile", "tiny", "--space", "ortho", "--dry-run", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert f"[hsae] precision {says}" in out
    cores = machine.machine_cores()
    assert f"concurrency {default_layout(cores, True).rule}" in out


def test_the_default_layout_adds_a_trial_only_while_evaluations_wait():
    assert (default_layout(2, True).trials, default_layout(2, True).threads) == (3, 1)
    assert (default_layout(2, False).trials, default_layout(2, False).threads) == (2, 1)


@pytest.mark.parametrize("capability, dtype", [((9, 0), torch.bfloat16), ((7, 0), torch.float32)])
def test_the_harvest_follows_the_same_capability_rule_on_cuda(monkeypatch, capability, dtype):
    from hsae.models import resolve_dtype

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_dtype("auto", torch.device("cuda", 0)) == dtype
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32


def _variants_plan(tmp_path, *extra):
    args = ablate.build_parser().parse_args(["--profile", "tiny", "--space", "variants", "--seeds", "2",
                                             "--dry-run", "--out", str(tmp_path / "r"), *extra])
    return tune_plan.resolve(args), args


def test_trials_run_seed_by_seed_the_longest_training_first(probe, tmp_path, monkeypatch, capsys):
    # A sweep that ends on its shortest trials leaves fewer slots idle while the last one finishes.
    probe(1.6)
    ms = {"relu": 1.0, "fixed_ortho": 2.0, "static_hier": 3.0, "contrastive_hier": 5.0}
    plan, args = _variants_plan(tmp_path)
    threads_seen = set()

    def fake_step(cfg, train_cfg, l0=None):
        threads_seen.add(torch.get_num_threads())
        assert l0 == plan.profile.target_l0 or l0 is None
        return ms.get(cfg.variant, 2.5) / 1e3

    monkeypatch.setattr(ablate, "step_seconds", fake_step)
    trials = plan.trials["variants"]
    threads = torch.get_num_threads()
    ordered = ablate.trial_order(trials, plan, args, at_once=3)
    assert threads_seen == {plan.layout.threads} and torch.get_num_threads() == threads
    assert [t.seed for t in ordered] == [42] * 7 + [43] * 7
    assert [t.variant for t in ordered[:7]] == [t.variant for t in ordered[7:]]
    assert ordered[0].variant == "contrastive_hier" and ordered[6].variant == "relu"
    seconds = ablate.training_seconds(trials, plan)
    assert [seconds[t.key] for t in ordered[:7]] == sorted((seconds[t.key] for t in ordered[:7]), reverse=True)
    relu = next(t for t in trials if t.variant == "relu")
    assert seconds[relu.key] == pytest.approx(plan.profile.train.steps * 1e-3)
    assert "ms per step measured here: contrastive_hier 5, static_hier 3" in capsys.readouterr().out


@pytest.mark.parametrize("extra, at_once", [(["--search", "optuna", "--objectives", "val_mse"], 3),
                                            (["--address", "10.0.0.1:6379"], 3), ([], 14)],
                         ids=["optuna", "cluster", "all-at-once"])
def test_trial_order_is_left_alone_where_it_cannot_help(probe, tmp_path, monkeypatch, extra, at_once):
    probe(1.6)
    monkeypatch.setattr(ablate, "step_seconds", lambda *a, **k: pytest.fail("measured a step"))
    optuna = "optuna" in extra  # the plan refuses Optuna on variants' seven blocks: the order rule is what is tested
    plan, args = _variants_plan(tmp_path, *([] if optuna else extra))
    args.search = "optuna" if optuna else args.search
    trials = plan.trials["variants"]
    assert ablate.trial_order(trials, plan, args, at_once) == trials


def test_a_step_that_fails_to_time_leaves_its_trial_last_and_the_threads_as_they_were(probe, tmp_path, monkeypatch,
                                                                                     capsys):
    probe(1.6)

    def fake_step(cfg, train_cfg, l0=None):
        if cfg.variant == "static_hier":
            raise RuntimeError("out of memory")
        return 1e-3

    monkeypatch.setattr(ablate, "step_seconds", fake_step)
    plan, args = _variants_plan(tmp_path)
    threads = torch.get_num_threads()
    ordered = ablate.trial_order(plan.trials["variants"], plan, args, at_once=3)
    assert torch.get_num_threads() == threads
    assert ordered[6].variant == "static_hier" and ordered[13].variant == "static_hier"
    assert "could not time a step of static_hier" in capsys.readouterr().out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_times_a_step_as_the_median_after_a_warm_up(variant, monkeypatch):
    # Each real training step advances a planted clock by a planted time: the answer is the median of the
    # timed steps, the first (warm-up) step left out.
    clock, planted, trained = Clock(), [9.0, 1.0, 3.0, 2.0], []
    real_step = Trainer._train_step

    def timed_step(self, batch):
        out = real_step(self, batch)
        clock.now += planted[len(trained)]
        trained.append(batch.x.clone())
        return out

    monkeypatch.setattr("hsae.train.time", clock)
    monkeypatch.setattr(Trainer, "_train_step", timed_step)
    train_cfg = TrainConfig(steps=100, batch_size=128, autocast="none", lr_warmup_steps=0)
    assert step_seconds(SAEConfig(variant, 16, 64), train_cfg, steps=3, l0=8) == 2.0
    assert len(trained) == 4 and all(len(x) == 128 for x in trained)  # one warm-up step and three timed ones
    assert not any(torch.equal(trained[0], x) for x in trained[1:])  # each step on its own batch
