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
from pathlib import Path
from typing import Any

from hsae.spaces import Profile, TrialSpec
from hsae.stats import seed_looks
from hsae.verdict import BASELINE, Verdict, arm_names

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


def arms_of(specs: list[TrialSpec], rows: Any) -> dict[str, str]:
    """Each configuration's arm name as the verdict names it, from the finished rows of ``specs``."""
    named = rows.assign(_arm=arm_names(rows).to_numpy()).set_index("trial_id")["_arm"]
    return {identity(s): str(named[s.key]) for s in specs if s.key in named.index}


def needing_seeds(verdict: Verdict | str) -> set[str] | None:
    """The arms a next stage trains: every arm not yet decided on the headline (and relu, its pair); None when
    there is no verdict to read (then the run stops and the report says why)."""
    if not isinstance(verdict, Verdict):
        return None
    test = verdict.main
    undecided = {a.arm for a in test.arms if not a.decided} | set(test.untested)
    return undecided | {BASELINE} if undecided else set()


def stage_verdict(out: str, experiments: set[str]) -> Verdict | str:
    """The verdict over these experiments' rows, as the report computes it (bootstrap cells aside: they choose
    nothing, so a few resamples do)."""
    from hsae.results import ResultsStore
    from tune.report_data import ReportInputs

    ResultsStore(out).consolidate()  # the rows so far, as the report will read them
    inputs = ReportInputs.load(out, n_boot=20)
    return replace(inputs, trials=inputs.trials[inputs.trials["experiment"].isin(experiments)]).verdict


def run_stages(first_specs: list[TrialSpec], profile: Profile, out: str,
               make_specs: Callable[[list[int]], list[TrialSpec]],
               run: Callable[[list[TrialSpec], int], list[Any]], stopped: Callable[[], bool]) -> list[Any]:
    """The stages after the first look: ``make_specs(seeds)`` gives the space's trials at those seeds, ``run(specs,
    stage)`` trains them (returning failures), ``stopped()`` says a signal arrived. Prints each look."""
    import pandas as pd

    looks = looks_of(profile, len({s.seed for s in first_specs}))
    experiments = {s.experiment for s in first_specs}
    failed: list[Any] = []
    done = list(first_specs)
    for stage in range(1, len(looks)):
        verdict = stage_verdict(out, experiments)
        arms = needing_seeds(verdict)
        print(look_line(stage, looks, verdict, arms), flush=True)
        if not arms:
            return failed
        rows = pd.read_parquet(Path(out) / "trials.parquet")
        named = arms_of(done, rows[rows["trial_id"].isin({s.key for s in done})])
        specs = [s for s in make_specs(stage_seeds(looks, stage)) if named.get(identity(s)) in arms]
        if not specs:
            return failed
        failed += run(specs, stage)
        done += specs
        if stopped():
            return failed
    print(look_line(len(looks), looks, stage_verdict(out, experiments), None), flush=True)
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
