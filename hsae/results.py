"""Results on disk: one Parquet row per trial, per-step curves, written atomically (no Ray here).

Layout under the results directory (``--out``):

    parts/trials/<experiment>/<trial_id>.parquet   one row, written by the trial when it ends
    parts/curves/<experiment>/<trial_id>.parquet   that trial's per-step metrics
    parts/probe/<experiment>/<trial_id>.parquet    that trial's sparse-probe grid (every task x k)
    parts/asked/<experiment>/<space>.json          the trial ids that experiment's space asked for
    spaces/<space>.json                            the space's declaration (reference, trend), as run
    trials.parquet, curves.parquet                 every part, consolidated (rebuilt after each sweep; also
    grid, probe, questions and split.parquet)

Every file is written to a temp name in the same directory and renamed into place, so a reader sees
a whole file or none; consolidation holds a lock so two sweeps sharing a directory never interleave.

A trial id is a content key (``TrialSpec.key``): ``<experiment>`` in a part's path is the sweep that
trained it, and any sweep finds it there (``finished_ids``, ``row``). Consolidation keeps one row per
trial id and lists every space and experiment that asked for it (``spaces``, ``experiments``).
Columns, their order and types come from ``hsae/schema.py`` (documented in ``docs/results-schema.md``).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from hsae import schema
from hsae.atomic import atomic_file, atomic_write_text
from hsae.schema import SAE_METRICS
from hsae.scoring import BASELINE_CONTROL, CROSSFIT, SELECT_TEST_COLUMNS, grid_metrics

if TYPE_CHECKING:
    from hsae.config import SAEConfig, TrainConfig
    from hsae.models import ModelInfo
    from hsae.profiles import Profile
    from hsae.spaces import TrialSpec

STATUSES = ("completed", "early_stopped", "failed", "degenerate")
FINISHED = ("completed", "degenerate")  # a re-run skips these; failed and early-stopped trials run again
PER_TRIAL = ("curves", "grid", "probe")  # part kinds written beside a trial's row, one file per trial id

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
        """The trial's grid.parquet rows (None: it wrote none), from the experiment that holds its row."""
        path = self._part("grid", self.home(experiment, trial_id) or experiment, trial_id)
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

    def finished_ids(self, experiment: str | None = None) -> set[str]:
        """Ids of the finished trials (completed or degenerate): of ``experiment``, or (None) of every experiment
        in the directory, which is what a sweep skips: a trial id names its content, not the sweep that ran it."""
        directory = self.root / "parts" / "trials"
        paths = directory.glob("*/*.parquet") if experiment is None else (directory / experiment).glob("*.parquet")
        return {path.stem for path in paths if _status(path) in FINISHED}

    def home(self, experiment: str, trial_id: str) -> str | None:
        """The experiment whose part holds the trial's row: ``experiment``'s when it finished there or none
        finished elsewhere, else the (first by name) experiment where it finished; None: no row anywhere."""
        own = self._part("trials", experiment, trial_id)
        if own.is_file() and _status(own) in FINISHED:
            return experiment
        for path in sorted((self.root / "parts" / "trials").glob(f"*/{trial_id}.parquet")):
            if path.parent.name != experiment and _status(path) in FINISHED:
                return path.parent.name
        return experiment if own.is_file() else None

    def row(self, experiment: str, trial_id: str) -> dict[str, Any] | None:
        """The trial's row: ``experiment``'s, or a finished one another experiment wrote (None: no row)."""
        home = self.home(experiment, trial_id)
        if home is None:
            return None
        return pd.read_parquet(self._part("trials", home, trial_id)).iloc[0].to_dict()

    def record_space(self, declaration: dict[str, Any]) -> None:
        """A space's declaration as the sweep read it (``hsae.spaces.Space.declaration``: its reference, trend and
        description), before any of its trials ran: what its report section tests."""
        atomic_write_text(self.root / "spaces" / f"{declaration['name']}.json",
                          json.dumps(declaration, indent=1, sort_keys=True) + "\n")

    def record_asked(self, experiment: str, space: str, trial_ids: Iterable[str]) -> None:
        """Remember that ``experiment``'s ``space`` asked for these trials (the rows' ``spaces`` and
        ``experiments`` at consolidation), added to what it asked for before."""
        with self._lock():
            self._record_asked(experiment, space, trial_ids)

    def _record_asked(self, experiment: str, space: str, trial_ids: Iterable[str]) -> None:
        path = self.root / "parts" / "asked" / experiment / f"{space}.json"
        ids = set(trial_ids)
        if path.is_file():
            ids |= set(json.loads(path.read_text())["trial_ids"])
        atomic_write_text(path, json.dumps({"experiment": experiment, "space": space, "trial_ids": sorted(ids)}))

    def _asked(self) -> Iterator[tuple[str, str, list[str]]]:
        for path in sorted((self.root / "parts" / "asked").glob("*/*.json")):
            try:
                doc = json.loads(path.read_text())
            except (OSError, ValueError):  # being written right now: the next consolidation has it
                continue
            yield str(doc["experiment"]), str(doc["space"]), list(doc["trial_ids"])

    def adopt_legacy(self, trials: Iterable[TrialSpec]) -> int:
        """Rows written before trial ids were content only (ids that also hashed the experiment and space
        names, ``TrialSpec.legacy_key``), moved to the ids ``trials`` have now; the number adopted.

        Every (experiment, space) pair the directory's rows name is tried, so a finished trial is found
        whichever sweep ran it. Its parts (row, curves, grid, probe, stream start) and its SAE folder take the
        new id; where the experiment already holds the new id, the old parts are set aside under
        ``parts/superseded/`` (kept, not consolidated), so the trial keeps one row."""
        directory = self.root / "parts" / "trials"
        if not directory.is_dir():
            return 0
        pairs = set()
        for path in directory.glob("*/*.parquet"):
            try:
                pairs.add((path.parent.name, str(pd.read_parquet(path, columns=["space"])["space"].iloc[0])))
            except Exception:  # an unreadable part has nothing to adopt
                continue
        adopted = 0
        with self._lock():
            for spec in trials:
                for experiment in sorted({e for e, _ in pairs}):
                    found = [(space, old) for e, space in sorted(pairs) if e == experiment
                             and (old := spec.legacy_key(experiment, space)) != spec.key
                             and self._part("trials", experiment, old).is_file()]
                    # The first finished of them keeps its row (the others were the same trial trained again).
                    found.sort(key=lambda so: self._rank(self._part("trials", experiment, so[1])))
                    for space, old in found:
                        self._adopt(experiment, space, old, spec.key)
                        adopted += 1
        return adopted

    @staticmethod
    def _rank(path: Path) -> tuple[bool, str]:
        try:
            row = pd.read_parquet(path, columns=["status", "finished_at"]).iloc[0]
        except Exception:
            return True, ""
        return row["status"] not in FINISHED, "" if pd.isna(row["finished_at"]) else str(row["finished_at"])

    def _adopt(self, experiment: str, space: str, old: str, new: str) -> None:
        stream_old, stream_new = self._stream_start_path(experiment, old), self._stream_start_path(experiment, new)
        if self._part("trials", experiment, new).is_file():  # already there under its content id: set aside
            for kind in ("trials", *PER_TRIAL):
                src = self._part(kind, experiment, old)
                if src.is_file():
                    dst = self.root / "parts" / "superseded" / kind / experiment / src.name
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(src, dst)
            stream_old.unlink(missing_ok=True)
        else:
            for kind in PER_TRIAL:
                src = self._part(kind, experiment, old)
                if src.is_file():
                    _atomic_parquet(_renamed(pd.read_parquet(src), new), self._part(kind, experiment, new))
            if stream_old.is_file() and not stream_new.exists():
                os.replace(stream_old, stream_new)
            row = _renamed(pd.read_parquet(self._part("trials", experiment, old)), new)
            old_sae, new_sae = self.root / self.sae_path(old), self.root / self.sae_path(new)
            if old_sae.is_dir() and not new_sae.exists():
                os.replace(old_sae, new_sae)
                _retag_sae(new_sae, new)
            if "sae_path" in row and row["sae_path"].iloc[0] == self.sae_path(old) and new_sae.is_dir():
                row["sae_path"] = pd.array([self.sae_path(new)], dtype=row["sae_path"].dtype)
            _atomic_parquet(row, self._part("trials", experiment, new))
            for kind in PER_TRIAL:
                self._part(kind, experiment, old).unlink(missing_ok=True)
            stream_old.unlink(missing_ok=True)
            self._part("trials", experiment, old).unlink()
        self._record_asked(experiment, space, [new])

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
        """Rebuild trials.parquet and curves.parquet (and grid, questions, split) from every part: one row per
        trial id (``one_row_per_trial``) with the spaces and experiments that asked for it, and the curves,
        grid and probe rows of the experiment that holds that row."""
        with self._lock():
            trials = self._concat("trials")
            homes: dict[str, str] = {}
            if trials is not None:
                trials, homes = one_row_per_trial(trials, list(self._asked()))
            curves = self._concat("curves", homes)
            if trials is None:
                trials = pd.DataFrame({n: pd.Series(dtype=t) for n, t in TRIAL_COLUMNS})
            if curves is None:
                curves = pd.DataFrame({c: [] for c in CURVE_COLUMNS})
            _atomic_parquet(trials, self.root / "trials.parquet")
            _atomic_parquet(curves, self.root / "curves.parquet")
            for kind in ("grid", "probe", "questions", "split"):
                frame = self._concat(kind, homes)
                if frame is not None:
                    per_trial = kind in ("grid", "probe")  # rows that may repeat legitimately: never deduplicated
                    _atomic_parquet(frame if per_trial else frame.drop_duplicates(), self.root / f"{kind}.parquet")
        return self.root / "trials.parquet", self.root / "curves.parquet"

    def _concat(self, kind: str, homes: dict[str, str] | None = None) -> pd.DataFrame | None:
        """Every part of ``kind``; a trial's part only from its home experiment (``homes``: trial id -> it)."""
        frames = []
        for path in sorted((self.root / "parts" / kind).glob("*/*.parquet")):
            if homes and path.parent.name != homes.get(path.stem, path.parent.name):
                continue  # the same trial's part under another experiment: its row is not the one kept
            try:
                frames.append(pd.read_parquet(path))
            except Exception:  # a part being renamed into place right now: the next consolidation has it
                continue
        frames = [f for f in frames if not f.empty]
        return pd.concat(frames, ignore_index=True) if frames else None


