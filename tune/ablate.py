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
from dataclasses import asdict
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

from hsae.activations import harvest_key  # noqa: E402
from hsae.atomic import atomic_write_text  # noqa: E402
from hsae.config import SAEConfig  # noqa: E402
from hsae.external import is_external  # noqa: E402
from hsae.keys import content_key  # noqa: E402
from hsae.machine import PRECISIONS, Layout, default_layout, machine_cores  # noqa: E402
from hsae.models import ModelInfo, cache_root  # noqa: E402
from hsae.preflight import check_fits  # noqa: E402
from hsae.profiles import PROFILES, Profile  # noqa: E402
from hsae.results import ResultsStore, control_grid_rows  # noqa: E402
from hsae.spaces import NOT_IN_ALL, Space, TrialSpec, shipped_spaces  # noqa: E402
from hsae.train import step_seconds  # noqa: E402
from hsae.verdict import NEGATIVE_MAX, POSITIVE_MIN, controls_in_range  # noqa: E402
from tune.breakdown import breakdown, format_breakdown, write_breakdown  # noqa: E402
from tune.interrupt import Interrupts, SweepInterrupted, interrupted_message  # noqa: E402
from tune.nodes import SharedStorageError, check_shared_storage  # noqa: E402
from tune.plan import Plan, preflight, resolve, space_trials  # noqa: E402
from tune.progress import SweepProgress  # noqa: E402
from tune.search import OBJECTIVES, SEARCHES, search_setup, tune_name, verdict_suffix  # noqa: E402
from tune.stages import run_stages, stage_verdict  # noqa: E402
from tune.trackers import TRACKERS, tracker_callbacks  # noqa: E402

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
    # A stage's Tune experiment resumes alone; one that declared another verdict (margin, looks) is another experiment.
    name = tune_name(trials) + verdict_suffix(plan.profile) + (f"-stage{stage}" if stage else "")
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
