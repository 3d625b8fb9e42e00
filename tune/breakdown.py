"""Where a sweep's wall time went: the one-off phases as measured, trials' training and evaluation as
their summed seconds over the trials that ran at once, overhead as the rest (docs/performance.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from hsae.atomic import atomic_write_text

PHASES = ("convert", "harvest", "banks", "controls", "train", "evaluate", "overhead")


def breakdown(total_s: float, phases: dict[str, float], rows: pd.DataFrame, concurrency: int) -> dict[str, float]:
    """Seconds per phase, summing to ``total_s``.

    ``phases`` holds the measured one-off phases (convert, harvest, banks, controls). Trials overlap, so
    training and evaluation are their rows' summed ``wall_s`` and ``eval_s`` divided by ``concurrency``;
    an evaluation's ``eval_s`` includes its wait for the server.
    """
    out = {name: float(phases.get(name, 0.0)) for name in PHASES[:4]}
    out["train"] = float(rows["wall_s"].fillna(0).sum()) / concurrency
    out["evaluate"] = float(rows["eval_s"].fillna(0).sum()) / concurrency
    out["overhead"] = max(total_s - sum(out.values()), 0.0)
    return out


def format_breakdown(parts: dict[str, float], total_s: float, n_trials: int, concurrency: int) -> str:
    lines = [f"[hsae] wall time {total_s:.0f} s ({total_s / 60:.1f} min) for {n_trials} trial(s), "
             f"{concurrency} at a time:"]
    for name in PHASES:
        lines.append(f"  {name:<9}{parts[name]:7.0f} s  {parts[name] / max(total_s, 1e-9):6.1%}")
    return "\n".join(lines)


def write_breakdown(out: Path, experiment: str, parts: dict[str, float], total_s: float) -> None:
    atomic_write_text(out / "timings" / f"{experiment}.json", json.dumps({"total_s": total_s, **parts}, indent=2))
