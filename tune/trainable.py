"""The Tune function trainable: fetch activation refs, train, report, evaluate, write the trial's row.

One trial = one SAE. It never loads the language model: activations come as ObjectRefs from the
activation server, and evaluation runs on the server (the SAE goes there by value).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray import tune

from hsae import metrics as M
from hsae.config import SAEConfig
from hsae.export import folded_state
from hsae.results import ResultsStore
from hsae.server import fetch
from hsae.spaces import Profile, TrialSpec
from hsae.train import ArrayBatches, DegenerateRunError, Trainer, prune_checkpoints

EVAL_ROWS = 4096


def trial_row(spec: TrialSpec, profile: Profile, sae_cfg: SAEConfig | None, status: str, **values: Any
              ) -> dict[str, Any]:
    """The trial's Parquet row: identity, status, metrics, and every config value as cfg_* columns."""
    row: dict[str, Any] = {
        "experiment": spec.experiment, "space": spec.space, "variant": spec.variant, "trial_id": spec.key,
        "seed": spec.seed, "status": status, "profile": profile.name, "model": profile.model,
        "layer": profile.layer, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if sae_cfg is not None:
        row.update({f"cfg_{k}": v for k, v in sae_cfg.flat().items()})
    train_cfg = profile.train_config(spec.seed)
    row.update({f"cfg_{k}": v for k, v in asdict(train_cfg).items() if k != "seed"})
    row.update(values)
    return row


def _metric_values(metrics: dict[str, float]) -> dict[str, float]:
    keep = ("mse", "explained_variance", "fvu", "l0", "l1", "dead_fraction", "cosine", "l2_ratio",
            "decoder_norm_min", "decoder_norm_max", "condition_number", "condition_number_max", "group_entropy",
            "inter_group_correlation", "inter_group_cosine", "nce")
    return {k: metrics.get(k) for k in keep}


def run_trial(config: dict[str, Any]) -> None:
    torch.set_num_threads(1)  # one CPU per trial: two threads in a busy process do worse here
    ctx = config["ctx"]
    trial = dict(config["trial"])
    trial["params"] = {**trial.get("params", {}), **config.get("sampled", {})}
    spec = TrialSpec(**trial)
    profile = Profile(**ctx["profile"])
    store = ResultsStore(ctx["out"])
    done = store.row(spec.experiment, spec.key)
    if done is not None and done["status"] in ("completed", "degenerate"):
        tune.report({"step": int(done["steps"] or 0), "val_loss": float(done["val_loss"] or np.nan), "skipped": 1})
        return

    fault = ctx.get("fault")
    if fault and fault == f"raise:{spec.variant}":
        raise RuntimeError(f"injected fault for variant {spec.variant!r} (--fault {fault})")
    server = ray.get_actor(ctx["server"])
    info = ray.get(server.prepare.remote())
    train = fetch(info, "train")
    eval_batch = fetch(info, "eval").eval_batch(EVAL_ROWS)
    sae_cfg = SAEConfig(spec.variant, info["d_model"], profile.d_sae, spec.params)
    train_cfg = profile.train_config(spec.seed)
    work = Path(tempfile.mkdtemp(prefix="hsae-trial-"))
    trainer: Trainer | None = None

    restored = tune.get_checkpoint()
    # --fault kill:N: die like an OOM-killed worker at step N, on the first attempt only (no checkpoint yet).
    kill_at = int(fault.split(":")[1]) if fault and fault.startswith("kill:") and restored is None else None

    def on_metrics(step: int, record: dict[str, float]) -> None:
        assert trainer is not None
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        sae = trainer.sae
        sae.eval()
        with torch.no_grad():
            x = eval_batch.x.to(trainer.device) * trainer.scale
            record["val_loss"] = M.mse(x, sae(x)[0])
        sae.train()
        report = {"step": step, **{k: v for k, v in record.items() if k != "step"}}
        if step % profile.checkpoint_every == 0 or step == train_cfg.steps:
            path = trainer.save_checkpoint(work / f"step_{step:08d}")
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(str(path)))
            prune_checkpoints(work, keep=1)
        else:
            tune.report(report)

    trainer = Trainer(sae_cfg, train_cfg, on_metrics=on_metrics)
    if restored is not None:
        with restored.as_directory() as d:
            trainer.load_checkpoint(d)
    source = ArrayBatches(train.x, train.labels, train_cfg.batch_size, train_cfg.seed)
    curves_of = lambda: [{"experiment": spec.experiment, "trial_id": spec.key, "variant": spec.variant, **h}  # noqa: E731
                         for h in trainer.history]

    def finish_degenerate(reason: str, metrics: dict[str, float]) -> None:
        """A guard tripped (in training or at evaluation): the row says why and carries no scores."""
        tokens = trainer.step * train_cfg.batch_size
        row = trial_row(spec, profile, sae_cfg, "degenerate", error=reason, steps=trainer.step, tokens=tokens,
                        wall_s=trainer.wall_s, tokens_per_s=tokens / max(trainer.wall_s, 1e-9),
                        final_loss=trainer.last_loss, **_metric_values(metrics))
        store.write_trial(row, curves_of())
        tune.report({"step": train_cfg.steps + 1, "val_loss": float("nan"), "degenerate": 1})

    try:
        result = trainer.fit(source, eval_batch=eval_batch, resume=False)
    except DegenerateRunError as exc:
        finish_degenerate(exc.reason, exc.metrics)
        return
    finally:
        shutil.rmtree(work, ignore_errors=True)

    values: dict[str, Any] = {}
    if profile.evaluate:
        state = {k: v.numpy() for k, v in folded_state(result.sae, result.scale).items()}
        t0 = time.perf_counter()
        try:
            out = ray.get(server.evaluate.remote(sae_cfg.to_dict(), state))
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, DegenerateRunError):
                finish_degenerate(str(exc.cause), result.metrics)
                return
            raise
        u, ce = out["unlearning"], out.get("ce", {})
        values = {
            "unlearning_score": u["score"], "random_feature_score": u.get("random_feature_score"),
            "unlearning_tied_settings": u["tied_settings"], "n_forget_questions": u["n_forget"],
            "n_retain_questions": u["n_retain"], "unlearning_grid": json.dumps(u["grid"]),
            "ce_score_forget": ce.get("ce_score_forget"), "ce_score_retain": ce.get("ce_score_retain"),
            "kl_forget": ce.get("kl_forget"), "kl_retain": ce.get("kl_retain"),
            "eval_s": time.perf_counter() - t0,
        }
    row = trial_row(spec, profile, sae_cfg, "completed", steps=result.steps, tokens=result.tokens,
                    wall_s=result.wall_s, tokens_per_s=result.tokens_per_s, final_loss=trainer.last_loss,
                    val_loss=trainer.history[-1].get("val_loss"), **_metric_values(result.metrics), **values)
    store.write_trial(row, curves_of())
    tune.report({"step": train_cfg.steps + 1, "val_loss": row["val_loss"],
                 "unlearning_score": values.get("unlearning_score", float("nan"))})


def describe_failure(error: BaseException | None) -> str:
    if error is None:
        return "unknown error"
    text = "".join(traceback.format_exception_only(type(error), error)).strip()
    return text[-2000:]
