"""The Tune function trainable: a thin adapter from Ray to ``hsae.trial.TrialRun``.

Fetch the served activations, run the trial, report each logged step (with the trainer's checkpoint)
to Tune, write the trial's row. The trial never loads the language model: activations come as
ObjectRefs from the activation server, and evaluation runs there (the SAE goes there by value).
"""

from __future__ import annotations

import importlib
import logging
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import torch
from ray import tune

from hsae.external import is_external
from hsae.machine import RunSettings
from hsae.profiles import Profile
from hsae.results import ResultsStore
from hsae.server import fetch, stream_source
from hsae.spaces import TrialSpec
from hsae.train import ArrayBatches, DegenerateRunError, Progress
from hsae.trial import Evaluate, ExternalRun, TrialOutcome, TrialRun
from tune.search import OBJECTIVES

# A test-only seam: "module:function" names of hooks called as hook(spec, step, restored) when the trial
# starts (step 0) and at every logged step; the fault tests use it to kill or fail trials.
TrialHook = Callable[[TrialSpec, int, bool], None]


def run_trial(config: dict[str, Any]) -> None:
    ctx, spec = config["ctx"], trial_spec(config)
    settings = RunSettings(**ctx.get("settings", {}))
    torch.set_num_threads(settings.threads_per_trial)  # the plan's layout (hsae.machine.default_layout)
    if not ctx.get("verbose"):  # Ray says "Checkpoint successfully created" at every checkpoint of every trial
        logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    store = ResultsStore(ctx["out"])
    if report_if_finished(store, spec):
        return
    restored = tune.get_checkpoint()
    hooks = load_hooks(ctx.get("hooks", ()))
    for hook in hooks:
        hook(spec, 0, restored is not None)
    server = ray.get_actor(ctx["server"])
    info = ray.get(server.prepare.remote())
    held_out = fetch(info, "eval").eval_batch()
    profile = Profile.from_dict(ctx["profile"])
    with tempfile.TemporaryDirectory(prefix="hsae-trial-") as work:
        run: TrialRun | ExternalRun
        if is_external(spec.variant):  # an external arm: loaded (hsae.external), not trained
            run = ExternalRun(spec, profile, info.model, controls_ok=ctx.get("controls_ok"))
        else:
            run = TrialRun(spec, profile, info.model, work, on_progress=reporter(spec, hooks, restored is not None),
                           controls_ok=ctx.get("controls_ok"), settings=settings)
        if restored is not None:
            with restored.as_directory() as path:
                run.restore(Path(path))
        source = training_source(server, info, store, spec, run)
        try:
            outcome = run.run(source, held_out, server_evaluate(server) if profile.evaluate else None)
        finally:  # a failed or stopped trial leaves the stream too, so it holds nobody back
            left = ray.get(server.stream_leave.remote(spec.key)) if profile.activations == "stream" else None
        if left is not None:  # the sweep's LM cost so far: what streaming saves is measured here
            outcome.row["stream_lm_tokens"] = left["lm_tokens"]
        outcome.row.update(search_values(ctx))
        if outcome.status == "completed" and isinstance(run, TrialRun):  # the SAE where a user looks for it, before
            # the row that links it (an external arm's row links its own folder: source_path)
            outcome.row["sae_path"] = store.sae_path(spec.key)
            run.export_sae(store.root / outcome.row["sae_path"])
    store.write_trial(outcome.row, outcome.curves, outcome.grid, outcome.probe)
    tune.report(final_report(outcome, run.train_cfg.max_steps()))


def search_values(ctx: dict[str, Any]) -> dict[str, Any]:
    """The row's link to its Optuna study (None under a grid search)."""
    return {"search_objectives": ctx.get("objectives"), "search_study": ctx.get("study")}