def _status(path: Path) -> str | None:
    """A row part's status (None: unreadable, e.g. being renamed into place)."""
    try:
        return str(pd.read_parquet(path, columns=["status"])["status"].iloc[0])
    except Exception:
        return None


def _renamed(frame: pd.DataFrame, trial_id: str) -> pd.DataFrame:
    """``frame`` with every ``trial_id`` set to ``trial_id``, in the column's own dtype."""
    return frame.assign(trial_id=trial_id).astype({"trial_id": frame["trial_id"].dtype})


def _retag_sae(folder: Path, trial_id: str) -> None:
    """An adopted SAE folder's ``cfg.json`` names its trial by the new id (``metadata.hsae_trial``)."""
    cfg = folder / "cfg.json"
    try:
        doc = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return
    trial = (doc.get("metadata") or {}).get("hsae_trial")
    if isinstance(trial, dict):
        trial["trial_id"] = trial_id
        atomic_write_text(cfg, json.dumps(doc, indent=2))


def one_row_per_trial(trials: pd.DataFrame,
                      asked: list[tuple[str, str, list[str]]]) -> tuple[pd.DataFrame, dict[str, str]]:
    """Row parts as trials.parquet: one row per trial id, and which experiment's parts are its (trial id -> it).

    A trial has several row parts when sweeps of different experiments ran it at once, or one retried it
    after a failure: the finished row is kept (completed or degenerate), the earliest of several. Its
    ``spaces`` and ``experiments`` list every space and experiment that asked for it (``asked``:
    (experiment, space, trial ids) records, and each of its row parts' own)."""
    spaces: dict[str, set[str]] = {}
    experiments: dict[str, set[str]] = {}
    for exp, space, tid in zip(trials["experiment"], trials["space"], trials["trial_id"], strict=True):
        spaces.setdefault(str(tid), set()).add(str(space))
        experiments.setdefault(str(tid), set()).add(str(exp))
    for exp, space, ids in asked:
        for tid in ids:
            if tid in spaces:
                spaces[tid].add(space)
                experiments[tid].add(exp)
    rank = trials.assign(_unfinished=~trials["status"].isin(FINISHED),
                         _at=trials["finished_at"].fillna("").astype(str))
    kept = rank.sort_values(["_unfinished", "_at", "experiment"], kind="stable").drop_duplicates("trial_id")
    kept = trials.loc[sorted(kept.index)].reset_index(drop=True)  # the parts' order, duplicates dropped
    kept["spaces"] = pd.array([json.dumps(sorted(spaces[t])) for t in kept["trial_id"]], dtype="string")
    kept["experiments"] = pd.array([json.dumps(sorted(experiments[t])) for t in kept["trial_id"]], dtype="string")
    fixed = [name for name, _ in TRIAL_COLUMNS if name in kept]  # rows from before a column: it is null there
    kept = kept[fixed + [c for c in kept if c not in fixed]]
    return kept, dict(zip(kept["trial_id"].astype(str), kept["experiment"].astype(str), strict=True))


