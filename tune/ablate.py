"""Sweep entry point: ``python tune/ablate.py --space ortho`` (also ``hsae-ablate``).

Validates every input before compute (exit code 2 with a message naming the bad value), starts or
connects to Ray, creates the activation server (the only process that loads the language model),
runs the positive/negative evaluation controls, then one Tuner per space; every trial writes its own
Parquet row; failed trials are listed and make the command exit 1.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from functools import partial
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
# Tune's "snapshotting has been triggered multiple times" warning, printed at every burst of checkpoints of short
# trials: chatter, not a fault (the snapshot is what --resume restores from).
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

from hsae.activations import HarvestConfig, cache_dir, harvest_key  # noqa: E402
from hsae.atomic import atomic_write_text  # noqa: E402
from hsae.config import SAEConfig  # noqa: E402
from hsae.external import check_trials as check_external_trials  # noqa: E402
from hsae.external import is_external  # noqa: E402
from hsae.keys import content_key  # noqa: E402
from hsae.machine import (  # noqa: E402
    PRECISIONS,
    Layout,
    PrecisionChoice,
    RunSettings,
    default_layout,
    machine_cores,
    resolve_precision,
)
from hsae.models import ModelInfo, ModelSpec, cache_root, describe_model, model_config  # noqa: E402
from hsae.preflight import Sizes, check_fits, check_plan, describe_sizes, plan_sizes  # noqa: E402
from hsae.profiles import PROFILES, Profile, get_profile, override, parse_profile_settings  # noqa: E402
from hsae.results import ResultsStore, control_grid_rows  # noqa: E402
from hsae.spaces import (  # noqa: E402
    NOT_IN_ALL,
    Space,
    TrialSpec,
    all_spaces,
    grid_trials,
    load_space,
    shipped_spaces,
    sweep_context,
    validate_trials,
)
from hsae.train import step_seconds  # noqa: E402
from hsae.verdict import ALPHA, NEGATIVE_MAX, POSITIVE_MIN, controls_in_range  # noqa: E402
from tune.breakdown import breakdown, format_breakdown, write_breakdown  # noqa: E402
from tune.interrupt import Interrupts, SweepInterrupted, interrupted_message  # noqa: E402
from tune.nodes import SharedStorageError, check_shared_storage  # noqa: E402
from tune.progress import SweepProgress  # noqa: E402
from tune.search import (  # noqa: E402
    OBJECTIVES,
    SEARCHES,
    check_search,
    check_storage_url,
    default_scheduler,
    parse_objectives,
    search_setup,
    storage_url,
    tune_name,
)
from tune.stages import looks_of, run_stages, stage_verdict  # noqa: E402
from tune.trackers import TRACKERS, check_trackers, tracker_callbacks  # noqa: E402

EXIT_BAD_INPUT = 2
EXIT_TRIALS_FAILED = 1
# The sweep ran and its rows are written, but the evaluation controls were out of range: the evaluation
# cannot detect removal on this model, so no score is a result (rows carry controls_ok = false).
EXIT_CONTROLS_FAILED = 3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hsae-ablate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", required=True, help=space_help())
    p.add_argument("--profile", default="embedded", help=f"one of {sorted(PROFILES)} (default embedded)")
    p.add_argument("--experiment", default=None, help="name; a re-run with the same name skips finished trials "
                                                      "(default <profile>-<space>)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per configuration (42, 43, ...; default: the "
                                                             "profile's, 3 for embedded and real)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the profile's)")
    p.add_argument("--tokens", type=int, default=None, help="token budget per trial (steps = tokens / batch size); "
                                                            "beyond the cache's rows it streams (docs/sweeps.md)")
    p.add_argument("--activations", default=None, choices=["cache", "stream"],
                   help="training rows from the disk cache or a stream (default: the profile's; stream when "
                        "--tokens exceeds the cache)")
    p.add_argument("--model", default=None, help="'embedded', 'tiny', a hub id or a local directory")
    p.add_argument("--layer", type=int, default=None)
    p.add_argument("--d-sae", type=int, default=None, help="dictionary size (default: the profile's)")
    p.add_argument("--n-ctxs", type=int, default=None, help="contexts of ctx_len tokens to harvest")
    p.add_argument("--eval-model", default=None, help="the model evaluation scores on (real: the -it twin); "
                                                       "a hub id or a local directory")
    p.add_argument("--forget-corpus", default=None, help="real profile: the WMDP bio forget corpus, a hub id, a local "
                                                          "JSONL or a folder in the hub's layout")
    p.add_argument("--retain-corpus", default=None, help="real profile: WikiText (hub id or local copy)")
    p.add_argument("--wmdp", default=None, help="real profile: WMDP question sets (hub id or local copy)")
    p.add_argument("--mmlu", default=None, help="real profile: MMLU (hub id or local copy)")
    add_run_arguments(p)
    return p


def space_help() -> str:
    """``--space``'s choices, read from the shipped space files (``tune/spaces/*.yaml``)."""
    return (f"a shipped space ({', '.join(shipped_spaces())}), 'all' (every shipped space but "
            f"{' and '.join(NOT_IN_ALL)}, which are not ablations: run them by name; docs/sweeps.md, \"Spaces\"), or "
            f"the path of a YAML space file of your own")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """What the run does with the study: profile overrides, where it runs and how, outputs, search, resume."""
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                   help="override any profile field by its path (docs/sweeps.md, \"Profiles and --set\"), e.g. "
                        "--set train.batch_size=512 (or its flat name: batch_size=512); repeatable")
    p.add_argument("--dry-run", action="store_true", help="print the plan (trials, devices, sizes, tokens) and exit")
    p.add_argument("--out", default="results", help="results directory (default results/)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local one)")
    p.add_argument("--search", default="grid", choices=list(SEARCHES))
    p.add_argument("--samples", type=int, default=8, help="trials per space block for --search optuna")
    p.add_argument("--objectives", default="val_mse",
                   help=f"--search optuna: metric or comma-separated metrics to optimise (several: a "
                        f"multi-objective study, Pareto front in the report); one of {sorted(OBJECTIVES)}")
    p.add_argument("--optuna-storage", default=None, help="--search optuna: the study's database URL (default "
                                                          "sqlite:///<out>/optuna.db; open it with optuna-dashboard)")
    p.add_argument("--log", action="append", default=[], choices=list(TRACKERS),
                   help="also log every trial to an experiment tracker (Ray Tune's callback; repeatable; "
                        "pip install -e '.[trackers]')")
    p.add_argument("--verbose", action="store_true", help="print Ray Tune's own status tables as well")
    p.add_argument("--scheduler", default=None, choices=["asha", "fifo"], help="default: the space's")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="concurrent trials (default: the plan's layout for this machine's cores, printed; a local "
                        "cluster gets a logical CPU per trial)")
    p.add_argument("--threads-per-trial", type=int, default=None, help="torch threads per trial (default: the plan's "
                                                                       "layout, 1 on CPUs)")
    p.add_argument("--precision", default="auto", choices=list(PRECISIONS),
                   help="training precision: auto (bf16 where the device computes it natively and faster: CUDA by "
                        "capability, a CPU by a measured probe) or forced; a run setting, not part of the trial key")
    p.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPU fraction per trial on GPU clusters")
    p.add_argument("--resume", action="store_true", help="restore the interrupted Tune experiment")
    p.add_argument("--until-decided", action="store_true",
                   help="add seeds in stages (the profile's seeds_per_stage, up to max_seeds) to every arm still "
                        "undecided on the headline, and to relu; the looks are declared before the run and share "
                        "the family-wise 0.05 (docs/evaluation.md, \"Seeds in stages\")")
    p.add_argument("--no-eval", action="store_true", help="skip the unlearning/CE evaluation")
    p.add_argument("--cache", default=None, help="cache directory (default $HSAE_CACHE or ~/.cache/hsae)")


