"""How a space's trials are chosen: every grid point, or Optuna sampling one block's ranges.

Optuna's study lives in an Optuna storage (``--optuna-storage``, default ``sqlite:///<out>/optuna.db``), so
``optuna-dashboard`` opens it while the sweep runs, and a crashed sweep continues the same study: its finished
trials count against ``--samples`` (one a crash cut short runs again) and inform the sampler.
``--objectives`` names one metric or several (a multi-objective study, e.g. reconstruction against forget
accuracy at matched retain); the report draws the Pareto front of the rows (docs/sweeps.md, "Optuna").
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hsae.keys import content_key
from hsae.profiles import PROFILES, VERDICT_FIELDS, Profile
from hsae.scoring import CANDIDATES, higher_is_better
from hsae.spaces import Space, SpaceError, TrialSpec
from hsae.verdict import WITNESS

# Every metric a study may optimise, with its direction; the evaluated ones exist only when a trial is scored: the
# verdict's candidates (the declared headline, frontier_area by default, among them) and the second witness's
# primary, each in the verdict's own direction.
EVALUATED_OBJECTIVES = {m: "max" if higher_is_better(m) else "min" for m in (*CANDIDATES, WITNESS)}
OBJECTIVES = {"val_mse": "min", "explained_variance": "max", "l0": "min", **EVALUATED_OBJECTIVES}


def parse_objectives(text: str, evaluate: bool) -> list[tuple[str, str]]:
    """``"val_mse,forget_acc_at_retain98"`` -> [(metric, "min"|"max")]; ValueError names the valid choices."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"--objectives must name distinct metrics, got {text!r}; valid: {sorted(OBJECTIVES)}")
    for name in names:
        if name not in OBJECTIVES:
            raise ValueError(f"--objectives: unknown metric {name!r}; valid: {sorted(OBJECTIVES)}")
        if name in EVALUATED_OBJECTIVES and not evaluate:
            raise ValueError(f"--objectives {name} needs the evaluation, which is off (--no-eval or --set "
                             f"evaluate=false); choose from "
                             f"{sorted(set(OBJECTIVES) - set(EVALUATED_OBJECTIVES))}")
    return [(name, OBJECTIVES[name]) for name in names]


def objectives_text(objectives: list[tuple[str, str]]) -> str:
    """The rows' ``search_objectives`` value: ``metric:direction`` pairs, comma-separated."""
    return ",".join(f"{name}:{mode}" for name, mode in objectives)


def storage_url(args: argparse.Namespace) -> str:
    """``--optuna-storage``, or an SQLite file in the results directory."""
    return args.optuna_storage or f"sqlite:///{Path(args.out).resolve() / 'optuna.db'}"


def check_storage_url(url: str) -> None:
    """A storage URL that SQLAlchemy can parse, checked before compute (nothing is opened or written)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        make_url(url).get_dialect()
    except (ArgumentError, NoSuchModuleError) as exc:
        raise ValueError(f"--optuna-storage {url!r} is not a database URL (e.g. sqlite:///results/optuna.db, "
                         f"postgresql://user@host/db): {exc}") from exc


SEARCHES = ("grid", "optuna")


def check_search(space: Space, search: str) -> None:
    """Refuse a space that ``--search`` cannot run, in the plan (before Ray and in --dry-run): Optuna samples the
    ranges of one trained block, so a space with several blocks, an external arm or nothing to sample is a grid's.
    (A grid refuses sampled ranges itself: ``hsae.spaces.grid_trials``.)"""
    if search != "optuna":
        return
    advice = "use --search grid, or a space file of one block with a range to sample (docs/sweeps.md, \"Optuna\")"
    if len(space.blocks) != 1:
        variants = ", ".join(b.variant for b in space.blocks)
        raise SpaceError(f"--search optuna samples one block's ranges, and space {space.name!r} has "
                         f"{len(space.blocks)} blocks ({variants}): {advice}")
    block = space.blocks[0]
    if block.external is not None:
        raise SpaceError(f"--search optuna: space {space.name!r} is an external arm, which has nothing to sample: "
                         f"{advice}")
    if not any(isinstance(v, dict) for v in block.params.values()):
        raise SpaceError(f"--search optuna: space {space.name!r} fixes every parameter of {block.variant!r}, so "
                         f"there is nothing to sample (a range is {{uniform|loguniform|int|choice|grid: ...}}): "
                         f"{advice}")


def tune_name(trials: list[TrialSpec]) -> str:
    """Tune's experiment: one per sweep context, so a resume never mixes models or budgets."""
    return f"{trials[0].experiment}-{trials[0].context[:8]}"