def load_declarations(root: str | Path) -> dict[str, dict[str, Any]]:
    """Every space declaration a sweep recorded in ``root`` (``ResultsStore.record_space``), by space name."""
    out = {}
    for path in sorted((Path(root) / "spaces").glob("*.json")):
        doc = json.loads(path.read_text())
        out[str(doc["name"])] = doc
    return out


def asked_by(trials: pd.DataFrame, space: str) -> pd.Series:
    """Which rows ``space`` asked for: its name in ``spaces`` (a row without that list: its own ``space``)."""
    if "space" not in trials:
        return pd.Series(True, index=trials.index)
    own = trials["space"].astype(str) == space
    if "spaces" not in trials:
        return own
    listed = trials["spaces"].map(lambda text: isinstance(text, str) and space in json.loads(text))
    return listed.astype(bool) | (trials["spaces"].isna() & own)


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
        "experiment": spec.experiment, "space": spec.space, "spaces": json.dumps([spec.space]),
        "experiments": json.dumps([spec.experiment]), "variant": spec.variant, "trial_id": spec.key,
        "seed": spec.seed, "status": status, "profile": profile.name, "model": model.source,
        "layer": model.layer, "harvest_dtype": model.dtype, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "arm": spec.arm or None, "headline_metric": profile.headline_metric,
        "equivalence_margin": profile.equivalence_margin, "seed_looks": profile.seed_looks,
    }
    if sae_cfg is not None:
        row.update({f"cfg_{k}": v for k, v in sae_cfg.flat().items()})
    if train_cfg is not None:
        # extension_fraction is spent in a trial's config (its extension_steps say the size): not a column
        row.update({f"cfg_{k}": v for k, v in asdict(train_cfg).items() if k not in ("seed", "extension_fraction")})
    row.update(values)
    return row


