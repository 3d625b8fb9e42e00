"""One trial of a sweep, without Ray: train an SAE from a batch source, score it, build its row.

The Tune trainable (``tune/trainable.py``) only fetches the activations, calls ``TrialRun.run`` and
reports; evaluation arrives as a plain function (the activation server's ``evaluate`` behind Ray).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hsae.config import SAEConfig
from hsae.convergence import is_converged, val_mse_rel_change
from hsae.export import export_saelens, folded_state
from hsae.models import ModelInfo
from hsae.results import curve_rows, evaluation_values, grid_rows, training_values, trial_row
from hsae.spaces import Profile, TrialSpec
from hsae.stream import StreamBatches
from hsae.train import ArrayBatches, Batch, BatchSource, DegenerateRunError, ProgressCallback, Trainer, TrainResult

# Scores one SAE: (SAEConfig.to_dict(), folded weights as numpy) -> the server's evaluation answer.
# Raises DegenerateRunError when no feature of the SAE fires on the questions.
Evaluate = Callable[[dict[str, Any], dict[str, np.ndarray]], dict[str, Any]]


@dataclass
class TrialOutcome:
    row: dict[str, Any]
    curves: list[dict[str, Any]]
    grid: list[dict[str, Any]] = field(default_factory=list)  # grid.parquet rows (empty without evaluation)

    @property
    def status(self) -> str:
        return str(self.row["status"])


class TrialRun:
    """Train and score the SAE that ``spec`` names on activations of ``model`` (width read from the model)."""

    def __init__(self, spec: TrialSpec, profile: Profile, model: ModelInfo, checkpoint_dir: str | Path,
                 on_progress: ProgressCallback | None = None, controls_ok: bool | None = None,
                 source_values: dict[str, Any] | None = None) -> None:
        self.spec, self.profile, self.model = spec, profile, model
        self.controls_ok = controls_ok  # the sweep's evaluation controls: False means no score is a result
        # What the activation source adds to every row (outlier_tokens, stream_start_batch).
        self.source_values = dict(source_values or {})
        self.sae_cfg = SAEConfig(spec.variant, model.d_model, profile.d_sae, spec.params)
        self.train_cfg = profile.train_config(spec.seed)
        self.trainer = Trainer(self.sae_cfg, self.train_cfg, on_progress=on_progress, checkpoint_dir=checkpoint_dir)
        self.result: TrainResult | None = None  # the trained SAE, once ``run`` trained it

    def restore(self, checkpoint: str | Path) -> None:
        """Continue from a checkpoint the trainer saved (e.g. one Tune kept for a restarted trial)."""
        self.trainer.load_checkpoint(checkpoint)

    def run(self, source: BatchSource, eval_batch: Batch, evaluate: Evaluate | None) -> TrialOutcome:
        """Train to the end, score with ``evaluate`` (None: no evaluation), and return the row and curves."""
        try:
            result = self.trainer.fit(source, eval_batch=eval_batch, resume=False)
        except DegenerateRunError as exc:
            return self._degenerate(exc.reason, exc.metrics)
        self.result = result
        try:
            scores, grid = score(evaluate, self.sae_cfg, result, self.spec.key) if evaluate is not None else ({}, [])
        except DegenerateRunError as exc:
            return self._degenerate(exc.reason, result.metrics)
        values = training_values(result.steps, self.train_cfg.batch_size, result.wall_s, self.trainer.last_loss,
                                 result.metrics)
        values.update(convergence_values(self.trainer.history, result.steps))
        counted = isinstance(source, (ArrayBatches, StreamBatches))
        values["unique_train_tokens"] = source.unique_rows(result.steps) if counted else None
        outcome = self._outcome("completed", **values, **scores)
        outcome.grid = grid
        return outcome

    def export_sae(self, path: str | Path) -> Path:
        """The trained SAE in the SAELens layout, named by the model's resolvable name and carrying the trial."""
        if self.result is None:
            raise RuntimeError("export_sae before the trial trained an SAE")
        p = self.profile
        dataset = f"{p.forget_corpus} + {p.retain_corpus}" if p.corpus == "wmdp" else p.corpus
        trial = {"trial_id": self.spec.key, "experiment": self.spec.experiment, "seed": self.spec.seed,
                 "params": self.spec.params, "steps": self.result.steps, "model_source": self.model.source}
        return export_saelens(self.result.sae, path, self.result.scale, model_name=self.model.name,
                              hook_layer=self.model.layer, dataset_path=dataset, context_size=p.ctx_len,
                              metadata={"hsae_trial": trial})

    def _degenerate(self, reason: str, metrics: dict[str, float]) -> TrialOutcome:
        """A guard tripped (in training or at evaluation): the row says why and carries no scores."""
        t = self.trainer
        values = training_values(t.step, self.train_cfg.batch_size, t.wall_s, t.last_loss, metrics)
        return self._outcome("degenerate", error=reason, **values)

    def _outcome(self, status: str, **values: Any) -> TrialOutcome:
        row = trial_row(self.spec, self.profile, self.model, self.sae_cfg, self.train_cfg, status,
                        controls_ok=self.controls_ok, **self.source_values, **values)
        return TrialOutcome(row, curve_rows(self.spec, self.trainer.history))


def convergence_values(history: list[dict[str, float]], steps: int) -> dict[str, Any]:
    """The row's held-out MSE and convergence verdict, from the curve it will be recomputed from."""
    change = val_mse_rel_change([h["step"] for h in history], [h.get("val_mse") for h in history], steps)
    return {"val_mse": history[-1].get("val_mse") if history else None,
            "val_mse_rel_change": change, "converged": is_converged(change)}


def score(evaluate: Evaluate, sae_cfg: SAEConfig, result: TrainResult,
          trial_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Evaluate the trained SAE (raw-activation weights): the evaluation columns of its row, its grid rows."""
    state = {k: v.numpy() for k, v in folded_state(result.sae, result.scale).items()}
    t0 = time.perf_counter()
    out = evaluate(sae_cfg.to_dict(), state)
    return evaluation_values(out, time.perf_counter() - t0), grid_rows(trial_id, out)
