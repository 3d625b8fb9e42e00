"""What the sweep prints while Tune runs: one line per finished trial, and every minute what is running.

Tune's own status tables (≈ 40 lines per report) are behind ``--verbose``; this callback reads each finished
trial's row from the results directory, so the line shows the numbers the report will use.
"""

from __future__ import annotations

import time
from typing import Any

import pandas as pd
from ray.tune import Callback

from hsae.progress import format_duration
from hsae.results import ResultsStore
from hsae.spaces import TrialSpec


def trial_label(spec: TrialSpec) -> str:
    params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(spec.params.items()))
    return f"{spec.variant} seed {spec.seed}" + (f" ({params})" if params else "")


def row_numbers(row: dict[str, Any]) -> str:
    """The key numbers of a finished trial's row, in the report's words."""
    if row.get("status") == "degenerate":
        return f"degenerate: {row.get('error')}"

    def num(name: str, fmt: str) -> str | None:
        value = row.get(name)
        return None if value is None or pd.isna(value) else format(float(value), fmt)

    parts = [f"EV {num('explained_variance', '.3f')}", f"L0 {num('l0', '.1f')}", f"val_mse {num('val_mse', '.4g')}"]
    converged = row.get("converged")
    parts.append("converged" if converged is not None and not pd.isna(converged) and converged else "NOT converged")
    forget = num("forget_acc_at_retain98", ".3f")
    if forget is not None:
        parts.append(f"forget acc at retain >= 0.98 {forget}")
    if num("unlearning_score", ".3f") is not None:
        parts.append(f"unlearning {num('unlearning_score', '.3f')}")
    return ", ".join(parts)


class SweepProgress(Callback):
    """One line per finished trial with its key numbers and the sweep's ETA; a status line every ``every_s``."""

    def __init__(self, out: str, total: int, steps: int, every_s: float = 60.0, extends: bool = False) -> None:
        self.store, self.total, self.steps, self.every_s = ResultsStore(out), total, steps, every_s
        self.extends = extends  # trials the convergence rule fails train on past ``steps`` (docs/training.md)
        self.started: dict[str, float] = {}
        self.step: dict[str, int] = {}
        self.durations: list[float] = []
        self.peak_running = 1
        self.last_status = time.monotonic()
        self.reported: dict[str, float] = {}  # when each running trial last reported a training step
        self.early_eta_printed = False

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.started[trial.trial_id] = time.monotonic()
        self.peak_running = max(self.peak_running, len(self.started))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        step = int(result.get("step") or 0)
        self.step[trial.trial_id] = step
        if step > 0 and not result.get("skipped") and not result.get("final"):
            self.reported[trial.trial_id] = time.monotonic()
        if not self.early_eta_printed and not self.durations and self.training_rate() is not None:
            self.early_eta_printed = True  # the first logged interval: a slow machine shows within minutes
            print(f"[hsae] first steps measured: {self.training_rate():.2f} steps/s per trial, "
                  f"{self.peak_running} at once{self.eta()}", flush=True)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        # Every loop of Tune's controller, results or not: evaluating trials report nothing for minutes.
        if self.started and time.monotonic() - self.last_status >= self.every_s:
            self.last_status = time.monotonic()
            print(self.status_line(trials), flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        spec = self._spec(trial)
        row = self.store.row(spec.experiment, spec.key) if spec else None
        if row is None:  # a scheduler stopped it: its row is written when the Tuner returns
            what = f"stopped early at step {self.step.get(trial.trial_id, 0)}"
        else:
            what = row_numbers(row)
        self._finished(trial, spec, what)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finished(trial, self._spec(trial), "FAILED (listed at the end)")

    def _finished(self, trial: Any, spec: TrialSpec | None, what: str) -> None:
        took = time.monotonic() - self.started.pop(trial.trial_id, time.monotonic())
        self.reported.pop(trial.trial_id, None)
        self.durations.append(took)
        label = trial_label(spec) if spec else trial.trial_id
        print(f"[hsae] trial {len(self.durations)}/{self.total} done in {format_duration(took)}: {label}: {what}"
              f"{self.eta()}", flush=True)

    def training_rate(self) -> float | None:
        """Mean training steps per second of the trials that have logged a step (None before any has)."""
        rates = [self.step[t] / (self.reported[t] - self.started[t]) for t in self.reported
                 if t in self.started and self.reported[t] > self.started[t]]
        return sum(rates) / len(rates) if rates else None

    def eta(self) -> str:
        """Remaining trials x mean trial time / trials at once; before a trial has finished, the training steps
        left at the measured step rate (evaluation not yet counted). Estimates, labelled so."""
        left = self.total - len(self.durations)
        if left <= 0:
            return ""
        if self.durations:
            mean = sum(self.durations) / len(self.durations)
            return f"; {left} to go, ETA ~{format_duration(left * mean / self.peak_running)}"
        rate = self.training_rate()
        if rate is None:
            return ""
        running = sum(min(self.step.get(t, 0), self.steps) for t in self.started)
        steps_left = left * self.steps - running
        return (f"; {left} to go, sweep ETA ~{format_duration(steps_left / (rate * self.peak_running))} for training "
                f"alone (evaluation adds to it; refined when the first trial finishes)")

    def status_line(self, trials: list) -> str:
        running = [t for t in trials if t.trial_id in self.started]
        parts = []
        for t in running:
            spec, step = self._spec(t), self.step.get(t.trial_id, 0)
            parts.append(f"{trial_label(spec) if spec else t.trial_id} {self._where(step)}")
        return (f"[hsae] {len(self.durations)}/{self.total} trials done, {len(running)} running: "
                f"{'; '.join(parts) or '-'}{self.eta()}")

    def _where(self, step: int) -> str:
        """A running trial's phase from its last reported step."""
        if step < self.steps:
            return f"step {step}/{self.steps}"
        if step > self.steps:
            return f"step {step} (extended)"
        # At the budget's last step a trial evaluates, or (for one log interval) has begun an extension.
        return "evaluating or extending" if self.extends else "evaluating"

    @staticmethod
    def _spec(trial: Any) -> TrialSpec | None:
        from tune.trainable import trial_spec

        config = getattr(trial, "config", None) or {}
        return trial_spec(config) if config.get("trial") else None