def training_source(server: Any, info: Any, store: ResultsStore, spec: TrialSpec, run: TrialRun) -> Any:
    """The trial's training batches: the cached rows, or the server's stream from the trial's first batch.

    A trial joins the stream once; its first batch is kept with its results, so a resumed or retried trial
    (even after a server restart) asks for the batches it would have seen.
    """
    batch_size = run.train_cfg.batch_size
    if run.profile.activations != "stream":
        train = fetch(info, "train")
        run.source_values["outlier_tokens"] = info.outliers["train"]
        # The block's seed, not a labelled arm's training seed: one seed is one data order for every arm (the
        # verdict's block design); a labelled arm differs in its initialisation only.
        return ArrayBatches(train.x, train.labels, batch_size, spec.seed)
    start = store.stream_start(spec.experiment, spec.key)
    if start is None:
        start = ray.get(server.stream_join.remote(spec.key, run.train_cfg.steps))
        store.record_stream_start(spec.experiment, spec.key, start)
    run.source_values["stream_start_batch"] = start
    run.source_values["stream_join"] = run.profile.stream.join  # "oldest": timing chose start (docs/sweeps.md)
    return stream_source(server, spec.key, start, batch_size, run.train_cfg.steps)


def trial_spec(config: dict[str, Any]) -> TrialSpec:
    """The trial's spec; Optuna's sampled values join the space entry's fixed parameters."""
    trial = dict(config["trial"])
    trial["params"] = {**trial.get("params", {}), **config.get("sampled", {})}
    return TrialSpec(**trial)


def report_if_finished(store: ResultsStore, spec: TrialSpec) -> bool:
    """A trial whose row says completed/degenerate is not redone (a resumed sweep): report and stop."""
    done = store.row(spec.experiment, spec.key)
    if done is None or done["status"] not in ("completed", "degenerate"):
        return False
    tune.report({**final_values(done, int(done["steps"] or 0)), "skipped": 1})
    return True


def reporter(spec: TrialSpec, hooks: Sequence[TrialHook], restored: bool) -> Callable[[Progress], None]:
    """Each logged step to Tune, with the checkpoint the trainer saved at it (Tune keeps it for restarts)."""

    def on_progress(progress: Progress) -> None:
        for hook in hooks:
            hook(spec, progress.step, restored)
        metrics = {"step": progress.step, **{k: v for k, v in progress.record.items() if k != "step"}}
        checkpoint = None if progress.checkpoint is None else tune.Checkpoint.from_directory(str(progress.checkpoint))
        tune.report(metrics, checkpoint=checkpoint)

    return on_progress


def server_evaluate(server: Any) -> Evaluate:
    """The server's ``evaluate`` as a plain function; its DegenerateRunError comes back unwrapped."""

    def evaluate(sae_cfg: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
        try:
            return ray.get(server.evaluate.remote(sae_cfg, state))
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, DegenerateRunError):
                raise exc.cause from None
            raise

    return evaluate


def final_report(outcome: TrialOutcome, steps: int) -> dict[str, Any]:
    """The last report, one step past training so that no scheduler cuts the evaluation."""
    return final_values(outcome.row, steps)


def final_values(row: dict[str, Any], steps: int) -> dict[str, Any]:
    """A finished trial's last report from its row: every metric a study may optimise (tune/search.py), NaN
    where the trial has none; ``final`` tells the searcher that training and evaluation are over."""
    if row["status"] == "degenerate":
        return {"step": steps + 1, "val_mse": float("nan"), "degenerate": 1, "final": 1}
    values = {name: row.get(name) for name in OBJECTIVES}
    return {"step": steps + 1, "final": 1,
            **{k: float("nan") if v is None or pd.isna(v) else float(v) for k, v in values.items()}}


def load_hooks(names: Sequence[str]) -> list[TrialHook]:
    hooks = []
    for name in names:
        module, _, attr = name.partition(":")
        hooks.append(getattr(importlib.import_module(module), attr))
    return hooks


def describe_failure(error: BaseException | None) -> str:
    if error is None:
        return "unknown error"
    text = "".join(traceback.format_exception_only(type(error), error)).strip()
    return text[-2000:]