def verdict_suffix(profile: Profile) -> str:
    """The verdict's declarations (margin, staged looks), when they differ from the profile's own, as a suffix of the
    Tune experiment's name: a restored experiment runs its trials with the declarations it started with, so --resume
    must restore only one that declared the same (another one starts anew; finished trials are not redone)."""
    ours = {f: getattr(profile, f) for f in VERDICT_FIELDS}
    declared = PROFILES.get(profile.name)
    if declared is not None and ours == {f: getattr(declared, f) for f in VERDICT_FIELDS}:
        return ""
    return "-v" + content_key(ours, length=6)


def study_name(trials: list[TrialSpec], objectives: list[tuple[str, str]]) -> str:
    """Optuna's study: Tune's experiment and what it optimises (other objectives are another study)."""
    return f"{tune_name(trials)}-{'+'.join(m for m, _ in objectives)}"


# A trial a crashed sweep left RUNNING: failed by the next run, and not counted against --samples.
CRASHED_ATTR = "hsae_crashed"


def open_study(url: str, name: str, objectives: list[tuple[str, str]]) -> tuple[Any, Any]:
    """The storage and the (new or existing) study; trials a crash left running are marked failed."""
    import optuna

    storage = optuna.storages.RDBStorage(url)
    directions = ["minimize" if mode == "min" else "maximize" for _, mode in objectives]
    study = optuna.create_study(storage=storage, study_name=name, directions=directions, load_if_exists=True)
    for trial in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
        storage.set_trial_user_attr(trial._trial_id, CRASHED_ATTR, True)
        storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
    return storage, study


def finished_in_study(study: Any) -> int:
    """Trials that count against --samples: every finished one but those a crash cut short (run again)."""
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    return sum(not t.user_attrs.get(CRASHED_ATTR) for t in study.get_trials(states=states))


def told_state(result: dict | None, error: bool, metrics: list[str]) -> tuple[Any, list[float] | None]:
    """What Optuna is told of a finished trial: its values once evaluated (the final report), else why not."""
    import optuna

    values = [None if result is None else result.get(m) for m in metrics]
    if result is not None and result.get("degenerate"):
        return optuna.trial.TrialState.FAIL, None  # a guard tripped: no values exist
    if result is None or not result.get("final") or any(v is None or v != v for v in values):
        # Stopped early (a half-trained val_mse is no result), failed, or no setting met the retain bar.
        return (optuna.trial.TrialState.FAIL if error else optuna.trial.TrialState.PRUNED), None
    return optuna.trial.TrialState.COMPLETE, [float(v) for v in values]


