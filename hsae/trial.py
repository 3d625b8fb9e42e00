"""One trial of a sweep, without Ray: train an SAE from a batch source, score it, build its row.

The Tune trainable (``tune/trainable.py``) only fetches the activations, calls ``TrialRun.run`` and
reports; evaluation arrives as a plain function (the activation server's ``evaluate`` behind Ray).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from hsae.config import SAEConfig
from hsae.export import export_saelens, folded_state
from hsae.external import ExternalSource, load_external
from hsae.external import metrics as external_metrics
from hsae.l0_control import target_met
from hsae.machine import RunSettings
from hsae.models import ModelInfo
from hsae.profiles import Profile
from hsae.results import curve_rows, evaluation_values, grid_rows, probe_rows, training_values, trial_row
from hsae.schema import SAE_METRICS
from hsae.spaces import TrialSpec
from hsae.stream import StreamBatches
from hsae.train import (
    ArrayBatches,
    Batch,
    BatchSource,
    DegenerateRunError,
    ProgressCallback,
    Trainer,
    TrainResult,
    activation_scale,
    check_live,
)

# Scores one SAE: (SAEConfig.to_dict(), folded weights as numpy) -> the server's evaluation answer.
# Raises DegenerateRunError when no feature of the SAE fires on the questions.
Evaluate = Callable[[dict[str, Any], dict[str, np.ndarray]], dict[str, Any]]


@dataclass
class TrialOutcome:
    row: dict[str, Any]
    curves: list[dict[str, Any]]
    grid: list[dict[str, Any]] = field(default_factory=list)  # grid.parquet rows (empty without evaluation)
    probe: list[dict[str, Any]] = field(default_factory=list)  # probe.parquet rows (the sparse probe's grid)

    @property
    def status(self) -> str:
        return str(self.row["status"])


class TrialRun:
    """Train and score the SAE that ``spec`` names on activations of ``model`` (width read from the model)."""

    def __init__(self, spec: TrialSpec, profile: Profile, model: ModelInfo, checkpoint_dir: str | Path,
                 on_progress: ProgressCallback | None = None, controls_ok: bool | None = None,
                 source_values: dict[str, Any] | None = None, settings: RunSettings | None = None) -> None:
        self.spec, self.profile, self.model = spec, profile, model
        self.controls_ok = controls_ok  # the sweep's evaluation controls: False means no score is a result
        # What the activation source adds to every row (outlier_tokens, stream_start_batch).
        self.source_values = dict(source_values or {})
        self.sae_cfg = SAEConfig(spec.variant, model.d_model, profile.d_sae, spec.params)
        self.train_cfg = profile.train_config(spec.train_seed, settings)  # a labelled arm: its own draw
        self.trainer = Trainer(self.sae_cfg, self.train_cfg, on_progress=on_progress, checkpoint_dir=checkpoint_dir)
        # The row records what the machine resolved (device, precision), never "auto".
        choice = self.trainer.precision
        self.train_cfg = replace(self.train_cfg, device=str(self.trainer.device), autocast=choice.autocast)
        self.source_values.update(precision=choice.precision, precision_reason=choice.reason,
                                  device=str(self.trainer.device))
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
            scores, grid, probe = (score(evaluate, self.sae_cfg, result, self.spec.key) if evaluate is not None
                                   else ({}, [], []))
        except DegenerateRunError as exc:
            return self._degenerate(exc.reason, result.metrics)
        values = training_values(result.steps, self.train_cfg.batch_size, result.wall_s, self.trainer.last_loss,
                                 result.metrics)
        values.update(convergence_values(self.trainer))
        values.update(sparsity_values(result, self.sae_cfg))
        counted = isinstance(source, (ArrayBatches, StreamBatches))
        values["unique_train_tokens"] = source.unique_rows(result.steps) if counted else None
        outcome = self._outcome("completed", **values, **scores)
        outcome.grid, outcome.probe = grid, probe
        return outcome

    def export_sae(self, path: str | Path) -> Path:
        """The trained SAE in the SAELens layout, named by the model's resolvable name and carrying the trial."""
        if self.result is None:
            raise RuntimeError("export_sae before the trial trained an SAE")
        corpus, ctx_len = self.profile.harvest.corpus, self.profile.harvest.ctx_len
        dataset = f"{corpus.forget} + {corpus.retain}" if corpus.name == "wmdp" else corpus.name
        trial = {"trial_id": self.spec.key, "experiment": self.spec.experiment, "seed": self.spec.seed,
                 "params": self.spec.params, "steps": self.result.steps, "model_source": self.model.source}
        return export_saelens(self.result.sae, path, self.result.scale, model_name=self.model.name,
                              hook_layer=self.model.layer, dataset_path=dataset, context_size=ctx_len,
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


def convergence_values(trainer: Trainer) -> dict[str, Any]:
    """The row's held-out MSE and convergence verdict, from the curve it will be recomputed from."""
    history = trainer.history
    return {"val_mse": history[-1].get("val_mse") if history else None, **trainer.convergence()}


def sparsity_values(result: TrainResult, sae_cfg: SAEConfig) -> dict[str, Any]:
    """The row's sparsity columns: the coefficient trained with, whether the held-out L0 met the target,
    how many dead latents were resampled."""
    return {"sparsity_coeff_final": result.sparsity_coeff, "revived_latents": result.revived_latents,
            "extensions": result.extensions,
            "l0_target_met": target_met(result.metrics.get("l0"), sae_cfg.resolved.target_l0)}


def score(evaluate: Evaluate, sae_cfg: SAEConfig, result: TrainResult,
          trial_id: str) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Evaluate the trained SAE (raw-activation weights): the evaluation columns of its row, its grid rows,
    its sparse-probe rows."""
    state = {k: v.numpy() for k, v in folded_state(result.sae, result.scale).items()}
    return score_weights(evaluate, sae_cfg.to_dict(), state, trial_id)


def score_weights(evaluate: Evaluate, cfg: dict[str, Any], state: dict[str, np.ndarray],
                  trial_id: str) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Evaluate an SAE given by value: the evaluation columns of its row, its grid rows, its sparse-probe rows."""
    t0 = time.perf_counter()
    out = evaluate(cfg, state)
    return evaluation_values(out, time.perf_counter() - t0), grid_rows(trial_id, out), probe_rows(trial_id, out)


class ExternalRun:
    """An external arm's trial (hsae.external): load the SAE instead of training it, then score it as a trained
    arm's: the same held-out metrics, in the unit the trained SAE of the same seed uses (the first training
    batch's scale), the same evaluation and grid. Its row carries where the SAE came from, no training columns.
    """

    def __init__(self, spec: TrialSpec, profile: Profile, model: ModelInfo, controls_ok: bool | None = None) -> None:
        self.spec, self.profile, self.model, self.controls_ok = spec, profile, model, controls_ok
        self.source = ExternalSource.from_params(spec.params)
        # The batch size and seed of the trained arms' seed-``spec.seed`` trial: its first batch sets the unit.
        self.train_cfg = profile.train_config(spec.seed)
        self.source_values: dict[str, Any] = {}  # the training source's columns: not this row's (nothing trained)

    def restore(self, checkpoint: str | Path) -> None:
        """Nothing to restore: an external arm's trial reports no checkpoint."""

    def run(self, source: BatchSource, eval_batch: Batch, evaluate: Evaluate | None) -> TrialOutcome:
        """Load, measure on the held-out rows, evaluate (None: no evaluation); the row and grid."""
        loaded = load_external(self.source)
        scale = activation_scale(source.batch_at(0).x)
        sae_metrics = external_metrics(loaded, eval_batch.x, eval_batch.labels, scale)
        values = {"source": self.source.source, "source_path": self.source.path,
                  "source_architecture": loaded.architecture, **{n: sae_metrics.get(n) for n in SAE_METRICS}}
        try:
            check_live(sae_metrics)
            cfg, state = loaded.weights()
            scores, grid, probe = (score_weights(evaluate, cfg, state, self.spec.key) if evaluate is not None
                                   else ({}, [], []))
        except DegenerateRunError as exc:
            return self._outcome("degenerate", error=exc.reason, **values)
        outcome = self._outcome("completed", **values, **scores)
        outcome.grid, outcome.probe = grid, probe
        return outcome

    def _outcome(self, status: str, **values: Any) -> TrialOutcome:
        row = trial_row(self.spec, self.profile, self.model, None, None, status, controls_ok=self.controls_ok,
                        **values)
        return TrialOutcome(row, [])

