"""The sweep's plan: ``--space``/``--profile`` and the other arguments resolved into a validated ``Plan``.

Everything here runs before any compute and starts nothing: the profile (overrides, token budget, staged seeds),
the spaces and their trials, the model's facts read from its config, sizes and fits, the precision and the
concurrency layout; ``preflight`` prints the plan (``--dry-run``) and refuses one that cannot fit. The run
(Ray, the activation server, controls, the Tuners) is ``tune/ablate.py``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from fractions import Fraction

import torch

from hsae.activations import HarvestConfig, cache_dir, harvest_key
from hsae.evaluation.questions import bank_summary
from hsae.external import check_trials as check_external_trials
from hsae.external import is_external
from hsae.machine import Layout, PrecisionChoice, RunSettings, default_layout, machine_cores, resolve_precision
from hsae.models import ModelInfo, ModelSpec, cache_root, describe_model, model_config
from hsae.preflight import Sizes, check_plan, describe_sizes, plan_sizes
from hsae.profiles import Profile, get_profile, override, parse_profile_settings
from hsae.results import ResultsStore
from hsae.server import planned_bank
from hsae.spaces import Space, TrialSpec, all_spaces, grid_trials, load_space, sweep_context, validate_trials
from hsae.verdict import ALPHA
from tune.search import check_search, check_storage_url, default_scheduler, parse_objectives, storage_url
from tune.stages import looks_of
from tune.trackers import check_trackers


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
        if plan.profile.evaluate:
            print(f"[hsae] questions: {describe_bank(plan.profile)}")
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
             f"questions          {p.bank.kind}" + (f" ({p.bank.wmdp}, {p.bank.mmlu})"
                                                      if p.bank.kind == "letter" else "")
             + (f": {describe_bank(p)}" if p.evaluate else ""),
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


def describe_bank(profile: Profile) -> str:
    """The question bank's size per domain and the share of its candidates the unmodified model answers, read from the
    cache where it is built; else its caps, and when it will be built."""
    bank, cfg = planned_bank(profile.harvest, profile.eval_model, profile.bank), profile.bank
    if bank is not None:
        unknown = "" if bank.candidates else (
            "; how many candidates the unmodified model answered was not recorded when this bank was built (removing "
            "the cached bank rebuilds it, same questions, and records it)")
        return f"{bank_summary(bank, cfg)} (bank {bank.key[:8]}, cached){unknown}"
    candidates = f" of up to {cfg.candidates_per_domain:,} candidates per domain" if cfg.kind == "cloze" else ""
    return (f"caps {cfg.max_forget} forget / {cfg.max_retain} retain{candidates}; not built yet: the first evaluation "
            "builds it (the unmodified model answers every candidate once; what it answers correctly is kept) and "
            "prints its size and answered share")


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
