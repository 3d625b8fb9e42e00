"""Results on disk: one Parquet row per trial, per-step curves, written atomically (no Ray here).

Layout under the results directory (``--out``):

    parts/trials/<experiment>/<trial_id>.parquet   one row, written by the trial when it ends
    parts/curves/<experiment>/<trial_id>.parquet   that trial's per-step metrics
    parts/probe/<experiment>/<trial_id>.parquet    that trial's sparse-probe grid (every task x k)
    trials.parquet, curves.parquet                 every part, consolidated (rebuilt after each sweep; also
    grid, probe, questions and split.parquet)

Every file is written to a temp name in the same directory and renamed into place, so a reader sees
a whole file or none; consolidation holds a lock so two sweeps sharing a directory never interleave.
Columns, their order and types come from ``hsae/schema.py`` (documented in ``docs/results-schema.md``).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from hsae import schema
from hsae.atomic import atomic_file, atomic_write_text
from hsae.schema import SAE_METRICS
from hsae.verdict import BARS, SELECT_TEST_COLUMNS, bar_metric, matched_retain_select_test

if TYPE_CHECKING:
    from hsae.config import SAEConfig, TrainConfig
    from hsae.models import ModelInfo
    from hsae.spaces import Profile, TrialSpec

STATUSES = ("completed", "early_stopped", "failed", "degenerate")
FINISHED = ("completed", "degenerate")  # a re-run skips these; failed and early-stopped trials run again

# (name, pandas dtype) in file order, from hsae/schema.py. cfg_* columns follow, one per configuration value.
TRIAL_COLUMNS: list[tuple[str, str]] = [(c.name, c.dtype) for c in schema.TRIAL_COLUMNS]
CURVE_COLUMNS: list[str] = [c.name for c in schema.CURVE_COLUMNS]


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else value
    return value


def trial_frame(row: dict[str, Any]) -> pd.DataFrame:
    """One row with the fixed columns (typed, missing -> null) followed by the row's cfg_* columns."""
    data = {name: [_clean(row.get(name))] for name, _ in TRIAL_COLUMNS}
    df = pd.DataFrame(data).astype({name: dtype for name, dtype in TRIAL_COLUMNS})
    for key in sorted(k for k in row if k.startswith("cfg_")):
        value = row[key]
        if isinstance(value, (list, tuple, dict)):
            value = json.dumps(value)
        df[key] = [value]
    unknown = sorted(set(row) - {n for n, _ in TRIAL_COLUMNS} - {k for k in row if k.startswith("cfg_")})
    if unknown:
        raise ValueError(f"trial row has undocumented column(s) {unknown}: add them to TRIAL_COLUMNS and the docs")
    return df


def typed_frame(records: list[dict[str, Any]], columns: tuple[schema.Column, ...]) -> pd.DataFrame:
    """Records as a frame with exactly the schema's columns and dtypes (lists stored as JSON strings)."""
    data = {c.name: [_json_if_list(_clean(r.get(c.name))) for r in records] for c in columns}
    return pd.DataFrame(data).astype({c.name: c.dtype for c in columns})


def _json_if_list(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, tuple)) else value


def _atomic_parquet(df: pd.DataFrame, path: Path) -> None:
    with atomic_file(path) as tmp:
        df.to_parquet(tmp, index=False)


SAES_DIR = "saes"  # one SAELens-layout folder per completed trial: saes/<trial_id>/


class ResultsStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def check_writable(self) -> None:
        """Fail before any compute if rows could not be written."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-probe-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise ValueError(f"results directory {str(self.root)!r} is not writable: {exc.strerror or exc}") from exc

    def _part(self, kind: str, experiment: str, trial_id: str) -> Path:
        return self.root / "parts" / kind / experiment / f"{trial_id}.parquet"

    def _stream_start_path(self, experiment: str, trial_id: str) -> Path:
        return self.root / "parts" / "stream" / experiment / f"{trial_id}.json"

    def stream_start(self, experiment: str, trial_id: str) -> int | None:
        """The first stream batch the trial joined at (None: it has not joined)."""
        path = self._stream_start_path(experiment, trial_id)
        return int(json.loads(path.read_text())["start"]) if path.is_file() else None

    def record_stream_start(self, experiment: str, trial_id: str, start: int) -> None:
        atomic_write_text(self._stream_start_path(experiment, trial_id), json.dumps({"start": int(start)}))

    def sae_path(self, trial_id: str) -> str:
        """Where a completed trial's SAE is exported, relative to the results directory (its row's sae_path)."""
        return f"{SAES_DIR}/{trial_id}"

    def grid(self, experiment: str, trial_id: str) -> pd.DataFrame | None:
        """The trial's grid.parquet rows (None: it wrote none)."""
        path = self._part("grid", experiment, trial_id)
        return pd.read_parquet(path) if path.is_file() else None

    def write_trial(self, row: dict[str, Any], curves: list[dict[str, Any]] | None = None,
                    grid: list[dict[str, Any]] | None = None, probe: list[dict[str, Any]] | None = None) -> None:
        """Write the trial's curves, grid and sparse-probe grid, then its row (the row's presence means the
        trial is recorded)."""
        if row.get("status") not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {row.get('status')!r}")
        exp, tid = str(row["experiment"]), str(row["trial_id"])
        if curves:
            df = pd.DataFrame([{c: rec.get(c) for c in CURVE_COLUMNS} for rec in curves])
            _atomic_parquet(df, self._part("curves", exp, tid))
        if grid:
            _atomic_parquet(typed_frame(grid, schema.GRID_COLUMNS), self._part("grid", exp, tid))
        if probe:
            _atomic_parquet(typed_frame(probe, schema.PROBE_COLUMNS), self._part("probe", exp, tid))
        _atomic_parquet(trial_frame(row), self._part("trials", exp, tid))

    def write_records(self, kind: str, name: str, records: list[dict[str, Any]]) -> None:
        """A sweep-level part (kind grid, questions or split) under ``name``; consolidated like the others."""
        columns = {"grid": schema.GRID_COLUMNS, "questions": schema.QUESTION_COLUMNS, "split": schema.SPLIT_COLUMNS}
        _atomic_parquet(typed_frame(records, columns[kind]), self._part(kind, "_sweep", name))

    def finished_ids(self, experiment: str) -> set[str]:
        directory = self.root / "parts" / "trials" / experiment
        done = set()
        for path in directory.glob("*.parquet"):
            try:
                status = pd.read_parquet(path, columns=["status"])["status"].iloc[0]
            except Exception:  # an unreadable part is not a finished trial
                continue
            if status in FINISHED:
                done.add(path.stem)
        return done

    def row(self, experiment: str, trial_id: str) -> dict[str, Any] | None:
        path = self._part("trials", experiment, trial_id)
        if not path.is_file():
            return None
        return pd.read_parquet(path).iloc[0].to_dict()

    @contextmanager
    def _lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".consolidate.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def consolidate(self) -> tuple[Path, Path]:
        """Rebuild trials.parquet and curves.parquet (and grid, questions, split) from every part."""
        with self._lock():
            trials = self._concat("trials")
            curves = self._concat("curves")
            if trials is None:
                trials = pd.DataFrame({n: pd.Series(dtype=t) for n, t in TRIAL_COLUMNS})
            if curves is None:
                curves = pd.DataFrame({c: [] for c in CURVE_COLUMNS})
            _atomic_parquet(trials, self.root / "trials.parquet")
            _atomic_parquet(curves, self.root / "curves.parquet")
            for kind in ("grid", "probe", "questions", "split"):
                frame = self._concat(kind)
                if frame is not None:
                    per_trial = kind in ("grid", "probe")  # rows that may repeat legitimately: never deduplicated
                    _atomic_parquet(frame if per_trial else frame.drop_duplicates(), self.root / f"{kind}.parquet")
        return self.root / "trials.parquet", self.root / "curves.parquet"

    def _concat(self, kind: str) -> pd.DataFrame | None:
        frames = []
        for path in sorted((self.root / "parts" / kind).glob("*/*.parquet")):
            try:
                frames.append(pd.read_parquet(path))
            except Exception:  # a part being renamed into place right now: the next consolidation has it
                continue
        frames = [f for f in frames if not f.empty]
        return pd.concat(frames, ignore_index=True) if frames else None


def load_trials(root: str | Path) -> pd.DataFrame:
    path = Path(root) / "trials.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"no trials.parquet in {root}: run a sweep first (python tune/ablate.py --out {root})")
    return pd.read_parquet(path)


def load_curves(root: str | Path) -> pd.DataFrame:
    path = Path(root) / "curves.parquet"
    return pd.read_parquet(path) if path.is_file() else pd.DataFrame({c: [] for c in CURVE_COLUMNS})


