"""What the sweep prints while Tune runs: one line per finished trial, and every minute what is running.

Tune's own status tables (≈ 40 lines per report) are behind ``--verbose``; this callback reads each finished
trial's row from the results directory, so the line shows the numbers the report will use.
"""

from __future__ import annotations

import time
from typing import Any

import pandas as pd
from ray.tune import Callback

from hsae.external import is_external
from hsae.progress import format_duration
from hsae.results import ResultsStore
from hsae.spaces import TrialSpec


def trial_label(spec: TrialSpec) -> str:
    params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(spec.params.items()))
    arm = f" arm {spec.arm}" if spec.arm else ""
    return f"{spec.variant}{arm} seed {spec.seed}" + (f" ({params})" if params else "")


def row_numbers(row: dict[str, Any]) -> str:
    """The key numbers of a finished trial's row, in the report's words."""
    if row.get("status") == "degenerate":
        return f"degenerate: {row.get('error')}"

    def num(name: str, fmt: str) -> str | None:
        value = row.get(name)
        return None if value is None or pd.isna(value) else format(float(value), fmt)

    parts = [f"EV {num('explained_variance', '.3f')}", f"L0 {num('l0', '.1f')}", f"val_mse {num('val_mse', '.4g')}"]
    converged = row.get("converged")
    if is_external(str(row.get("variant", ""))):  # nothing was trained here, nothing to converge
        parts.append("not trained here")
    else:
        parts.append("converged" if converged is not None and not pd.isna(converged) and converged else "NOT converged")
    forget = num("forget_acc_at_retain98", ".3f")
    if forget is not None:
        parts.append(f"forget acc at retain >= 0.98 {forget}")
    if num("unlearning_score", ".3f") is not None:
        parts.append(f"unlearning {num('unlearning_score', '.3f')}")
    return ", ".join(parts)


FINISHED = ("TERMINATED", "ERROR")  # Tune's statuses of a trial that will not run again


