"""What report.md (tune/report.py) and report.html (tune/report_html.py) both draw from, computed once.

``ReportInputs`` loads a results directory, chooses the trials each part of the report ranks (the main job's
converged trials, each ablation space's, the sparsity frontier's) and computes their verdicts once
(``hsae.verdict.build_verdict``); ``frontier_steps`` and ``frontier_points`` are the figures' data, and
``ordered`` / ``variant_index`` the order and colour of arms. The text both renderings show, as format-free
blocks, is ``tune/report_blocks.py``'s. Neither rendering is imported here; both import this module (nothing
is imported back).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pandas as pd

from hsae.ablation import AblationVerdict, ablation_verdict
from hsae.budget import budget_check
from hsae.external import is_external
from hsae.noise import MetricNoise, noise_split
from hsae.results import asked_by, load_curves, load_declarations, load_trials
from hsae.scoring import CANDIDATES, frontier, scored
from hsae.stats import mean_ci95
from hsae.variants import PAPER_VARIANTS
from hsae.verdict import BASELINE, WITNESS, Verdict, arm_names, build_verdict, controls_problems, declared_headline

VARIANT_ORDER = ["relu", *PAPER_VARIANTS, "topk", "matryoshka_batchtopk"]  # trained arms; external arms follow
# The second witness's primary metric: k = 1 (does one latent carry the concept?), averaged over every scored
# one-vs-rest task (less noisy than one task's few test documents; on a profile with only the forget task it is
# that task). The forget task alone is secondary (docs/evaluation.md, "Report sections").
PROBE_PRIMARY = WITNESS
PROBE_METRICS = (PROBE_PRIMARY, "sparse_probe_forget_k1")
CE_METRIC = "ce_score_retain"  # SAEBench's CE loss score, on general (retain) text


# -- loading and the trials each part ranks --------------------------------------------------------
def load_optional(results_dir: Path, name: str) -> pd.DataFrame | None:
    """A Parquet file of the results directory, or None when it is absent (results older than it)."""
    path = results_dir / name
    return pd.read_parquet(path) if path.is_file() else None


def load_grid(results_dir: Path) -> pd.DataFrame | None:
    """grid.parquet with ``control`` and ``grid`` filled in (older grids lack them), or None."""
    grid = load_optional(results_dir, "grid.parquet")
    if grid is None or grid.empty:
        return None
    control = grid["control"].fillna("sae") if "control" in grid else "sae"
    name = grid["grid"].fillna("saebench") if "grid" in grid else "saebench"
    return grid.assign(control=control, grid=name)


def load_controls(results_dir: Path) -> dict:
    """The evaluation controls (the last controls/*.json by name), or {} when there are none."""
    import json

    controls = {}
    for path in sorted((results_dir / "controls").glob("*.json")):
        controls = json.loads(path.read_text())
    return controls


def external_rows(df: pd.DataFrame) -> pd.Series:
    """Which rows are external arms' (variant "external:<name>", docs/sweeps.md "External arms")."""
    if "variant" not in df:
        return pd.Series(False, index=df.index)
    return df["variant"].astype(str).map(is_external).astype(bool)


def converged(df: pd.DataFrame) -> pd.DataFrame:
    """The rows the verdict may rank: SAEs that converged (docs/training.md; rows from before the rule count as
    unconverged) and external arms' SAEs, which this sweep did not train (``converged`` null)."""
    ok = external_rows(df)
    if "converged" in df:
        ok = ok | df["converged"].astype("boolean").fillna(False).astype(bool)
    return df[ok]


def main_trials(done: pd.DataFrame, declarations: dict[str, dict] | None = None) -> pd.DataFrame:
    """The main job: the completed trials of the "variants" space (and any external arm's) if there are any;
    else, where the sweeps recorded their spaces' declarations, those of the spaces compared with relu (an A/A
    run, the baselines; an ablation has a section of its own); else all completed."""
    if "space" not in done:
        return done
    main = asked_by(done, "variants")
    if main.any():
        return done[main | external_rows(done)]
    if declarations:
        main = pd.Series(False, index=done.index)
        for name in (n for n, d in declarations.items() if not is_ablation(d)):
            main |= asked_by(done, name)
        return done[main | external_rows(done)]
    return done


def is_ablation(declaration: dict) -> bool:
    """A space whose reference is not plain relu: its arms are compared with its own control (a section)."""
    return declaration.get("reference") not in (None, {"variant": BASELINE, "params": {}, "arm": ""})


def report_variants(names: object) -> list[str]:
    """The variants figures draw, in report order: the trained ones of VARIANT_ORDER, then external arms."""
    present = set(names)
    return [v for v in VARIANT_ORDER if v in present] + sorted(v for v in present if is_external(str(v)))


def variant_index(variant: str) -> int:
    """A variant's colour index: its place in VARIANT_ORDER, external arms after."""
    if variant in VARIANT_ORDER:
        return VARIANT_ORDER.index(variant)
    return len(VARIANT_ORDER) + sum(map(ord, variant))


def order_key(key: tuple) -> tuple:
    out = []
    for k in key:
        if isinstance(k, str) and is_external(k):  # external arms after every trained one
            out.append((3, 0.0, k))
        elif isinstance(k, str) and k.split("[")[0] in VARIANT_ORDER:
            out.append((0, VARIANT_ORDER.index(k.split("[")[0]), k))
        elif isinstance(k, (int, float)) and k == k:
            out.append((1, float(k), ""))
        else:
            out.append((2, 0.0, str(k)))
    return tuple(out)


def ordered(names: object) -> list[str]:
    """Variants or arms in report order: relu first, the paper's variants, the rest by name, external arms last."""
    return sorted(dict.fromkeys(names), key=lambda v: order_key((v,)))


def frontier_steps(rows: pd.DataFrame, x_min: float) -> tuple[list[float], list[float]]:
    """One SAE's frontier as the vertices of a step line drawn 'pre' (report.md) or 'vh' (report.html): at
    each retain level, the lowest forget accuracy reachable. Empty without rows."""
    p = frontier(rows[["retain_acc", "forget_acc"]].to_numpy(float))[::-1]  # retain ascending
    if not len(p):
        return [], []
    xs, ys = [min(x_min, p[0, 0]), *p[:, 0]], [p[0, 1], *p[:, 1]]
    if xs[-1] < 1.0:
        xs, ys = [*xs, 1.0], [*ys, 1.0]  # nothing reaches higher retain: no removal there
    return [float(x) for x in xs], [float(y) for y in ys]


@dataclass
class ReportInputs:
    """Everything a report draws from one results directory; the verdict is computed once, here."""

    results_dir: Path
    trials: pd.DataFrame
    curves: pd.DataFrame
    grid: pd.DataFrame | None
    questions: pd.DataFrame | None
    controls: dict
    n_boot: int = 1000
    # A diagnostic for the researcher, never a result: the verdict over every completed trial, converged or not.
    exploratory: bool = False
    # The budget check's results directory: the main job's arms, one seed each, at more steps (hsae/budget.py).
    budget_dir: Path | None = None

    @classmethod
    def load(cls, results_dir: str | Path, n_boot: int = 1000, exploratory: bool = False,
             budget_dir: str | Path | None = None) -> ReportInputs:
        root = Path(results_dir)
        budget = None if budget_dir is None else Path(budget_dir)
        if budget is not None and not (budget / "trials.parquet").is_file():
            raise FileNotFoundError(f"--budget-check {budget}: no trials.parquet there (run the main job's space "
                                    "with --steps and --out that directory first; docs/training.md)")
        return cls(root, load_trials(root), load_curves(root), load_grid(root),
                   load_optional(root, "questions.parquet"), load_controls(root), n_boot, exploratory, budget)

    @cached_property
    def done(self) -> pd.DataFrame:
        return self.trials[self.trials["status"] == "completed"]

    @cached_property
    def declarations(self) -> dict[str, dict]:
        """The spaces' declarations the sweeps recorded (reference, trend), by space name."""
        return load_declarations(self.results_dir)

    @cached_property
    def ablations(self) -> dict[str, AblationVerdict | str]:
        """Each declared ablation space's verdict over its ranked trials, or why there is none."""
        out: dict[str, AblationVerdict | str] = {}
        for name, declaration in self.declarations.items():
            rows = self.done[asked_by(self.done, name)] if "space" in self.done else self.done.iloc[:0]
            if not is_ablation(declaration) or rows.empty:
                continue
            out[name] = ablation_of(rows if self.exploratory else converged(rows), self, declaration)
        return out

    @cached_property
    def problems(self) -> list[str]:
        return controls_problems(self.done, self.controls)

    @cached_property
    def main(self) -> pd.DataFrame:
        """The trials the verdict ranks: the converged trials of the main job (exploratory: all its completed ones)."""
        main = main_trials(self.done, self.declarations)
        return main if self.exploratory else converged(main)

    @cached_property
    def headline(self) -> str | None:
        try:
            return declared_headline(self.done)
        except ValueError:
            return None

    @cached_property
    def probes(self) -> list[str]:
        """The second witness's metrics the ranked trials carry values of (none on the tiny profile)."""
        return [m for m in PROBE_METRICS if m in self.main and self.main[m].notna().any()]

    @cached_property
    def verdict(self) -> Verdict | str:
        """The verdict, or why there is none; the probe metrics are secondary metrics of the same test."""
        if self.main.empty and self.ablations:
            return "the spaces run here are ablations, each compared with its own reference in its section below"
        return verdict_of(self.main, self, [*CANDIDATES, *self.probes])  # the headline is left out of secondary

    @cached_property
    def noise(self) -> list[MetricNoise]:
        """The verdict's noise split per tested metric, the headline's first (``hsae.noise``); [] without one."""
        return noise_split(self.verdict) if isinstance(self.verdict, Verdict) else []

    @cached_property
    def frontier_rows(self) -> pd.DataFrame:
        """The sparsity frontier's trials (``frontier_trials``): ranked ones, or all completed when exploratory."""
        return frontier_trials(self.done, self.exploratory)

    @cached_property
    def frontier(self) -> dict[float, Verdict | str]:
        """The verdict within each target L0's trials (the sparsity frontier), or why there is none."""
        rows = self.frontier_rows
        if rows.empty:
            return {}
        secondary = [m for m in PROBE_METRICS[:1] if m in rows and rows[m].notna().any()]
        return {float(t): verdict_of(g, self, secondary) for t, g in rows.groupby("cfg_target_l0", sort=True)}

    @cached_property
    def budget(self) -> pd.DataFrame | str | None:
        """The budget check's table (``hsae.budget.budget_check``) on explained variance and the headline, or why
        there is none; None without a budget directory."""
        if self.budget_dir is None:
            return None
        if self.grid is None or self.headline is None:
            return "the main job has no grid.parquet or no single declared headline"
        other = ReportInputs.load(self.budget_dir, n_boot=1)
        if other.grid is None:
            return f"{self.budget_dir} has no grid.parquet"
        metrics = ["explained_variance", self.headline]
        try:
            main, longer = budget_points(self, metrics), budget_points(other, metrics)
            if main.attrs["bank"] != longer.attrs["bank"]:
                return "the budget run scored another question bank (another profile?): nothing to compare"
            return budget_check(main, longer, metrics)
        except (ValueError, KeyError) as exc:
            return f"not computed: {exc}"


def budget_points(inp: ReportInputs, metrics: list[str]) -> pd.DataFrame:
    """Per trained trial of the main job's space: arm, seed, steps and ``metrics`` (the candidates recomputed
    from the grid, chosen on select questions; others read from the rows); ``attrs["bank"]``: the question bank."""
    rows = main_trials(inp.done, inp.declarations)
    rows = rows[~external_rows(rows) & rows["steps"].notna()]  # an external arm is not trained: no budget to check
    boot, _, bank = scored(rows, inp.grid, inp.questions, n_boot=1)
    from_rows = [m for m in metrics if m not in boot.point]
    recipe = [c for c in rows if c.startswith("cfg_")]
    ids = rows[["trial_id", "seed", "steps", *from_rows, *recipe]].assign(arm=arm_names(rows).to_numpy())
    points = ids.merge(boot.point, left_on="trial_id", right_index=True)
    points.attrs["bank"] = bank
    return points


def verdict_of(trials: pd.DataFrame, inp: ReportInputs, secondary: list[str]) -> Verdict | str:
    """build_verdict on these trials with the inputs' grid and questions, or why there is none."""
    if inp.grid is None:
        return "no grid.parquet in the results"
    if trials.empty:
        return ("no completed trial" if inp.exploratory else
                "no converged, completed trial: nothing is ranked (the convergence rule, docs/training.md)")
    try:
        v = build_verdict(trials, inp.grid, secondary=secondary, questions=inp.questions, n_boot=inp.n_boot)
    except ValueError as exc:
        return f"not computed: {exc}"
    return v if not v.per_trial.empty else "no converged, completed trial has grid rows"


def ablation_of(trials: pd.DataFrame, inp: ReportInputs, declaration: dict) -> AblationVerdict | str:
    """``hsae.ablation.ablation_verdict`` on a space's ranked trials, or why there is none."""
    if inp.grid is None:
        return "no grid.parquet in the results"
    if trials.empty:
        return "no converged, completed trial: nothing is ranked (the convergence rule, docs/training.md)"
    secondary = [m for m in PROBE_METRICS[:1] if m in trials and trials[m].notna().any()]
    try:
        return ablation_verdict(trials, inp.grid, declaration, inp.questions, secondary, inp.n_boot)
    except ValueError as exc:
        return f"not computed: {exc}"


def frontier_trials(done: pd.DataFrame, exploratory: bool = False) -> pd.DataFrame:
    """The ranked trials (exploratory: all completed ones) with a target L0 (the "frontier" space's when it ran),
    when they span > 1 target."""
    rows = done if exploratory else converged(done)
    if "cfg_target_l0" not in rows:
        return rows.iloc[:0]
    rows = rows[rows["cfg_target_l0"].notna()]
    if "space" in rows and asked_by(rows, "frontier").any():
        rows = rows[asked_by(rows, "frontier")]
    return rows if rows["cfg_target_l0"].nunique() > 1 else rows.iloc[:0]


# -- the sparsity frontier's figure (its claims are tune/report_blocks.py's) --------------------------
def frontier_lines(rows: pd.DataFrame) -> pd.Series:
    """The frontier trials' line: their arm with the target (and the k it sets) left out."""
    return arm_names(rows.drop(columns=["cfg_target_l0", "cfg_k"], errors="ignore"))


def frontier_points(inp: ReportInputs) -> pd.DataFrame:
    """Per line, target L0 and metric: mean ± 95% CI half-width over seeds of the metric and of held-out L0.
    The headline comes from the per-target verdict's recomputation (else the trial row)."""
    rows = inp.frontier_rows.assign(line=frontier_lines(inp.frontier_rows))
    headline = inp.headline or "frontier_area"
    recomputed = pd.concat([v.per_trial[["trial_id", headline]] for v in inp.frontier.values()
                            if isinstance(v, Verdict)] or [pd.DataFrame(columns=["trial_id", headline])])
    if headline in rows:
        rows = rows.drop(columns=headline)
    rows = rows.merge(recomputed, on="trial_id", how="left")
    out = []
    for metric in dict.fromkeys(["explained_variance", headline, CE_METRIC, PROBE_PRIMARY]):
        if metric not in rows or rows[metric].isna().all():
            continue
        for (line, target), g in rows.groupby(["line", "cfg_target_l0"], sort=True):
            m, half = mean_ci95(g[metric].dropna().astype(float).tolist())
            l0, l0_half = mean_ci95(g["l0"].dropna().astype(float).tolist()) if "l0" in g else (math.nan, math.nan)
            out.append({"metric": metric, "line": line, "target": float(target), "mean": m, "half": half,
                        "l0": l0, "l0_half": l0_half})
    return pd.DataFrame(out, columns=["metric", "line", "target", "mean", "half", "l0", "l0_half"])