def training_values(steps: int, batch_size: int, wall_s: float, final_loss: float,
                    metrics: dict[str, float]) -> dict[str, Any]:
    """The training columns of a row: extent, speed, last loss and the SAE metrics of the schema."""
    tokens = steps * batch_size
    return {"steps": steps, "tokens": tokens, "wall_s": wall_s, "tokens_per_s": tokens / max(wall_s, 1e-9),
            "final_loss": final_loss, **{name: metrics.get(name) for name in SAE_METRICS}}


def select_test_accuracies(grid: list[dict[str, Any]]) -> list[list[float]]:
    """The grid settings' accuracies in ``SELECT_TEST_COLUMNS`` order (forget, retain on select questions, then
    on test questions); ValueError for an empty grid or a setting without them."""
    if not grid:
        raise ValueError("a matched-retain value needs at least one grid setting")
    for i, g in enumerate(grid):
        missing = [k for k in SELECT_TEST_COLUMNS if g.get(k) is None]
        if missing:
            raise ValueError(f"grid setting {i} lacks {missing}: matched retain chooses on one part of the questions "
                             "and reports on the other (docs/evaluation.md, 'Select and test')")
    return [[float(g[k]) for g in grid] for k in SELECT_TEST_COLUMNS]


def grid_values(grid: list[dict[str, Any]], baseline: dict[str, Any] | None = None) -> dict[str, float]:
    """Every select/test metric of the grid settings (``hsae.scoring.CROSSFIT``), as the verdict computes them
    (``hsae.scoring.grid_metrics``): accuracy-based ones, and with the unmodified model's grid point ``baseline``
    the ones on the probability of the correct option (else NaN)."""
    select_test_accuracies(grid)  # every setting has its select and test accuracies
    frame = pd.DataFrame([{k: v for k, v in g.items() if not k.endswith("_correct")} for g in grid])
    values = grid_metrics(frame, baseline)
    return {m: values[m] for m in CROSSFIT}


