"""Experiment trackers through Ray Tune's own logger callbacks: ``--log wandb`` and ``--log mlflow``.

Ray's callbacks log each trial's config and every reported step (the training curves). At the trial's end
ours add what Tune never sees: the trial's Parquet row (numbers as ``final/<column>``, text as config or
tags) and its unlearning grid as a table. W&B follows its own settings (``WANDB_MODE=offline`` writes the
run folder under the trial's directory, ``wandb sync`` uploads it later); MLflow logs to
``MLFLOW_TRACKING_URI`` or, unset, a local store in the results directory (``mlflow.db`` and
``mlartifacts/``). Both are optional extras.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from hsae.results import ResultsStore

TRACKERS = {"wandb": "wandb", "mlflow": "mlflow"}  # --log name -> the module it needs


def check_trackers(names: list[str]) -> None:
    """Each requested tracker's package is importable (before any compute)."""
    import importlib.util

    for name in names:
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ValueError(f"--log {name} needs the {TRACKERS[name]!r} package: pip install -e '.[trackers]'")


def final_record(out: str | Path, trial: Any) -> tuple[dict[str, Any], pd.DataFrame | None]:
    """The finished trial's row and unlearning grid, read from the results directory ({} if it wrote none)."""
    from tune.trainable import trial_spec

    config = getattr(trial, "config", None) or {}
    if not config.get("trial"):
        return {}, None
    spec, store = trial_spec(config), ResultsStore(out)
    grid = store.grid(spec.experiment, spec.key)
    if grid is not None:  # per-question outcome strings stay in grid.parquet; plain values for the trackers
        grid = grid.drop(columns=[c for c in grid.columns if c.endswith("_correct")]).astype(object)
        grid = grid.where(grid.notna(), None)
    return store.row(spec.experiment, spec.key) or {}, grid


def split_row(row: dict[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """A row as tracker metrics (finite numbers, ``final/`` prefixed) and text fields."""
    numbers, text = {}, {}
    for key, value in row.items():
        if isinstance(value, bool) or value is None or (isinstance(value, float) and math.isnan(value)):
            text[key] = str(value)
        elif isinstance(value, (int, float)):
            numbers[f"final/{key}"] = float(value)
        elif key != "unlearning_grid":  # the grid goes as a table
            text[key] = str(value)
    return numbers, text


def tracker_callbacks(names: list[str], out: str | Path, experiment: str) -> list[Any]:
    """Ray Tune logger callbacks for the requested trackers (one W&B group / MLflow experiment per sweep)."""
    callbacks = []
    for name in names:
        if name == "wandb":
            callbacks.append(wandb_callback(out, experiment))
        elif name == "mlflow":
            callbacks.append(mlflow_callback(out, experiment))
    return callbacks


def wandb_callback(out: str | Path, experiment: str) -> Any:
    from ray.air.integrations.wandb import WandbLoggerCallback, _WandbLoggingActor

    class RowLoggingActor(_WandbLoggingActor):
        def _handle_result(self, result: dict) -> tuple[dict, dict]:
            if "hsae_final" not in result:
                return super()._handle_result(result)
            numbers, text, grid = result["hsae_final"]
            log = dict(numbers)
            if grid is not None:  # a W&B table, built here where wandb is imported
                log["unlearning_grid"] = self._wandb.Table(dataframe=grid)
            return log, {f"row/{k}": v for k, v in text.items()}

    class HsaeWandbCallback(WandbLoggerCallback):
        _logger_actor_cls = RowLoggingActor

        def log_trial_end(self, trial: Any, failed: bool = False) -> None:
            row, grid = final_record(out, trial)
            if row and trial in self._trial_queues:
                from ray.air.integrations.wandb import _QueueItem

                numbers, text = split_row(row)
                self._trial_queues[trial].put((_QueueItem.RESULT, {"hsae_final": (numbers, text, grid)}))
            super().log_trial_end(trial, failed)

    mode = os.environ.get("WANDB_MODE")
    # resume="allow": a trial restarted by --resume continues its run (same id) instead of clashing with it.
    return HsaeWandbCallback(project=os.environ.get("WANDB_PROJECT", "hsae"), group=experiment, resume="allow",
                             **({"mode": mode} if mode else {}))


def mlflow_callback(out: str | Path, experiment: str) -> Any:
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    class HsaeMLflowCallback(MLflowLoggerCallback):
        def log_trial_start(self, trial: Any) -> None:
            if trial not in self._trial_runs:  # --resume: continue the trial's run from before the crash
                client = self.mlflow_util._get_client()
                runs = client.search_runs([self.mlflow_util.experiment_id], f"tags.trial_name = '{trial}'")
                if runs:
                    self._trial_runs[trial] = runs[0].info.run_id
            super().log_trial_start(trial)

        def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
            # Our step (the trainer's), not Tune's report count: curves line up with curves.parquet.
            run_id = self._trial_runs[trial]
            self.mlflow_util.log_metrics(run_id=run_id, metrics_to_log=result, step=int(result.get("step", iteration)))

        def log_trial_end(self, trial: Any, failed: bool = False) -> None:
            row, grid = final_record(out, trial)
            run_id = self._trial_runs.get(trial)
            if row and run_id:
                numbers, text = split_row(row)
                client = self.mlflow_util._get_client()
                for key, value in numbers.items():
                    client.log_metric(run_id, key, value)
                for key, value in text.items():
                    client.set_tag(run_id, f"row.{key}", value[:5000])
                if grid is not None:
                    client.log_table(run_id, data=grid, artifact_file="unlearning_grid.json")
            super().log_trial_end(trial, failed)

    uri = os.environ.get("MLFLOW_TRACKING_URI") or local_mlflow_store(out, experiment)
    return HsaeMLflowCallback(tracking_uri=uri, experiment_name=experiment)


def local_mlflow_store(out: str | Path, experiment: str) -> str:
    """MLflow's local store in the results directory: runs in ``mlflow.db`` (SQLite; MLflow 3 refuses new
    file-store runs), artifacts under ``mlartifacts/``, the sweep's experiment created with that location."""
    import mlflow

    root = Path(out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    if client.get_experiment_by_name(experiment) is None:
        client.create_experiment(experiment, artifact_location=(root / "mlartifacts" / experiment).as_uri())
    return uri
