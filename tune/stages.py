"""Seeds added in stages until each arm is decided (``--until-decided``; docs/evaluation.md, "Seeds in stages").

The first look is the space's seeds; after it the driver computes the verdict the report will show (the same
``build_verdict``, at 0.05 / ``seed_looks``) and gives every arm still undecided, and relu, its pair, the next
``seeds_per_stage`` seeds, until every arm is decided or the declared ``max_seeds`` is reached. The looks are
fixed before the run (``hsae.stats.seed_looks``), so the family-wise rate over all of them is 0.05 by
construction; ``tests/test_calibration.py`` simulates the whole sequence. A stage's seeds are new blocks
(42 + i, continuing), its trials ordinary trials of the space, so ``--resume`` finds every finished one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from hsae.profiles import Profile
from hsae.spaces import TrialSpec
from hsae.stats import seed_looks
from hsae.verdict import BASELINE, Verdict

FIRST_SEED = 42


def looks_of(profile: Profile, first: int) -> list[int]:
    """The seed counts at which this profile's staged run looks: ``first``, then ``seeds_per_stage`` more each
    time, up to ``max_seeds``."""
    return seed_looks(first, profile.seeds_per_stage, profile.max_seeds)


def stage_seeds(looks: list[int], stage: int) -> list[int]:
    """The seeds a stage adds: the first look's 42 .. 42 + n - 1, then each later look's new ones."""
    start = looks[stage - 1] if stage else 0
    return [FIRST_SEED + i for i in range(start, looks[stage])]


def identity(spec: TrialSpec) -> str:
    """What makes trials one arm whatever their seed: the variant, its parameters and the arm label."""
    return json.dumps([spec.variant, spec.arm or "", spec.params], sort_keys=True, default=str)


def arms_of(specs: list[TrialSpec], verdict: Verdict) -> dict[str, str]:
    """Each configuration's arm name as the verdict names it, from its ranked trials among ``specs`` (an arm
    with no ranked trial, none converged, gets no seeds: more of them would not converge either)."""
    named = verdict.per_trial.set_index("trial_id")["arm"]
    return {identity(s): str(named[s.key]) for s in specs if s.key in named.index}


def needing_seeds(verdict: Verdict | str) -> set[str] | None:
    """The arms a next stage trains: every arm not yet decided on the headline (and relu, its pair); None when
    there is no verdict to read (then the run stops and the report says why)."""
    if not isinstance(verdict, Verdict):
        return None
    test = verdict.main
    undecided = {a.arm for a in test.arms if not a.decided} | set(test.untested)
    return undecided | {BASELINE} if undecided else set()


def stage_verdict(out: str, keys: set[str]) -> Verdict | str:
    """The verdict over these trials' rows, as the report computes it (bootstrap cells aside: they choose
    nothing, so a few resamples do)."""
    from hsae.results import ResultsStore
    from tune.report_data import ReportInputs

    ResultsStore(out).consolidate()  # the rows so far, as the report will read them
    inputs = ReportInputs.load(out, n_boot=20)
    return replace(inputs, trials=inputs.trials[inputs.trials["trial_id"].isin(keys)]).verdict


def run_stages(first_specs: list[TrialSpec], profile: Profile, make_specs: Callable[[list[int]], list[TrialSpec]],
               run: Callable[[list[TrialSpec], int], list[Any]], verdict_of: Callable[[set[str]], Verdict | str],
               stopped: Callable[[], bool]) -> list[Any]:
    """The stages after the first look: ``make_specs(seeds)`` gives the space's trials at those seeds, ``run(specs,
    stage)`` trains them (returning failures), ``verdict_of(trial ids)`` is the verdict over those trials' rows,
    ``stopped()`` says a signal arrived. Prints each look."""
    looks = looks_of(profile, len({s.seed for s in first_specs}))
    failed: list[Any] = []
    done = list(first_specs)
    for stage in range(1, len(looks)):
        verdict = verdict_of({s.key for s in done})
        arms = needing_seeds(verdict)
        print(look_line(stage, looks, verdict, arms), flush=True)
        if not arms:
            return failed
        named = arms_of(done, verdict)
        specs = [s for s in make_specs(stage_seeds(looks, stage)) if named.get(identity(s)) in arms]
        if not specs:
            return failed
        failed += run(specs, stage)
        done += specs
        if stopped():
            return failed
    print(look_line(len(looks), looks, verdict_of({s.key for s in done}), None), flush=True)
    return failed


def look_line(stage: int, looks: list[int], verdict: Verdict | str, arms: set[str] | None) -> str:
    """One line per look: what is decided, and which arms train on."""
    head = f"[hsae] look {stage}/{len(looks)} at {looks[stage - 1]} seeds"
    if not isinstance(verdict, Verdict):
        return f"{head}: no verdict ({verdict}); the staged run stops here"
    decided = ", ".join(f"{a.arm} {a.claim}" for a in verdict.main.arms if a.decided) or "none yet"
    if arms is None:
        return f"{head} (the last): decided: {decided}; undecided: {', '.join(verdict.main.undecided()) or 'none'}"
    if not arms:
        return f"{head}: every arm decided ({decided}); no further stage"
    return (f"{head}: decided: {decided}; {', '.join(sorted(arms - {BASELINE}))} and {BASELINE} train "
            f"{looks[stage] - looks[stage - 1]} more seed(s)")