def evaluation_values(out: dict[str, Any], eval_s: float) -> dict[str, Any]:
    """The evaluation columns of a row from the activation server's ``evaluate`` answer."""
    u, ce = out["unlearning"], out.get("ce", {})
    summary = [{k: v for k, v in g.items() if not k.endswith("_correct")} for g in u["grid"]]
    # Chosen on one part of the questions, reported on the other, both ways (docs/evaluation.md, "Select and test");
    # the *_p ones on the probability of the correct option, as a share of the unmodified model's (u["baseline"]).
    chosen = grid_values(u["grid"], u.get("baseline"))
    return {
        "unlearning_score": u["score"], "random_feature_score": u.get("random_feature_score"),
        "unlearning_tied_settings": u["tied_settings"], "n_forget_questions": u["n_forget"],
        "n_retain_questions": u["n_retain"], "unlearning_grid": json.dumps(summary),
        **{m: _clean(v) for m, v in chosen.items()},  # frontier_area: the declared headline by default
        "settings_selecting_none": sum(1 for g in u["grid"] if g.get("features_selected") == 0),
        "ce_score_forget": ce.get("ce_score_forget"), "ce_score_retain": ce.get("ce_score_retain"),
        "kl_forget": ce.get("kl_forget"), "kl_retain": ce.get("kl_retain"), "eval_s": eval_s,
        **{name: _clean(v) for name, v in out.get("sparse_probe", {}).get("columns", {}).items()},
    }


def probe_rows(trial_id: str, out: dict[str, Any]) -> list[dict[str, Any]]:
    """probe.parquet rows of one trial: every (task, features, k) of its sparse probe."""
    return [{"trial_id": trial_id, **g} for g in out.get("sparse_probe", {}).get("grid", [])]


def grid_rows(trial_id: str, out: dict[str, Any]) -> list[dict[str, Any]]:
    """grid.parquet rows of one trial: its own settings (control "sae"), the random-feature control's, and the
    unmodified model's point (control "baseline", where the evaluation recorded it)."""
    u = out["unlearning"]
    rows = [{"trial_id": trial_id, "control": "sae", **g} for g in u["grid"]]
    rows += [{"trial_id": trial_id, "control": "random", **g} for g in u.get("random_feature_grid", [])]
    if u.get("baseline"):
        rows.append({"trial_id": trial_id, "control": BASELINE_CONTROL, **u["baseline"]})
    return rows


def control_grid_rows(controls: dict[str, Any]) -> list[dict[str, Any]]:
    """grid.parquet rows of the SAE-independent positive control (its strength in the multiplier column), and the
    unmodified model's point it is measured against (``controls["baseline"]``, where recorded)."""
    rows = [{"trial_id": "positive-control", "control": "positive", "grid": "control",
             "multiplier": g["strength"], **g} for g in controls["positive"]["grid"]]
    rows += [{"trial_id": "positive-control", "control": BASELINE_CONTROL, **g}
             for g in (controls.get("baseline") or {}).get("grid", [])]
    return rows


def curve_rows(spec: TrialSpec, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A trial's per-step records as curves.parquet rows."""
    return [{"experiment": spec.experiment, "trial_id": spec.key, "variant": spec.variant, **h} for h in history]
