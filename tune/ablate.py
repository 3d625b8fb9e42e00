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
from dataclasses import asdict
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")

from hsae.activations import HarvestConfig  # noqa: E402
from hsae.config import SAEConfig  # noqa: E402
from hsae.corpora import CorpusSpec  # noqa: E402
from hsae.evaluation.evaluator import EvalConfig  # noqa: E402
from hsae.evaluation.questions import BankConfig  # noqa: E402
from hsae.evaluation.unlearning import UnlearningConfig  # noqa: E402
from hsae.models import ModelNotFoundError, ModelSpec, validate_layer  # noqa: E402
from hsae.results import ResultsStore  # noqa: E402
from hsae.spaces import (  # noqa: E402
    PROFILES,
    SPACE_NAMES,
    Profile,
    Space,
    SpaceError,
    TrialSpec,
    get_profile,
    grid_trials,
    load_space,
    validate_trials,
)

EXIT_BAD_INPUT = 2
EXIT_TRIALS_FAILED = 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hsae-ablate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", required=True, help=f"one of {list(SPACE_NAMES) + ['all']}")
    p.add_argument("--profile", default="embedded", help=f"one of {sorted(PROFILES)} (default embedded)")
    p.add_argument("--experiment", default=None, help="name; a re-run with the same name skips finished trials "
                                                      "(default <profile>-<space>)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per configuration (42, 43, ...)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the profile's)")
    p.add_argument("--model", default=None, help="'embedded', 'tiny', a hub id or a local directory")
    p.add_argument("--layer", type=int, default=None)
    p.add_argument("--d-sae", type=int, default=None, help="dictionary size (default: the profile's)")
    p.add_argument("--n-ctxs", type=int, default=None, help="contexts of ctx_len tokens to harvest")
    p.add_argument("--forget-path", default=None, help="WMDP bio forget corpus JSONL (real profile)")
    p.add_argument("--out", default="results", help="results directory (default results/)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local one)")
    p.add_argument("--search", default="grid", choices=["grid", "optuna"])
    p.add_argument("--samples", type=int, default=8, help="trials per space block for --search optuna")
    p.add_argument("--scheduler", default=None, choices=["asha", "fifo"], help="default: the space's")
    p.add_argument("--max-concurrent", type=int, default=None, help="concurrent trials (default: one per CPU)")
    p.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPU fraction per trial on GPU clusters")
    p.add_argument("--resume", action="store_true", help="restore the interrupted Tune experiment")
    p.add_argument("--no-eval", action="store_true", help="skip the unlearning/CE evaluation")
    p.add_argument("--cache", default=None, help="cache directory (default $HSAE_CACHE or ~/.cache/hsae)")
    # Fault injection for the reliability tests: raise:<variant> fails that variant's trials,
    # kill:<step> SIGKILLs each trial's first attempt at that step (see docs/errors.md).
    p.add_argument("--fault", default=None, help=argparse.SUPPRESS)
    return p