@dataclass(frozen=True)
class Plan:
    """A validated sweep: the profile, the model's facts (read from its config), the spaces and their trials."""

    profile: Profile
    model: ModelInfo
    harvest: HarvestConfig
    spaces: list[Space]
    trials: dict[str, list[TrialSpec]]
    sizes: Sizes
    eval_model: ModelInfo | None = None
    settings: RunSettings = RunSettings()
    layout: Layout = Layout(1, 1, "")
    precision: PrecisionChoice | None = None  # None: resolved on each trial's node (GPU clusters)


def check_args(args: argparse.Namespace) -> None:
    if args.seeds is not None and args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    if not 0 <= args.gpus_per_trial <= 8:
        raise ValueError(f"--gpus-per-trial must be in [0, 8], got {args.gpus_per_trial}")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ValueError(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
    if args.threads_per_trial is not None and args.threads_per_trial < 1:
        raise ValueError(f"--threads-per-trial must be >= 1, got {args.threads_per_trial}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.tokens is not None and (args.tokens < 1 or args.steps is not None):
        raise ValueError(f"--tokens must be >= 1 and not given with --steps, got {args.tokens}")
    if args.search == "optuna":
        check_storage_url(storage_url(args))
    check_trackers(args.log)


def resolve_profile(args: argparse.Namespace) -> Profile:
    profile = get_profile(args.profile, steps=args.steps, model=args.model, layer=args.layer, d_sae=args.d_sae,
                          n_ctxs=args.n_ctxs, eval_model=args.eval_model, forget_corpus=args.forget_corpus,
                          retain_corpus=args.retain_corpus, wmdp_questions=args.wmdp, mmlu_questions=args.mmlu)
    profile = override(profile, parse_profile_settings(args.set, profile))
    profile = with_token_budget(profile, args.tokens, args.activations)
    if args.no_eval:
        profile = replace(profile, evaluate=False)
    if args.until_decided:
        profile = staged(profile, args)
    profile.train_config(42)  # validates steps, batch size, lr
    rows = profile.cache_rows()
    if rows < profile.train.batch_size:
        raise ValueError(f"n_ctxs={profile.harvest.n_ctxs} gives {rows} training activations, fewer than one batch "
                         f"of {profile.train.batch_size}: raise --n-ctxs")
    return profile


def staged(profile: Profile, args: argparse.Namespace) -> Profile:
    """The profile of a staged run: its looks declared (``seed_looks``), refused where there is no verdict to
    read between stages."""
    if args.no_eval or not profile.evaluate:
        raise ValueError("--until-decided decides on the headline, which the evaluation computes: drop --no-eval")
    if args.search != "grid":
        raise ValueError("--until-decided adds seeds to a grid's arms; --search optuna samples its own trials")
    return replace(profile, seed_looks=len(looks_of(profile, args.seeds or profile.seeds)))


def with_token_budget(profile: Profile, tokens: int | None, activations: str | None) -> Profile:
    """Steps from a token budget, and the stream whenever the budget exceeds what the cache would hold."""
    if tokens is not None:
        profile = override(profile, {"train.steps": -(-tokens // profile.train.batch_size)})
        if activations is None and tokens > profile.cache_rows():
            activations = "stream"
    return replace(profile, activations=activations or profile.activations)


def space_trials(space: Space, args: argparse.Namespace, profile: Profile, context: str,
                 seeds: list[int] | None = None) -> list[TrialSpec]:
    """The space's trials: every grid point x seed (42, 43, ... unless ``seeds`` are given), or (Optuna) each
    block's fixed values x seed."""
    experiment = args.experiment or f"{profile.name}-{space.name}"
    seeds = seeds or [42 + i for i in range(args.seeds or profile.seeds)]
    if args.search == "grid":
        return [t if is_external(t.variant) else replace(t, params=profile.trial_params(t.params))
                for t in grid_trials(space, experiment, seeds, context)]
    return [TrialSpec(experiment, space.name, b.variant,
                      profile.trial_params({k: v for k, v in b.params.items() if not isinstance(v, dict)}), s, context)
            for b in space.blocks for s in seeds]


def resolve(args: argparse.Namespace) -> Plan:
    """Everything validated before any compute; raises ValueError/SpaceError/FileNotFoundError."""
    check_args(args)
    profile = resolve_profile(args)
    args.objectives_parsed = parse_objectives(args.objectives, evaluate=profile.evaluate)
    spaces = plan_spaces(args)  # before the model is read: a space the search cannot run is refused at once
    harvest = profile.harvest
    spec = harvest.model
    config = model_config(spec)
    model = describe_model(spec, config)  # the model's facts (the harvest's dtype), layer checked
    twin = check_eval_model(profile, model)
    if any(default_scheduler(args, space) == "asha" for space in spaces):
        # ASHA compares trials at fixed steps: an extension would meet a rung the budget never reaches.
        profile = override(profile, {"train.max_extensions": 0})
    context = sweep_context(profile, harvest_key(harvest))
    trials = {space.name: space_trials(space, args, profile, context) for space in spaces}
    for specs in trials.values():
        validate_trials(specs, profile, model.d_model)
        check_external_trials(specs, model.d_model, model.layer, {model.name, model.source})
    if not args.dry_run:
        ResultsStore(args.out).check_writable()
    sizes = plan_sizes(profile, model, config, [t for ts in trials.values() for t in ts])
    layout = run_layout(args, profile)
    settings = RunSettings(precision=args.precision, threads_per_trial=layout.threads)
    return Plan(profile, model, harvest, spaces, trials, sizes, twin, settings, layout,
                plan_precision(args, model.d_model, profile.d_sae, layout.threads))


def plan_spaces(args: argparse.Namespace) -> list[Space]:
    """The spaces ``--space`` names (``all``: every shipped one but ``NOT_IN_ALL``), each checked against
    ``--search``."""
    spaces = [load_space(n) for n in (all_spaces() if args.space == "all" else [args.space])]
    for space in spaces:
        check_search(space, args.search)
    return spaces


def run_layout(args: argparse.Namespace, profile: Profile) -> Layout:
    """Trials at once x threads each: --max-concurrent / --threads-per-trial, else the rule for these cores."""
    rule = default_layout(machine_cores(), profile.evaluate)
    if args.max_concurrent is None and args.threads_per_trial is None:
        return rule
    trials, threads = args.max_concurrent or rule.trials, args.threads_per_trial or rule.threads
    return Layout(trials, threads, f"{trials} trials x {threads} thread(s), as asked, {rule.evaluators} evaluator(s)",
                  rule.evaluators)


def plan_precision(args: argparse.Namespace, d_in: int, d_sae: int, threads: int) -> PrecisionChoice | None:
    """The trials' precision where the driver can tell (this machine's CPU); None when trials run on GPUs."""
    if args.gpus_per_trial > 0 or (args.address and args.precision == "auto"):
        return None
    return resolve_precision(args.precision, torch.device("cpu"), d_in, d_sae, threads=threads,
                             persist=not args.dry_run)  # a dry run measures, and writes nothing


def format_machine(plan: Plan) -> str:
    """The plan's machine line: precision and why, and the concurrency layout and its rule."""
    precision = plan.precision.reason if plan.precision else (
        f"{plan.settings.precision}: resolved on each trial's device (bf16 on CUDA capability >= 8.0)")
    return f"[hsae] precision {precision}; concurrency {plan.layout.rule}"


def check_eval_model(profile: Profile, model: ModelInfo) -> ModelInfo | None:
    """The evaluation model's facts; its SAE inputs are the base model's, so width and depth must match."""
    if not profile.eval_model or not profile.evaluate:
        return None
    twin = describe_model(ModelSpec(profile.eval_model, layer=model.layer))
    if (twin.d_model, twin.n_layers) != (model.d_model, model.n_layers):
        raise ValueError(f"--eval-model {profile.eval_model!r} is {twin.n_layers} layers x {twin.d_model}, the base "
                         f"model {model.n_layers} x {model.d_model}: SAEs of one cannot be evaluated on the other")
    return twin


def preflight(plan: Plan, args: argparse.Namespace) -> None:
    """Print the plan (--dry-run) and refuse one that cannot fit (PlanDoesNotFit, exit 2), before compute."""
    concurrent = plan.layout.trials
    if args.dry_run:
        print(format_plan(plan, args, concurrent))
    else:
        print(f"[hsae] training: {format_budget(plan.profile)}")
    print(format_machine(plan), flush=True)
    complete = (cache_dir(harvest_key(plan.harvest)) / "manifest.json").is_file()
    check_plan(plan.sizes, cache_root(), complete, concurrent, args.gpus_per_trial)


def format_plan(plan: Plan, args: argparse.Namespace, concurrent: int) -> str:
    p, m, corpus = plan.profile, plan.model, plan.profile.harvest.corpus
    lines = [f"[hsae] plan for profile {p.name!r} (dry run: nothing is loaded, started or written)",
             f"model              {m.source} ({m.family}, {m.n_layers} layers x {m.d_model}, {m.dtype}), "
             f"layer {m.layer}",
             f"evaluation model   {plan.eval_model.source if plan.eval_model else m.source}"
             + ("" if p.evaluate else " (evaluation off)"),
             f"corpus             {corpus.name}" + (f": forget {corpus.forget}, retain {corpus.retain}"
                                                     if corpus.name == "wmdp" else ""),
             f"questions          {p.bank.kind}" + (f": {p.bank.wmdp}, {p.bank.mmlu}"
                                                      if p.bank.kind == "letter" else ""),
             f"server             1 actor, {'1 GPU' if args.address else 'this machine'}; trials: "
             f"{plan.layout.threads} CPU + {args.gpus_per_trial} GPU each, up to {concurrent} at once",
             f"training           {p.train.steps} steps x {p.train.batch_size}, d_sae {p.d_sae}, lr {p.train.lr}; "
             f"{format_budget(p)}",
             f"headline metric    {p.headline_metric} (declared before the run; the others are descriptive), "
             f"equivalence margin ±{p.equivalence_margin:g}"
             + (f"; seeds in stages until decided: looks at {looks_of(p, args.seeds or p.seeds)} seeds, each at "
                f"α = {ALPHA / p.seed_looks:.4g}" if p.seed_looks > 1 else ""),
             f"activations        {p.activations}" + (
                 f": blocks of {p.stream.block_contexts} contexts, {p.stream.window_blocks} buffered"
                 if p.activations == "stream" else f" ({p.cache_rows():,} rows harvested once)")]
    for space, trials in plan.trials.items():
        variants = sorted({t.variant for t in trials})
        seeds = len({t.seed for t in trials})
        stages = f", up to {len(trials) // seeds * p.max_seeds} if no arm is decided early" if p.seed_looks > 1 else ""
        lines.append(f"space {space:<12} {len(trials)} trials ({seeds} seeds{stages}): {', '.join(variants)}")
    if len(plan.trials) > 1:
        distinct = {t.key for trials in plan.trials.values() for t in trials if not is_external(t.variant)}
        most = p.train.max_steps()
        lines.append(f"in all             {len(distinct)} distinct trials (a trial several spaces ask for trains "
                     f"once): {len(distinct) * p.train.steps:,} SAE steps, up to {len(distinct) * most:,} with "
                     f"extensions")
    return "\n".join(lines + describe_sizes(plan.sizes))


def format_budget(profile: Profile) -> str:
    """Each trial's least and most training steps, and the rule between them (docs/training.md, "Extensions")."""
    cfg = profile.train_config(0)
    if not cfg.max_extensions:
        why = "streamed activations" if profile.train.max_extensions else "max_extensions=0"
        return f"each trial trains {cfg.steps} steps (no extensions: {why})"
    fraction = profile.train.extension_fraction
    share = Fraction(fraction).limit_denominator(12)  # 1/3, not 0.333...
    share_text = str(share) if abs(float(share) - fraction) < 1e-9 else f"{fraction:g}"
    return (f"each trial trains {cfg.steps} to {cfg.max_steps()} steps: one the convergence rule fails trains on "
            f"{cfg.extension_steps} steps ({share_text} of its {cfg.steps}: extension_fraction) at a time, at most "
            f"{cfg.max_extensions} times (--set train.max_extensions=0: exactly {cfg.steps})")


def check_reachable(address: str) -> None:
    """Refuse an address nothing listens on, in seconds (ray.init would retry for minutes)."""
    if address == "auto" or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=3):
            pass
    except (OSError, ValueError) as exc:
        raise ConnectionError(f"no Ray cluster answers at {address!r} ({exc}); start one with `ray start --head` "
                              f"or leave out --address to start a local cluster") from exc


def local_cpus(layout: Layout) -> int:
    """Logical CPUs of a local Ray: what the layout's trials ask for together (streamed trials share one pass
    only if they run at once)."""
    return layout.trials * layout.threads


def connect(address: str | None, layout: Layout | None = None) -> Any:
    """Ray: the cluster at ``address``, or a local one with the logical CPUs the layout's trials ask for."""
    import ray

    if ray.is_initialized():
        return ray
    if address:
        check_reachable(address)
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            ray.init(num_cpus=local_cpus(layout or default_layout(machine_cores(), True)), include_dashboard=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConnectionError(f"cannot connect to a Ray cluster at {address!r}: {exc}") from exc
    return ray


def run_space(space: Space, trials: list[TrialSpec], plan: Plan, args: argparse.Namespace, server_name: str,
              model: ModelInfo, stage: int = 0) -> list[tuple[TrialSpec | None, str]]:
    """One Tuner for one space (one per stage of a staged run); returns the failed trials with their errors."""
    store = ResultsStore(args.out)
    if args.search == "grid":  # Optuna's trials get their ids from the values it samples
        ids_known(store, space, trials)
    finished = store.finished_ids()  # a trial id is its content: finished by any space or experiment here
    pending = [t for t in trials if t.key not in finished]
    if args.search == "grid" and pending and len(pending) < len(trials):
        print(f"[hsae] {trials[0].experiment}: {len(trials) - len(pending)} of {len(trials)} trials already finished "
              f"in {args.out} (by this or another space or experiment); {len(pending)} to run")
    if args.search == "grid" and not pending and not args.resume:
        print(f"[hsae] {trials[0].experiment}: all {len(trials)} trials already finished; nothing to run")
        return []
    tuner = make_tuner(space, trials, pending, plan, args, server_name, stage)
    if tuner is None:
        print(f"[hsae] {trials[0].experiment}: the Optuna study already has its {args.samples} trials; nothing to run")
        return []
    with args.interrupts.tune_loop():
        grid = tuner.fit()
    return record_unfinished(grid, store, plan.profile, model, interrupted=args.interrupts.signum is not None)


def ids_known(store: ResultsStore, space: Space, trials: list[TrialSpec]) -> None:
    """Rows under the ids of before (which hashed the experiment and space names) adopted under content ids,
    the space's declaration recorded (its report section's reference and trend), and its trials recorded as
    asked for by it (each row's ``spaces`` and ``experiments``)."""
    adopted = store.adopt_legacy(trials)
    if adopted:
        print(f"[hsae] {trials[0].experiment}: {adopted} row(s) recorded under an old trial id (one that hashed the "
              f"experiment and space names) now under the trial's content id")
    store.record_space(space.declaration())
    store.record_asked(trials[0].experiment, space.name, [t.key for t in trials])


def trial_order(pending: list[TrialSpec], plan: Plan, args: argparse.Namespace, at_once: int) -> list[TrialSpec]:
    """A new grid sweep's trials seed by seed, the longest training first within a seed, where the trials train
    on this machine's CPU and not all at once; else as given (Optuna samples its own; a cluster's nodes or GPUs
    are not this CPU)."""
    if args.search != "grid" or args.address or plan.precision is None or len(pending) <= at_once:
        return pending
    return longest_first(pending, training_seconds(pending, plan))


def training_seconds(trials: list[TrialSpec], plan: Plan) -> dict[str, float]:
    """Each trial's training time on this CPU, estimated: its steps x one step of its configuration, measured
    here in the trials' threads and precision at its target L0 (an external arm trains nothing: 0; a
    configuration whose step fails here: 0, and its trial reports the error). Prints the step times."""
    first: dict[str, TrialSpec] = {}  # each configuration's first trial
    for t in trials:
        if not is_external(t.variant):
            first.setdefault(configuration(t), t)
    threads = torch.get_num_threads()
    torch.set_num_threads(plan.layout.threads)
    try:
        step = {c: measured_step(t, plan) for c, t in first.items()}
    finally:
        torch.set_num_threads(threads)
    if step:
        configs_of = Counter(t.variant for t in first.values())  # a variant's name alone where it names one
        shown = {c: t.variant if configs_of[t.variant] == 1 else c for c, t in first.items()}
        print("[hsae] trial order: seed by seed, the longest training first; ms per step measured here: "
              + ", ".join(f"{shown[c]} {s * 1e3:.0f}" for c, s in sorted(step.items(), key=lambda kv: -kv[1])))
    return {t.key: plan.profile.train.steps * step.get(configuration(t), 0.0) for t in trials}


def measured_step(trial: TrialSpec, plan: Plan) -> float:
    sae_cfg = SAEConfig(trial.variant, plan.model.d_model, plan.profile.d_sae, trial.params)
    try:
        return step_seconds(sae_cfg, plan.profile.train_config(trial.seed, plan.settings),
                            l0=trial.params.get("target_l0"))
    except Exception as exc:  # noqa: BLE001 - an order, not a result: the trial itself reports the error
        print(f"[hsae] trial order: could not time a step of {configuration(trial)} ({exc}); counted as 0 s")
        return 0.0


def configuration(trial: TrialSpec) -> str:
    """What a trial trains, without its seed: its variant and parameters."""
    return f"{trial.variant} {json.dumps(trial.params, sort_keys=True)}"


def longest_first(trials: list[TrialSpec], seconds: dict[str, float]) -> list[TrialSpec]:
    """Seed by seed as before (trials running together are different configurations), and within a seed the
    longest first, so the sweep ends on its shortest trials and fewer slots idle while the last one finishes
    (docs/performance.md, "Trial order")."""
    return sorted(trials, key=lambda t: (t.seed, -seconds[t.key]))


def make_tuner(space: Space, trials: list[TrialSpec], pending: list[TrialSpec], plan: Plan,
               args: argparse.Namespace, server_name: str, stage: int = 0) -> Any:
    """A new Tuner over the pending trials, or the interrupted one restored (``--resume``); None: nothing to run."""
    import ray
    from ray import tune

    from tune.trainable import run_trial

    storage = str(Path(args.out).resolve() / "ray_results")
    name = tune_name(trials) + (f"-stage{stage}" if stage else "")  # a stage's Tune experiment resumes alone
    trainable = tune.with_resources(run_trial, {"cpu": args.plan_layout.threads, "gpu": args.gpus_per_trial})
    path = os.path.join(storage, name)
    if args.resume and tune.Tuner.can_restore(path):
        print(f"[hsae] resuming Tune experiment at {path}")
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True, param_space=None)
    profile, at_once = plan.profile, trial_concurrency(args, ray)
    ctx = {"profile": asdict(profile), "out": str(Path(args.out).resolve()), "server": server_name,
           "settings": args.plan_settings.as_dict(),
           "hooks": list(args.trial_hooks), "controls_ok": args.controls_ok, "verbose": args.verbose}
    pending = trial_order(pending, plan, args, at_once)
    param_space, tune_config = search_setup(space, trials, pending, profile, args, ctx, at_once)
    if tune_config.num_samples == 0:
        return None
    total = len(pending) if args.search == "grid" else tune_config.num_samples
    budget = profile.train_config(0)
    callbacks = [SweepProgress(args.out, total, profile.train.steps, extension_steps=budget.extension_steps,
                               max_extensions=budget.max_extensions),
                 *tracker_callbacks(args.log, args.out, name)]
    run_config = tune.RunConfig(name=name, storage_path=storage, failure_config=tune.FailureConfig(max_failures=1),
                                checkpoint_config=tune.CheckpointConfig(num_to_keep=2), callbacks=callbacks,
                                verbose=1 if args.verbose else 0)
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)


def record_unfinished(grid: Any, store: ResultsStore, profile: Profile, model: ModelInfo,
                      interrupted: bool = False) -> list[tuple[TrialSpec | None, str]]:
    """Rows for the trials that wrote none (stopped by the scheduler, or failed); returns the failed ones.

    After an interruption (SIGINT/SIGTERM) a trial without a row was stopped by the signal, not by the
    scheduler: it gets no row, so the next invocation runs it again.
    """
    from hsae.results import trial_row
    from tune.trainable import describe_failure, search_values, trial_spec

    failed: list[tuple[TrialSpec | None, str]] = []
    for result in grid:
        cfg = result.config or {}
        if not cfg.get("trial"):
            failed.append((None, describe_failure(result.error)))
            continue
        spec = trial_spec(cfg)
        if store.row(spec.experiment, spec.key) is not None:
            continue
        # Tune kept the metrics the trial reported: they become its row and its curve.
        metrics = result.metrics or {}
        external = is_external(spec.variant)  # an external arm's row has no configuration or training columns
        sae_cfg = None if external else SAEConfig(spec.variant, model.d_model, profile.d_sae, spec.params)
        row = partial(trial_row, spec, profile, model, sae_cfg, None if external else profile.train_config(spec.seed),
                      **search_values(cfg.get("ctx", {})))
        if result.error is not None:
            reason = describe_failure(result.error)
            store.write_trial(row("failed", error=reason, steps=metrics.get("step")), reported_curves(result, spec))
            failed.append((spec, reason))
        elif not interrupted:
            store.write_trial(row("early_stopped", steps=metrics.get("step"), tokens=metrics.get("tokens"),
                                  val_mse=metrics.get("val_mse"), mse=metrics.get("mse"), l0=metrics.get("l0"),
                                  final_loss=metrics.get("loss")), reported_curves(result, spec))
    return failed


def reported_curves(result: Any, spec: TrialSpec) -> list[dict[str, Any]]:
    frame = result.metrics_dataframe
    if frame is None or frame.empty or "step" not in frame:
        return []
    rows = frame[frame["step"] <= frame["step"].max()].to_dict("records")
    return [{**r, "experiment": spec.experiment, "trial_id": spec.key, "variant": spec.variant}
            for r in rows if "loss" in r and r.get("loss") == r.get("loss")]


def start_server(plan: Plan, ray: Any) -> tuple[str, Any, Any]:
    """Create (or find) the activation server and wait until it serves; returns its name, handle and info."""
    from hsae.server import create_activation_server

    profile = plan.profile
    eval_cfg, bank_cfg = profile.eval, profile.bank
    stream = profile.stream_config()
    mode = f"-stream-{content_key(asdict(stream), length=8)}" if stream else ""  # one server per batch cutting
    server_name = f"hsae-activations-{profile.name}-{harvest_key(plan.harvest)}{mode}"
    has_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    server = create_activation_server(plan.harvest, name=server_name, cache_root=os.environ.get("HSAE_CACHE"),
                                      num_cpus=1 if has_gpu else 0, eval_cfg=eval_cfg, bank_cfg=bank_cfg,
                                      eval_model=profile.eval_model, stream=stream,
                                      evaluators=1 if has_gpu else plan.layout.evaluators)
    info = ray.get(server.prepare.remote())
    rows = f"{info.rows['train']:,} training + {info.rows['eval']:,} held-out rows"
    print(f"[hsae] activations ready: {rows} x {info.model.d_model} at layer {info.model.layer} of "
          f"{info.model.source}; {info.outliers['train']} train / {info.outliers['eval']} held-out rows dropped as "
          f"attention sinks; cache {info.cache_dir}")
    return server_name, server, info


def run_controls(ray: Any, server: Any, profile: Profile, out: Path) -> bool:
    """The positive/negative evaluation controls and the question bank, kept next to the results.

    Returns whether the controls are in range: the positive control must remove forget answers, the
    negative (a random direction through the same code) must not.
    """
    controls, questions = ray.get([server.controls.remote(), server.questions.remote()])
    pos, neg = controls["positive"]["score"], controls["negative"]["score"]
    atomic_write_text(out / "controls" / f"{profile.name}.json", json.dumps(strip_outcomes(controls), indent=2))
    store = ResultsStore(out)
    store.write_records("questions", questions[0]["bank"], questions)
    store.write_records("grid", f"positive-control-{questions[0]['bank']}", control_grid_rows(controls))
    ok = controls_in_range(pos, neg)
    verdict = "ok" if ok else "EVALUATION BROKEN: controls out of range, no score below is a result"
    print(f"[hsae] evaluation controls: positive {pos:.3f} (>= {POSITIVE_MIN}), negative {neg:.3f} "
          f"(<= {NEGATIVE_MAX}): {verdict}")
    return ok


def strip_outcomes(controls: dict[str, Any]) -> dict[str, Any]:
    """The controls without per-question bit strings (those live in grid.parquet)."""
    return {k: {**v, "grid": [{n: x for n, x in g.items() if not n.endswith("_correct")} for g in v["grid"]]}
            if isinstance(v, dict) and "grid" in v else v for k, v in controls.items()}


def write_split(ray: Any, server: Any, info: Any, out: Path) -> None:
    """split.parquet: which documents the SAEs train on and which are held out for evaluation."""
    split = ray.get(server.split.remote())
    key = content_key(info.corpus, length=16)
    records = [{"split": key, "doc_id": d, "domain": m, "part": p, "role": r}
               for d, m, p, r in zip(split["doc_id"], split["domain"], split["part"], split["role"], strict=True)]
    ResultsStore(out).write_records("split", key, records)


def summarise(plan: Plan, out: str, failed: list[tuple[TrialSpec | None, str]], t0: float) -> int:
    """Consolidate the Parquet files, list degenerate and failed trials; the exit code."""
    import pandas as pd

    trials_path, curves_path = ResultsStore(out).consolidate()
    print(f"[hsae] results: {trials_path} and {curves_path} ({time.perf_counter() - t0:.0f} s)")
    rows = pd.read_parquet(trials_path)
    mine = rows[rows["experiment"].isin({t.experiment for ts in plan.trials.values() for t in ts})
                | rows["trial_id"].isin({t.key for ts in plan.trials.values() for t in ts})]
    for r in mine[mine["status"] == "degenerate"].itertuples():
        print(f"[hsae] degenerate (no scores): {r.variant} seed {r.seed}: {r.error}", file=sys.stderr)
    if not failed:
        return 0
    print(f"[hsae] {len(failed)} trial(s) failed:", file=sys.stderr)
    for spec, reason in failed:
        label = f"{spec.variant} {spec.params} seed {spec.seed}" if spec else "?"
        print(f"  - {label}: {reason.splitlines()[-1] if reason else ''}", file=sys.stderr)
    return EXIT_TRIALS_FAILED


def format_stream(stats: dict[str, Any], profile: Profile) -> str:
    """The stream's LM cost against what one trial trains on (1.0 = one LM pass for the whole sweep)."""
    trained = profile.train.steps * profile.train.batch_size
    return (f"[hsae] stream: {stats['lm_tokens']:,} LM tokens computed for training ({stats['blocks_computed']} "
            f"blocks, {stats['blocks_recomputed']} recomputed, at most {stats['peak_window_blocks']} of "
            f"{profile.stream.window_blocks} buffered; server peak memory {stats['server_peak_rss_mb']:.0f} MB); "
            f"one trial trains on {trained:,}: lm_tokens_ratio {stats['lm_tokens'] / trained:.3f}")


def trial_concurrency(args: argparse.Namespace, ray: Any) -> int:
    """Trials Tune runs at once: --max-concurrent, else the plan's layout locally, one per CPU on a cluster."""
    if args.max_concurrent or not args.address:
        return args.plan_layout.trials
    return max(1, int(ray.cluster_resources().get("CPU", 1)) // args.plan_layout.threads)


def report_time(plan: Plan, args: argparse.Namespace, phases: dict[str, float], total_s: float, ray: Any) -> None:
    """Print (and keep under timings/) where the wall time went; trials skipped as finished count nothing."""
    import pandas as pd

    rows = pd.read_parquet(Path(args.out) / "trials.parquet")
    started = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - total_s))
    # By experiment, not trial key: Optuna's trials get their keys from the sampled values.
    ran = rows[rows["experiment"].isin({t.experiment for ts in plan.trials.values() for t in ts})
               & (rows["finished_at"] >= started)]
    concurrency = trial_concurrency(args, ray)
    parts = breakdown(total_s, phases, ran, concurrency)
    print(format_breakdown(parts, total_s, len(ran), concurrency))
    write_breakdown(Path(args.out), "-".join(sorted({t.experiment for ts in plan.trials.values() for t in ts})),
                    parts, total_s)


def main(argv: list[str] | None = None, trial_hooks: Sequence[str] = ()) -> int:
    """The sweep. ``trial_hooks`` ("module:function") is the fault tests' seam (``tune.trainable.TrialHook``)."""
    args = build_parser().parse_args(argv)
    args.trial_hooks = list(trial_hooks)
    args.interrupts = Interrupts().install()
    try:
        return run_sweep(args, sys.argv[1:] if argv is None else list(argv))
    except SweepInterrupted as exc:  # before Ray, in the harvest or controls, or in the summary
        if (Path(args.out) / "parts").is_dir():
            ResultsStore(args.out).consolidate()  # the finished trials' rows, readable as they are
        print(interrupted_message(exc.signum, sys.argv[1:] if argv is None else list(argv)), file=sys.stderr)
        return 128 + exc.signum
    finally:
        args.interrupts.uninstall()


def run_space_stages(space: Space, plan: Plan, args: argparse.Namespace, server_name: str,
                     model: ModelInfo) -> list[tuple[TrialSpec | None, str]]:
    """A staged run's later looks for one space (``tune/stages.py``): each stage is a ``run_space`` of its own."""
    first = plan.trials[space.name]
    return run_stages(first, plan.profile,
                      lambda seeds: space_trials(space, args, plan.profile, first[0].context, seeds),
                      lambda specs, stage: run_space(space, specs, plan, args, server_name, model, stage),
                      lambda keys: stage_verdict(args.out, keys), lambda: args.interrupts.signum is not None)


def run_sweep(args: argparse.Namespace, argv: list[str]) -> int:
    """The sweep from validated input to the summary; the exit code."""
    if args.cache:
        os.environ["HSAE_CACHE"] = args.cache
    t0 = time.perf_counter()
    phases: dict[str, float] = {}
    try:
        plan = resolve(args)  # reads the model's config: converts the embedded model on a cold cache
        preflight(plan, args)
        if args.dry_run:
            return 0
        phases["convert"] = time.perf_counter() - t0
        args.plan_layout, args.plan_settings = plan.layout, plan.settings
        with args.interrupts.ray_init():  # Ray's init puts its own SIGTERM handlers in place of ours
            ray = connect(args.address, plan.layout)
        # Rows, Tune's storage (under --out) and the activation cache must be one storage on every node.
        check_shared_storage(ray, {"results": args.out, "cache": cache_root()})
        check_fits("the activations", plan.sizes.object_store_bytes,
                   int(ray.cluster_resources().get("object_store_memory", 0)), "Ray's object store",
                   "start Ray with a larger --object-store-memory, or lower --n-ctxs")
    except (ValueError, FileNotFoundError, ConnectionError, SharedStorageError) as exc:
        print(f"hsae-ablate: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    t_harvest = time.perf_counter()
    server_name, server, info = start_server(plan, ray)
    phases["harvest"] = time.perf_counter() - t_harvest
    write_split(ray, server, info, Path(args.out))
    args.controls_ok = run_controls(ray, server, plan.profile, Path(args.out)) if plan.profile.evaluate else None
    phases.update(ray.get(server.timings.remote()))
    failed: list[tuple[TrialSpec | None, str]] = []
    for space in plan.spaces:
        print(f"[hsae] space {space.name!r}: {space.description}")
        failed += run_space(space, plan.trials[space.name], plan, args, server_name, info.model)
        if plan.profile.seed_looks > 1 and args.interrupts.signum is None:
            failed += run_space_stages(space, plan, args, server_name, info.model)
        if args.interrupts.signum is not None:
            ResultsStore(args.out).consolidate()  # the finished trials' rows, readable as they are
            print(interrupted_message(args.interrupts.signum, argv), file=sys.stderr)
            return args.interrupts.exit_code
    if plan.profile.activations == "stream":
        print(format_stream(ray.get(server.stream_stats.remote()), plan.profile))
    code = summarise(plan, args.out, failed, t0)
    report_time(plan, args, phases, time.perf_counter() - t0, ray)
    if code == 0 and args.controls_ok is False and plan.profile.controls_required:
        print("[hsae] the evaluation controls were out of range: the rows are written with controls_ok = false, "
              "and no unlearning number is a result on this model", file=sys.stderr)
        return EXIT_CONTROLS_FAILED
    return code


if __name__ == "__main__":
    sys.exit(main())