def study_searcher(storage: Any, name: str, objectives: list[tuple[str, str]], seen: int) -> Any:
    """Ray Tune's OptunaSearch on the persisted study, told each trial's objectives once it is evaluated."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    class StudySearch(OptunaSearch):
        @property
        def metric(self) -> None:
            # The objectives arrive with the final (evaluated) result only, so Tune must not demand them at
            # every step; the study's own metric names stay in ``_metric``.
            return None

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            pass  # no intermediate values: the pruner is Optuna's NopPruner, ASHA does the pruning

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if trial_id not in self._ot_trials:
                return
            state, values = told_state(result, error, self._metric)
            if trial_id in self._completed_trials:
                self._retried(self._ot_trials[trial_id], state, values)
                return
            try:  # a trial told before a crash and reported again after --resume is already finished
                self._ot_study.tell(self._ot_trials[trial_id], values, state=state, skip_if_finished=True)
            except (ValueError, RuntimeError) as exc:
                print(f"[hsae] Optuna could not record trial {trial_id}: {exc}")
            self._completed_trials.add(trial_id)

        def _retried(self, ot_trial: Any, state: Any, values: list[float] | None) -> None:
            """A trial told FAIL that --resume ran again to the end: its values join the study as a new trial."""
            told = self._ot_study._storage.get_trial(ot_trial._trial_id)
            if told.state == optuna.trial.TrialState.FAIL and state == optuna.trial.TrialState.COMPLETE:
                self._ot_study.add_trial(optuna.trial.create_trial(params=told.params, values=values,
                                                                   distributions=told.distributions))

    # TPE seeded past the trials the study has seen: a resumed study draws new points, not its first ones again.
    return StudySearch(metric=[m for m, _ in objectives], mode=[d for _, d in objectives], study_name=name,
                       storage=storage, sampler=optuna.samplers.TPESampler(seed=42 + seen))


def make_scheduler(name: str, profile: Profile) -> Any:
    """ASHA on held-out MSE (searches) or FIFO (ablation grids keep every arm)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    # Grace period: a third of training (early losses of sparse, orthogonality-penalised SAEs cross); halving
    # at each rung; max_t one past the last step so the final report (evaluation) is never cut. Under ASHA trials
    # train their budget: tune/plan.py turns extensions off, since a rung past the budget would cut them.
    if name == "asha":
        steps = profile.train.steps
        return ASHAScheduler(time_attr="step", metric="val_mse", mode="min", grace_period=max(1, steps // 3),
                             reduction_factor=2, max_t=steps + 1)
    return FIFOScheduler()


def default_scheduler(args: argparse.Namespace, space: Space) -> str:
    """ASHA prunes on val_mse, so it suits a search on val_mse alone; other studies keep every trial."""
    if args.scheduler:
        return args.scheduler
    if args.search == "optuna":
        return "asha" if args.objectives_parsed == [("val_mse", "min")] else "fifo"
    return space.scheduler


def search_setup(space: Space, trials: list[TrialSpec], pending: list[TrialSpec], profile: Profile,
                 args: argparse.Namespace, ctx: dict[str, Any], max_concurrent: int) -> tuple[dict[str, Any], Any]:
    """Param space and TuneConfig: a grid over the pending trials, or Optuna sampling one block's ranges."""
    from ray import tune

    common = dict(scheduler=make_scheduler(default_scheduler(args, space), profile),
                  max_concurrent_trials=max_concurrent, trial_dirname_creator=trial_dirname,
                  reuse_actors=True)
    if args.search == "grid":
        return {"trial": tune.grid_search([t.as_dict() for t in pending]), "ctx": ctx}, tune.TuneConfig(**common)
    url, name = storage_url(args), study_name(trials, args.objectives_parsed)
    storage, study = open_study(url, name, args.objectives_parsed)
    remaining = args.samples - finished_in_study(study)
    print(f"[hsae] Optuna study {name!r} in {url}: {args.samples - remaining} of {args.samples} trials over; "
          f"optuna-dashboard {url}")
    sampled = {k: to_tune_domain(v) for k, v in space.blocks[0].params.items() if isinstance(v, dict)}
    param_space = {"trial": trials[0].as_dict(), "sampled": sampled,
                   "ctx": {**ctx, "objectives": objectives_text(args.objectives_parsed), "study": name}}
    searcher = study_searcher(storage, name, args.objectives_parsed, len(study.trials))
    return param_space, tune.TuneConfig(search_alg=searcher, num_samples=max(0, remaining), **common)


def trial_dirname(trial: Any) -> str:
    """A trial's folder under ray_results/: variant and Tune's id (Tune's default spells out the whole config)."""
    variant = (trial.config.get("trial") or {}).get("variant", "trial")
    return f"{variant}_{trial.trial_id}"


def to_tune_domain(spec: dict[str, Any]) -> Any:
    from ray import tune

    kind, arg = next(iter(spec.items()))
    return {"uniform": lambda: tune.uniform(*arg), "loguniform": lambda: tune.loguniform(*arg),
            "int": lambda: tune.randint(int(arg[0]), int(arg[1]) + 1), "choice": lambda: tune.choice(arg),
            "grid": lambda: tune.choice(arg)}[kind]()