class SweepProgress(Callback):
    """One line per finished trial with its key numbers and the sweep's ETA; a status line every ``every_s``."""

    # Trials the convergence rule fails train on past ``steps``, ``extension_steps`` at a time, at most
    # ``max_extensions`` times (docs/training.md, "Extensions"); class defaults for a callback pickled by a Tuner
    # before these existed (--resume restores it as it was).
    extension_steps = 0
    max_extensions = 0

    def __init__(self, out: str, total: int, steps: int, every_s: float = 60.0, extension_steps: int = 0,
                 max_extensions: int = 0) -> None:
        self.store, self.total, self.steps, self.every_s = ResultsStore(out), total, steps, every_s
        self.extension_steps, self.max_extensions = extension_steps, max_extensions if extension_steps else 0
        self.started: dict[str, float] = {}
        self.step: dict[str, int] = {}
        self.durations: list[float] = []  # of the trials trained here (a finished one skipped takes 0 s)
        self.done = 0
        self.skipped: set[str] = set()
        self.peak_running = 1
        self.last_status = time.monotonic()
        self.reported: dict[str, float] = {}  # when each running trial last reported a training step
        self.early_eta_printed = False

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.started[trial.trial_id] = time.monotonic()
        self.peak_running = max(self.peak_running, len(self.started))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if result.get("skipped"):  # finished before (a resumed or shared trial): not a trial time for the ETA
            self.skipped.add(trial.trial_id)
        if result.get("final") or result.get("skipped"):  # training is over (its step is one past the last)
            return
        step = int(result.get("step") or 0)
        self.step[trial.trial_id] = step
        if step > 0:
            self.reported[trial.trial_id] = time.monotonic()
        if not self.early_eta_printed and not self.durations and self.training_rate() is not None:
            self.early_eta_printed = True  # the first logged interval: a slow machine shows within minutes
            print(f"[hsae] first steps measured: {self.training_rate():.2f} steps/s per trial, "
                  f"{self.peak_running} at once{self.eta()}", flush=True)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self._count_restored(trials)
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

    def _count_restored(self, trials: list) -> None:
        """Trials that a resumed experiment restored as finished run no more, so no callback reports them: count
        them done, and say so (they time nothing). Only at the controller's first step, where they all are: a trial
        finishing later is reported by ``on_trial_complete``."""
        if getattr(self, "restored_counted", False):
            return
        self.restored_counted = True
        counted = self._counted()
        restored = [t for t in trials if getattr(t, "status", None) in FINISHED and t.trial_id not in counted
                    and t.trial_id not in self.started]
        if restored:
            counted.update(t.trial_id for t in restored)
            self.done += len(restored)
            print(f"[hsae] {len(restored)} trial(s) finished before the resume; {self.done}/{self.total} done"
                  f"{self.eta()}", flush=True)

    def _counted(self) -> set[str]:
        """The trials counted done (a callback pickled before this set existed starts with none)."""
        if not hasattr(self, "counted"):
            self.counted: set[str] = set()
        return self.counted

    def _finished(self, trial: Any, spec: TrialSpec | None, what: str) -> None:
        took = time.monotonic() - self.started.pop(trial.trial_id, time.monotonic())
        self.reported.pop(trial.trial_id, None)
        if trial.trial_id in self._counted():
            return
        self._counted().add(trial.trial_id)
        self.done += 1
        label = trial_label(spec) if spec else trial.trial_id
        if trial.trial_id in self.skipped:
            print(f"[hsae] trial {self.done}/{self.total} already finished: {label}{self.eta()}", flush=True)
            return
        self.durations.append(took)
        print(f"[hsae] trial {self.done}/{self.total} done in {format_duration(took)}: {label}: {what}"
              f"{self.eta()}", flush=True)

    def training_rate(self) -> float | None:
        """Mean training steps per second of the trials that have logged a step (None before any has)."""
        rates = [self.step[t] / (self.reported[t] - self.started[t]) for t in self.reported
                 if t in self.started and self.reported[t] > self.started[t]]
        return sum(rates) / len(rates) if rates else None

    @property
    def max_steps(self) -> int:
        """The most steps a trial trains: its budget and every extension."""
        return self.steps + self.max_extensions * self.extension_steps

    def end_of(self, step: int) -> int:
        """The last step a trial at ``step`` is now scheduled to train: its budget, or the end of the extension it
        is in (one past the budget's last step is the first extension's)."""
        if step <= self.steps or not self.extension_steps:
            return self.steps
        extension = min(-(-(step - self.steps) // self.extension_steps), max(self.max_extensions, 1))
        return self.steps + extension * self.extension_steps

    def eta(self) -> str:
        """Remaining trials x mean trial time / trials at once, plus the steps left in the extensions running
        trials are in; before a trial has finished, the training steps left (the running trials' to the end of
        their budget or extension, the others' budgets) at the measured step rate (evaluation not yet counted).
        Where trials may extend, how much more every extension would add. Estimates, labelled so."""
        left = self.total - self.done
        if left <= 0:
            return ""
        rate = self.training_rate()
        waiting = max(left - len(self.started), 0)
        steps_left = sum(max(self.end_of(self.step.get(t, 0)) - self.step.get(t, 0), 0) for t in self.started)
        most_left = sum(max(self.max_steps - self.step.get(t, 0), 0) for t in self.started)
        more = self._extensions_note(rate, most_left + waiting * self.max_steps - steps_left - waiting * self.steps)
        if self.durations:
            mean = sum(self.durations) / len(self.durations)
            extending = sum(self.end_of(self.step.get(t, 0)) - self.step.get(t, 0) for t in self.started
                            if self.step.get(t, 0) > self.steps)  # past the budget: not in the mean trial's time
            seconds = (left * mean + (extending / rate if rate else 0.0)) / self.peak_running
            return f"; {left} to go, ETA ~{format_duration(seconds)}{more}"
        if rate is None:
            return ""
        steps_left += waiting * self.steps
        return (f"; {left} to go, sweep ETA ~{format_duration(steps_left / (rate * self.peak_running))} for training "
                f"alone{more} (evaluation adds to it; refined when the first trial finishes)")

    def _extensions_note(self, rate: float | None, extra_steps: int) -> str:
        """What extensions may still add: every remaining trial trained to ``max_steps``."""
        if not self.max_extensions or extra_steps <= 0:
            return ""
        when = f" ~{format_duration(extra_steps / (rate * self.peak_running))}" if rate else ""
        return f"; extensions may add up to{when} more ({extra_steps:,} steps: every trial up to {self.max_steps})"

    def status_line(self, trials: list) -> str:
        running = [t for t in trials if t.trial_id in self.started]
        parts = []
        for t in running:
            spec, step = self._spec(t), self.step.get(t.trial_id, 0)
            parts.append(f"{trial_label(spec) if spec else t.trial_id} {self._where(step)}")
        return (f"[hsae] {self.done}/{self.total} trials done, {len(running)} running: "
                f"{'; '.join(parts) or '-'}{self.eta()}")

    def _where(self, step: int) -> str:
        """A running trial's phase from its last reported step."""
        if step < self.steps:
            return f"step {step}/{self.steps}"
        if step > self.steps:
            if not self.extension_steps:  # a callback pickled before extensions had sizes
                return f"step {step} (extended)"
            extension = (self.end_of(step) - self.steps) // self.extension_steps
            return (f"step {step}/{self.end_of(step)} (extension {extension} of at most {self.max_extensions}: up "
                    f"to {self.max_steps} steps)")
        # At the budget's last step a trial evaluates, or (for one log interval) has begun an extension.
        return "evaluating or extending" if self.max_extensions or getattr(self, "extends", False) else "evaluating"

    @staticmethod
    def _spec(trial: Any) -> TrialSpec | None:
        from tune.trainable import trial_spec

        config = getattr(trial, "config", None) or {}
        return trial_spec(config) if config.get("trial") else None