# -- rows ---------------------------------------------------------------------------------------------
def trial_row(spec: TrialSpec, profile: Profile, model: ModelInfo, sae_cfg: SAEConfig | None,
              train_cfg: TrainConfig | None, status: str, **values: Any) -> dict[str, Any]:
    """A trial's Parquet row: identity, status, the given values, and every config value as cfg_* columns
    (none for an external arm's SAE, which this sweep neither configured nor trained: both None)."""
    row: dict[str, Any] = {
        "experiment": spec.experiment, "space": spec.space, "variant": spec.variant, "trial_id": spec.key,
        "seed": spec.seed, "status": status, "profile": profile.name, "model": model.source,
        "layer": model.layer, "harvest_dtype": model.dtype, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "arm": spec.arm or None, "headline_metric": profile.headline_metric,
        "equivalence_margin": profile.equivalence_margin, "seed_looks": profile.seed_looks,
    }
    if sae_cfg is not None:
        row.update({f"cfg_{k}": v for k, v in sae_cfg.flat().items()})
    if train_cfg is not None:
        row.update({f"cfg_{k}": v for k, v in asdict(train_cfg).items() if k != "seed"})
    row.update(values)
    return row


def training_values(steps: int, batch_size: int, wall_s: float, final_loss: float,
                    metrics: dict[str, float]) -> dict[str, Any]:
    """The training columns of a row: extent, speed, last loss and the SAE metrics of the schema."""
    tokens = steps * batch_size
    return {"steps": steps, "tokens": tokens, "wall_s": wall_s, "tokens_per_s": tokens / max(wall_s, 1e-9),
            "final_loss": final_loss, **{name: metrics.get(name) for name in SAE_METRICS}}


def matched_retain(grid: list[dict[str, Any]], bar: float) -> float:
    """The test forget accuracy of the grid setting chosen on select questions at retain >= ``bar`` (NaN if
    none): ``hsae.verdict.matched_retain_select_test`` on the grid points' accuracies."""
    if not grid:
        raise ValueError("a matched-retain value needs at least one grid setting")
    for i, g in enumerate(grid):
        missing = [k for k in SELECT_TEST_COLUMNS if g.get(k) is None]
        if missing:
            raise ValueError(f"grid setting {i} lacks {missing}: matched retain chooses on select questions and "
                             "reports on test questions (docs/evaluation.md, 'Select and test')")
    arrays = [[float(g[k]) for g in grid] for k in SELECT_TEST_COLUMNS]
    return float(matched_retain_select_test(*arrays, bar)[0])


def evaluation_values(out: dict[str, Any], eval_s: float) -> dict[str, Any]:
    """The evaluation columns of a row from the activation server's ``evaluate`` answer."""
    u, ce = out["unlearning"], out.get("ce", {})
    summary = [{k: v for k, v in g.items() if not k.endswith("_correct")} for g in u["grid"]]
    return {
        "unlearning_score": u["score"], "random_feature_score": u.get("random_feature_score"),
        "unlearning_tied_settings": u["tied_settings"], "n_forget_questions": u["n_forget"],
        "n_retain_questions": u["n_retain"], "unlearning_grid": json.dumps(summary),
        # Chosen on select questions, reported on test questions (docs/evaluation.md, "Select and test").
        **{bar_metric(bar): _clean(matched_retain(u["grid"], bar)) for bar in BARS},
        "settings_selecting_none": sum(1 for g in u["grid"] if g.get("features_selected") == 0),
        "ce_score_forget": ce.get("ce_score_forget"), "ce_score_retain": ce.get("ce_score_retain"),
        "kl_forget": ce.get("kl_forget"), "kl_retain": ce.get("kl_retain"), "eval_s": eval_s,
        **{name: _clean(v) for name, v in out.get("sparse_probe", {}).get("columns", {}).items()},
    }


def probe_rows(trial_id: str, out: dict[str, Any]) -> list[dict[str, Any]]:
    """probe.parquet rows of one trial: every (task, features, k) of its sparse probe."""
    return [{"trial_id": trial_id, **g} for g in out.get("sparse_probe", {}).get("grid", [])]


def grid_rows(trial_id: str, out: dict[str, Any]) -> list[dict[str, Any]]:
    """grid.parquet rows of one trial: its own settings (control "sae") and the random-feature control's."""
    u = out["unlearning"]
    rows = [{"trial_id": trial_id, "control": "sae", **g} for g in u["grid"]]
    rows += [{"trial_id": trial_id, "control": "random", **g} for g in u.get("random_feature_grid", [])]
    return rows


def control_grid_rows(controls: dict[str, Any]) -> list[dict[str, Any]]:
    """grid.parquet rows of the SAE-independent positive control (its strength in the multiplier column)."""
    return [{"trial_id": "positive-control", "control": "positive", "grid": "control",
             "multiplier": g["strength"], **g} for g in controls["positive"]["grid"]]



def curve_rows(spec: TrialSpec, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A trial's per-step records as curves.parquet rows."""
    return [{"experiment": spec.experiment, "trial_id": spec.key, "variant": spec.variant, **h} for h in history]