def resolve(args: argparse.Namespace) -> tuple[Profile, list[Space], dict[str, list[TrialSpec]]]:
    """Everything validated before any compute; raises ValueError/SpaceError/FileNotFoundError."""
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    if not 0 <= args.gpus_per_trial <= 8:
        raise ValueError(f"--gpus-per-trial must be in [0, 8], got {args.gpus_per_trial}")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ValueError(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    profile = get_profile(args.profile, steps=args.steps, model=args.model, layer=args.layer, d_sae=args.d_sae,
                          n_ctxs=args.n_ctxs, forget_path=args.forget_path)
    if args.no_eval:
        from dataclasses import replace

        profile = replace(profile, evaluate=False)
    profile.train_config(42)  # validates steps, batch size, lr
    rows = profile.n_ctxs * (profile.ctx_len - 1)
    if rows < profile.batch_size:
        raise ValueError(f"n_ctxs={profile.n_ctxs} gives {rows} training activations, fewer than one batch of "
                         f"{profile.batch_size}: raise --n-ctxs")
    validate_layer(ModelSpec(profile.model, layer=profile.layer))
    if profile.corpus == "wmdp":
        CorpusSpec("wmdp", forget_path=profile.forget_path)
    names = list(SPACE_NAMES) if args.space == "all" else [args.space]
    spaces = [load_space(n) for n in names]
    seeds = [42 + i for i in range(args.seeds)]
    trials: dict[str, list[TrialSpec]] = {}
    for space in spaces:
        experiment = args.experiment or f"{profile.name}-{space.name}"
        if args.search == "grid":
            trials[space.name] = grid_trials(space, experiment, seeds)
            validate_trials(trials[space.name], profile)
        else:
            trials[space.name] = [TrialSpec(experiment, space.name, b.variant,
                                            {k: v for k, v in b.params.items() if not isinstance(v, dict)}, s)
                                  for b in space.blocks for s in seeds]
            validate_trials(trials[space.name], profile)
    ResultsStore(args.out).check_writable()
    return profile, spaces, trials


def harvest_config(profile: Profile) -> HarvestConfig:
    return HarvestConfig(model=ModelSpec(profile.model, layer=profile.layer),
                         corpus=CorpusSpec(profile.corpus, forget_path=profile.forget_path),
                         ctx_len=profile.ctx_len, n_ctxs=profile.n_ctxs, n_eval_ctxs=profile.n_eval_ctxs)


def eval_config(profile: Profile) -> tuple[EvalConfig, BankConfig]:
    ucfg = UnlearningConfig(min_forget_questions=profile.min_forget_questions,
                            min_retain_questions=profile.min_retain_questions)
    bank = BankConfig(kind=profile.bank_kind)
    if profile.name == "tiny":
        bank = BankConfig(kind=profile.bank_kind, max_forget=1000, max_retain=1000)
    return EvalConfig(unlearning=ucfg, ce_contexts_per_domain=profile.ce_contexts_per_domain), bank


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


def connect(address: str | None) -> Any:
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
            # One logical CPU more than the machine has: a trial spends about half its life waiting for
            # the activation server to evaluate its SAE, and a third trial keeps both cores busy then.
            ray.init(num_cpus=(os.cpu_count() or 1) + 1, include_dashboard=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConnectionError(f"cannot connect to a Ray cluster at {address!r}: {exc}") from exc
    return ray


def run_space(space: Space, trials: list[TrialSpec], profile: Profile, args: argparse.Namespace,
              server_name: str) -> list[tuple[TrialSpec | None, str]]:
    """One Tuner for one space; returns the failed trials with their errors."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from tune.trainable import describe_failure, run_trial, trial_row

    store = ResultsStore(args.out)
    experiment = trials[0].experiment
    out = str(Path(args.out).resolve())
    ctx = {"profile": asdict(profile), "out": out, "server": server_name, "fault": args.fault}
    storage = str(Path(args.out).resolve() / "ray_results")
    name = experiment
    # Searches prune (ASHA); ablation grids keep every arm (the space file says, FIFO by default).
    scheduler_name = args.scheduler or ("asha" if args.search == "optuna" else space.scheduler)
    # ASHA: time = training step, metric = validation MSE. Grace period: a third of training (early
    # losses of sparse, orthogonality-penalised SAEs cross); halving at each rung (reduction factor 2);
    # max_t one past the last step so the final report (evaluation) is never cut.
    scheduler = (ASHAScheduler(time_attr="step", grace_period=max(1, profile.steps // 3), reduction_factor=2,
                               max_t=profile.steps + 1) if scheduler_name == "asha" else FIFOScheduler())
    trainable = tune.with_resources(run_trial, {"cpu": 1, "gpu": args.gpus_per_trial})
    path = os.path.join(storage, name)
    finished = store.finished_ids(experiment)
    pending = [t for t in trials if t.key not in finished]
    if args.search == "grid" and not pending and not args.resume:
        print(f"[hsae] {experiment}: all {len(trials)} trials already finished; nothing to run")
        return []
    max_concurrent = args.max_concurrent or max(1, int(__import__("ray").cluster_resources().get("CPU", 1)))
    failure = tune.FailureConfig(max_failures=1)
    run_config = tune.RunConfig(name=name, storage_path=storage, failure_config=failure,
                                checkpoint_config=tune.CheckpointConfig(num_to_keep=2), verbose=1)
    if args.resume and tune.Tuner.can_restore(path):
        print(f"[hsae] resuming Tune experiment at {path}")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True, param_space=None)
    else:
        if args.search == "grid":
            param_space = {"trial": tune.grid_search([t.as_dict() for t in pending]), "ctx": ctx}
            tune_config = tune.TuneConfig(metric="val_loss", mode="min", scheduler=scheduler,
                                          max_concurrent_trials=max_concurrent)
        else:
            if len(space.blocks) != 1:
                raise SpaceError(f"--search optuna takes one block per space; {space.name!r} has {len(space.blocks)}")
            from ray.tune.search.optuna import OptunaSearch

            block = space.blocks[0]
            sampled = {k: to_tune_domain(v) for k, v in block.params.items() if isinstance(v, dict)}
            param_space = {"trial": trials[0].as_dict(), "sampled": sampled, "ctx": ctx}
            tune_config = tune.TuneConfig(metric="val_loss", mode="min", scheduler=scheduler,
                                          search_alg=OptunaSearch(seed=42), num_samples=args.samples,
                                          max_concurrent_trials=max_concurrent)
        tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)
    grid = tuner.fit()
    failed: list[tuple[TrialSpec | None, str]] = []
    for result in grid:
        cfg = result.config or {}
        trial = dict(cfg.get("trial", {}))
        if not trial:
            failed.append((None, describe_failure(result.error)))
            continue
        trial["params"] = {**trial.get("params", {}), **cfg.get("sampled", {})}
        spec = TrialSpec(**trial)
        if store.row(spec.experiment, spec.key) is not None:
            continue
        # The trial did not write its row: it was stopped by the scheduler or it failed. Its reported
        # metrics (Tune keeps them) become the row and the curve.
        metrics = result.metrics or {}
        sae_cfg = SAEConfig(spec.variant, profile.d_in, profile.d_sae, spec.params)
        curves = reported_curves(result, spec)
        if result.error is not None:
            reason = describe_failure(result.error)
            store.write_trial(trial_row(spec, profile, sae_cfg, "failed", error=reason, steps=metrics.get("step")),
                              curves)
            failed.append((spec, reason))
        else:
            store.write_trial(trial_row(spec, profile, sae_cfg, "early_stopped", steps=metrics.get("step"),
                                        tokens=metrics.get("tokens"), val_loss=metrics.get("val_loss"),
                                        mse=metrics.get("mse"), l0=metrics.get("l0"),
                                        final_loss=metrics.get("loss")), curves)
    return failed


def reported_curves(result: Any, spec: TrialSpec) -> list[dict[str, Any]]:
    frame = result.metrics_dataframe
    if frame is None or frame.empty or "step" not in frame:
        return []
    rows = frame[frame["step"] <= frame["step"].max()].to_dict("records")
    return [{**r, "experiment": spec.experiment, "trial_id": spec.key, "variant": spec.variant}
            for r in rows if "loss" in r and r.get("loss") == r.get("loss")]


def to_tune_domain(spec: dict[str, Any]) -> Any:
    from ray import tune

    kind, arg = next(iter(spec.items()))
    return {"uniform": lambda: tune.uniform(*arg), "loguniform": lambda: tune.loguniform(*arg),
            "int": lambda: tune.randint(int(arg[0]), int(arg[1]) + 1), "choice": lambda: tune.choice(arg),
            "grid": lambda: tune.choice(arg)}[kind]()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cache:
        os.environ["HSAE_CACHE"] = args.cache
    try:
        profile, spaces, trials = resolve(args)
    except (ValueError, FileNotFoundError, ModelNotFoundError) as exc:
        print(f"hsae-ablate: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        ray = connect(args.address)
    except ConnectionError as exc:
        print(f"hsae-ablate: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from hsae.activations import harvest_key
    from hsae.server import create_activation_server

    t0 = time.perf_counter()
    hcfg = harvest_config(profile)
    eval_cfg, bank_cfg = eval_config(profile)
    server_name = f"hsae-activations-{profile.name}-{harvest_key(hcfg)}"
    has_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    server = create_activation_server(hcfg, name=server_name, cache_root=os.environ.get("HSAE_CACHE"),
                                      num_cpus=1 if has_gpu else 0, eval_cfg=eval_cfg, bank_cfg=bank_cfg,
                                      eval_model=profile.eval_model)
    info = ray.get(server.prepare.remote())
    print(f"[hsae] activations ready: {info['rows']} rows x {info['d_model']} at layer {profile.layer} of "
          f"{profile.model}; cache {info['cache_dir']}")
    out = Path(args.out)
    if profile.evaluate:
        controls = ray.get(server.controls.remote())
        pos, neg = controls["positive"]["score"], controls["negative"]["score"]
        (out / "controls").mkdir(parents=True, exist_ok=True)
        (out / "controls" / f"{profile.name}.json").write_text(json.dumps(controls, indent=2))
        verdict = "ok" if pos >= 0.2 and neg <= 0.05 else "EVALUATION BROKEN: controls out of range"
        print(f"[hsae] evaluation controls: positive {pos:.3f} (>= 0.2), negative {neg:.3f} (<= 0.05): {verdict}")
    failed: list[tuple[TrialSpec | None, str]] = []
    for space in spaces:
        print(f"[hsae] space {space.name!r}: {space.description}")
        failed += run_space(space, trials[space.name], profile, args, server_name)
    trials_path, curves_path = ResultsStore(args.out).consolidate()
    print(f"[hsae] results: {trials_path} and {curves_path} ({time.perf_counter() - t0:.0f} s)")
    import pandas as pd

    rows = pd.read_parquet(trials_path)
    mine = rows[rows["experiment"].isin({t.experiment for ts in trials.values() for t in ts})]
    for r in mine[mine["status"] == "degenerate"].itertuples():
        print(f"[hsae] degenerate (no scores): {r.variant} seed {r.seed}: {r.error}", file=sys.stderr)
    if failed:
        print(f"[hsae] {len(failed)} trial(s) failed:", file=sys.stderr)
        for spec, reason in failed:
            label = f"{spec.variant} {spec.params} seed {spec.seed}" if spec else "?"
            print(f"  - {label}: {reason.splitlines()[-1] if reason else ''}", file=sys.stderr)
        return EXIT_TRIALS_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
