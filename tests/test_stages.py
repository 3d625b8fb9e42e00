"""Seeds in stages (``--until-decided``): the looks are declared before the run, each stage trains only the arms
still undecided (and relu), and the run stops when every arm is decided or the last look is reached."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from hsae import stats
from hsae import verdict as V
from hsae.profiles import PROFILES
from hsae.spaces import TrialSpec
from tune import stages

ARMS = {"relu": 0.0, "fixed_ortho": 0.3, "adaptive_ortho": 0.0}  # fixed_ortho removes far more; adaptive is relu's twin


def spec(variant: str, seed: int) -> TrialSpec:
    return TrialSpec("embedded-variants", "variants", variant, {"target_l0": 64}, seed, "ctx")


def test_the_looks_and_their_seeds_are_fixed_before_the_run():
    profile = PROFILES["embedded"]
    looks = stages.looks_of(profile, 3)
    assert looks == [3, 5, 7, 9] and profile.max_seeds == 9 and profile.seeds_per_stage == 2
    assert [stages.stage_seeds(looks, k) for k in range(4)] == [[42, 43, 44], [45, 46], [47, 48], [49, 50]]
    assert stats.seed_looks(3, 4, 9) == [3, 7, 9]  # the last look is always at max_seeds
    for bad in ((1, 2, 9), (3, 0, 9), (5, 2, 3)):
        with pytest.raises(ValueError, match="need first >= 2 seeds"):
            stats.seed_looks(*bad)
    # Seeds and stages are identities the verdict reads, never part of what a trial computes: its key stays.
    assert spec("relu", 42).key == TrialSpec("other", "aa", "relu", {"target_l0": 64}, 42, "ctx").key


class PlantedRun:
    """A stand-in for the sweep: "trains" a spec by giving its headline its arm's planted value plus a fixed
    per-seed deviation (relu none), so each paired s.d. is about ``noise`` and every look is reproducible."""

    def __init__(self, noise: float = 0.1):
        self.noise, self.rows, self.stages = noise, [], []

    def deviation(self, variant: str, seed: int) -> float:
        return 0.0 if variant == "relu" else self.noise * (-1) ** seed * (1 + (seed - 42) % 3 * 0.25)

    def run(self, specs: list[TrialSpec], stage: int) -> list:
        self.stages.append((stage, sorted({(s.variant, s.seed) for s in specs})))
        for s in specs:
            self.rows.append({"trial_id": s.key, "variant": s.variant, "seed": s.seed, "arm": s.variant,
                              "frontier_area": 0.3 + ARMS[s.variant] + self.deviation(s.variant, s.seed)})
        return []

    def verdict(self, keys: set[str]) -> V.Verdict:
        per_trial = pd.DataFrame([r for r in self.rows if r["trial_id"] in keys])
        test = V.arm_test(per_trial, "frontier_area", margin=0.05, alpha=0.05 / 4)
        return V.Verdict(per_trial, None, None, "frontier_area", [test], per_trial["seed"].nunique(), None)


def test_each_stage_trains_only_the_undecided_arms_and_relu():
    planted = PlantedRun()
    first = [spec(v, s) for v in ARMS for s in (42, 43, 44)]
    planted.run(first, 0)
    failed = stages.run_stages(first, PROFILES["embedded"], lambda seeds: [spec(v, s) for v in ARMS for s in seeds],
                               planted.run, planted.verdict, lambda: False)
    assert failed == []
    trained = {stage: {v for v, _ in pairs} for stage, pairs in planted.stages}
    # At 3 seeds nothing is decided (a comparison has 2 df); fixed_ortho's 0.3 is decided at 5, so it stops there.
    assert trained[1] == set(ARMS) and all(trained[k] == {"relu", "adaptive_ortho"} for k in trained if k >= 2)
    final = planted.verdict({r["trial_id"] for r in planted.rows}).main.by_arm()
    assert final["fixed_ortho"].claim == "better than relu" and final["fixed_ortho"].n == 5
    assert final["adaptive_ortho"].n == 9  # undecided to the last look, or decided there
    assert [s for s, _ in planted.stages] == [0, 1, 2, 3]


def test_a_run_whose_every_arm_is_decided_stops_and_a_missing_verdict_stops_too(capsys):
    planted = PlantedRun(noise=0.001)
    first = [spec(v, s) for v in ("relu", "fixed_ortho") for s in (42, 43, 44, 45, 46)]
    planted.run(first, 0)
    stages.run_stages(first, PROFILES["embedded"], lambda seeds: [spec(v, s) for v in ("relu", "fixed_ortho")
                                                                   for s in seeds], planted.run, planted.verdict,
                      lambda: False)
    assert [s for s, _ in planted.stages] == [0] and "every arm decided" in capsys.readouterr().out
    stages.run_stages(first, PROFILES["embedded"], lambda seeds: [], planted.run, lambda keys: "no grid.parquet",
                      lambda: False)
    assert "no verdict (no grid.parquet); the staged run stops here" in capsys.readouterr().out
    assert stages.needing_seeds("no grid.parquet") is None


def test_a_signal_between_stages_stops_the_run():
    planted = PlantedRun()
    first = [spec(v, s) for v in ARMS for s in (42, 43, 44)]
    planted.run(first, 0)
    stages.run_stages(first, PROFILES["embedded"], lambda seeds: [spec(v, s) for v in ARMS for s in seeds],
                      planted.run, planted.verdict, lambda: True)
    assert [s for s, _ in planted.stages] == [0, 1]


def test_a_staged_run_declares_its_looks_on_every_row_and_the_verdict_spends_alpha_over_them():
    from dataclasses import replace

    from hsae.models import ModelInfo
    from hsae.results import trial_row

    profile = replace(PROFILES["tiny"], seed_looks=4)
    model = ModelInfo(source="tiny", family="gemma2", layer=2, d_model=64, n_layers=4, bos_id=None, eos_id=None,
                      dtype="float32", identity={})
    row = trial_row(spec("relu", 42), profile, model, None, None, "completed")
    assert (row["seed_looks"], row["equivalence_margin"]) == (4, 0.05)
    rows = pd.DataFrame([{"trial_id": f"{a}{s}", "variant": a, "arm": a, "seed": s,
                          "frontier_area": 0.3 + ARMS[a] + 0.01 * ((s * 7 + len(a)) % 3)} for a in ARMS
                         for s in range(5)])
    one, four = (V.arm_tests(rows, "frontier_area", looks=k)[0] for k in (1, 4))
    assert (one.alpha, four.alpha) == (0.05, 0.0125)
    assert four.by_arm()["fixed_ortho"].hi - four.by_arm()["fixed_ortho"].lo > \
        one.by_arm()["fixed_ortho"].hi - one.by_arm()["fixed_ortho"].lo
    with pytest.raises(ValueError, match="2 values of seed_looks"):
        V.declared(rows.assign(seed_looks=[1] * 10 + [4] * 5), "seed_looks", 1)
    assert math.isclose(V.declared(rows, "equivalence_margin", V.DEFAULT_MARGIN), 0.05)


def test_a_run_declaring_another_verdict_restores_another_tune_experiment():
    """A restored Tune experiment runs its trials with the declarations it started with: --resume must find only an
    experiment that declared the same margin and looks (the profile's own keep the name they always had)."""
    from dataclasses import replace

    from tune.search import verdict_suffix

    embedded = PROFILES["embedded"]
    assert verdict_suffix(embedded) == "" and verdict_suffix(PROFILES["tiny"]) == ""
    staged, stricter = replace(embedded, seed_looks=2), replace(embedded, equivalence_margin=0.03)
    names = {verdict_suffix(p) for p in (embedded, staged, stricter, replace(embedded, seed_looks=3))}
    assert len(names) == 4  # each declaration its own experiment
    assert verdict_suffix(staged) == verdict_suffix(replace(embedded, seed_looks=2))  # and the same one again
