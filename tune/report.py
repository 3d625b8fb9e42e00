"""``python tune/report.py RESULTS_DIR``: the paper's tables (Markdown) and figures (PNG) from Parquet.

Writes RESULTS_DIR/report/report.md, RESULTS_DIR/report/*.png and RESULTS_DIR/report/report.html (the same
report as one interactive, self-contained page: tune/report_html.py). With several seeds a cell reads
``mean ± half-width of the 95% CI``; n counts the seeds behind it.

The report leads with the verdict (``hsae/verdict.py``, docs/evaluation.md "The verdict"): a banner when
the evaluation's controls are out of range, the forget-vs-retain figure, forget accuracy at matched
retain per variant with intervals over seeds and questions, the paired comparison with relu, and the
settings that select nothing or tie. Results without grid.parquet get the rest of the report only.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from hsae.atomic import atomic_file, atomic_write_text  # noqa: E402
from hsae.pareto import study_fronts, varying_params  # noqa: E402
from hsae.results import load_curves, load_trials  # noqa: E402
from hsae.schema import REPORT_METRICS, label  # noqa: E402
from hsae.spaces import mean_ci95  # noqa: E402
from hsae.variants import PAPER_VARIANTS  # noqa: E402
from hsae.verdict import (  # noqa: E402
    BARS,
    BASELINE,
    NEGATIVE_MAX,
    POSITIVE_MIN,
    Verdict,
    bar_metric,
    build_verdict,
    controls_problems,
    frontier,
    grid_metrics,
    mean_interval,
)

VARIANT_ORDER = ["relu", *PAPER_VARIANTS, "topk", "matryoshka_batchtopk"]


def fmt(values: list[float]) -> str:
    mean, half = mean_ci95(values)
    if mean != mean:
        return "–"
    digits = 4 if abs(mean) < 0.1 else 3
    return f"{mean:.{digits}g}" if half != half else f"{mean:.{digits}g} ± {half:.2g}"


def summary(df: pd.DataFrame, by: list[str], metrics: list[str]) -> str:
    """Markdown table: one line per group of ``by``, mean ± CI of each metric over its seeds."""
    if df.empty:
        return "_no completed trials_\n"
    metrics = [m for m in metrics if m in df and df[m].notna().any()]
    header = by + ["n", "converged"] + [label(m) for m in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    groups = [(key if isinstance(key, tuple) else (key,), g) for key, g in df.groupby(by, dropna=False, sort=False)]
    for key, g in sorted(groups, key=lambda kg: _order_key(kg[0])):
        n_conv = len(converged(g))
        mark = f"{n_conv}/{len(g)}" + ("" if n_conv == len(g) else " †")
        cells = [str(k) for k in key] + [str(len(g)), mark] + [fmt(g[m].dropna().astype(float).tolist())
                                                              for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _order_key(key: tuple) -> tuple:
    out = []
    for k in key:
        if isinstance(k, str) and k in VARIANT_ORDER:
            out.append((0, VARIANT_ORDER.index(k), ""))
        elif isinstance(k, (int, float)) and k == k:
            out.append((1, float(k), ""))
        else:
            out.append((2, 0.0, str(k)))
    return tuple(out)


def describe(row: object) -> str:
    """'variant (status: last line of the error)' for trials that did not complete."""
    error = getattr(row, "error", None)
    reason = f": {error.splitlines()[-1][:120]}" if isinstance(error, str) and error else ""
    return f"{row.variant} ({row.status}{reason})"


def half_widths(stats: list[tuple[float, float]]) -> list[float]:
    """Error-bar half-widths from (mean, CI half-width) pairs; a single seed has none (0)."""
    return [0.0 if half != half else half for _, half in stats]


def _save(fig: plt.Figure, path: Path, rect: tuple[float, float, float, float] = (0, 0, 1, 1)) -> None:
    fig.tight_layout(rect=rect)
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def fig_unlearning(done: pd.DataFrame, controls: dict, path: Path) -> bool:
    df = done[done["variant"].isin(VARIANT_ORDER)]
    if df.empty or df["unlearning_score"].isna().all():
        return False
    variants = [v for v in VARIANT_ORDER if v in set(df["variant"])]
    stats = [mean_ci95(df[df.variant == v]["unlearning_score"].dropna().tolist()) for v in variants]
    rand = [mean_ci95(df[df.variant == v]["random_feature_score"].dropna().tolist()) for v in variants]
    fig, ax = plt.subplots(figsize=(8, 4))
    xs = range(len(variants))
    ax.bar([x - 0.2 for x in xs], [s[0] for s in stats], 0.4, yerr=half_widths(stats),
           label="SAE feature clamp", color="#4C72B0", capsize=3)
    ax.bar([x + 0.2 for x in xs], [s[0] for s in rand], 0.4, yerr=half_widths(rand),
           label="random features (negative control)", color="#BBBBBB", capsize=3)
    if controls.get("positive"):
        ax.axhline(controls["positive"]["score"], color="#C44E52", ls="--", label="positive control (diff. of means)")
    ax.set_xticks(list(xs), variants, rotation=30, ha="right")
    ax.set_ylabel("unlearning score")
    ax.set_title("Unlearning score per variant (paper Fig. 1a)")
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def fig_tradeoff(done: pd.DataFrame, path: Path, retain_bar: float = 0.99) -> bool:
    """Every grid setting as (retain accuracy, forget accuracy removed): why a score is what it is.

    A setting counts towards the score only right of the retain bar; hollow markers are settings
    stopped early once they failed the bar (their retain accuracy is an upper bound)."""
    rows = done.dropna(subset=["unlearning_grid"])
    if rows.empty:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant in [v for v in VARIANT_ORDER if v in set(rows["variant"])]:
        points = [g for grid in rows[rows.variant == variant]["unlearning_grid"] for g in json.loads(grid)]
        exact = [g for g in points if g.get("retain_acc_exact", True)]
        bound = [g for g in points if not g.get("retain_acc_exact", True)]
        sc = ax.scatter([g["retain_acc"] for g in exact], [1 - g["forget_acc"] for g in exact], s=18, label=variant)
        ax.scatter([g["retain_acc"] for g in bound], [1 - g["forget_acc"] for g in bound], s=18,
                   facecolors="none", edgecolors=sc.get_facecolor())
    ax.axvline(retain_bar, color="black", ls=":", lw=1)
    ax.text(retain_bar, ax.get_ylim()[1] * 0.95, f" retain bar {retain_bar}", fontsize=8, va="top")
    ax.set_xlabel("retain accuracy (1.0 = no collateral damage)")
    ax.set_ylabel("forget accuracy removed (1 - forget acc)")
    ax.set_title("Unlearning grid: removal vs collateral damage, every setting")
    ax.legend(fontsize=7)
    _save(fig, path)
    return True


def fig_loss_curves(curves: pd.DataFrame, trials: pd.DataFrame, path: Path) -> bool:
    ids = set(trials["trial_id"])
    c = curves[curves["trial_id"].isin(ids)]
    if c.empty:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for variant in [v for v in VARIANT_ORDER if v in set(c["variant"])]:
        per_step = c[c.variant == variant].groupby("step")["loss"].mean()
        ax.plot(per_step.index, per_step.values, label=variant)
    ax.set_xlabel("step")
    ax.set_ylabel("total loss")
    ax.set_yscale("log")
    ax.set_title("Total loss (reconstruction + sparsity + structure), paper Fig. 1b")
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


# (curve column, panel title) of the mechanism figure: each variant's mechanism seen acting (docs/training.md).
MECHANISM_PANELS = [
    ("val_mse", "held-out MSE (convergence)"),
    ("lr", "learning rate"),
    ("val_inter_group_correlation", "held-out inter-group correlation"),
    ("ortho", "orthogonality term"),
    ("regroup_penalty_ratio", "regroup: cross-group RMS after / before"),
    ("assignment_entropy", "dynamic: assignment entropy / log K1"),
    ("val_nce", "held-out InfoNCE of group codes"),
    ("cross_over_sibling", "hierarchy: cross-parent / sibling RMS"),
]


def fig_mechanisms(curves: pd.DataFrame, trials: pd.DataFrame, path: Path) -> bool:
    """One panel per mechanism curve, one line per variant (mean over seeds at each step)."""
    c = curves[curves["trial_id"].isin(set(trials["trial_id"]))].copy()
    if c.empty:
        return False
    if {"val_cross_parent_rms", "val_sibling_rms"} <= set(c):
        c["cross_over_sibling"] = c["val_cross_parent_rms"] / c["val_sibling_rms"]
    panels = [(m, t) for m, t in MECHANISM_PANELS if m in c and c[m].notna().any()]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for ax, (metric, title) in zip(axes.flat, panels, strict=False):
        for variant in [v for v in VARIANT_ORDER if v in set(c["variant"])]:
            per_step = c[c.variant == variant].groupby("step")[metric].mean().dropna()
            if not per_step.empty:  # one colour per variant in every panel, so the one legend holds
                ax.plot(per_step.index, per_step.values, label=variant, color=f"C{VARIANT_ORDER.index(variant) % 10}")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=f"C{VARIANT_ORDER.index(v) % 10}", label=v)
               for v in VARIANT_ORDER if v in set(c["variant"])]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8)
    fig.suptitle("Mechanisms during training (held-out rows; mean over seeds)")
    _save(fig, path, rect=(0, 0.05, 1, 1))  # room for the figure legend below the panels
    return True


def fig_alpha(df: pd.DataFrame, path: Path) -> bool:
    if df.empty or "cfg_alpha" not in df or df["cfg_alpha"].isna().all():
        return False
    fig, ax = plt.subplots(figsize=(5, 4))
    alphas = sorted(df["cfg_alpha"].dropna().unique())
    stats = [mean_ci95(df[df.cfg_alpha == a]["inter_group_correlation"].dropna().tolist()) for a in alphas]
    ax.errorbar(alphas, [s[0] for s in stats], yerr=half_widths(stats), marker="o",
                capsize=3)
    ax.set_xlabel("α (orthogonality coefficient)")
    ax.set_ylabel("mean inter-group activation correlation")
    ax.set_title("α vs inter-group correlation")
    _save(fig, path)
    return True


def fig_l0_ev(done: pd.DataFrame, path: Path) -> bool:
    if done.empty:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for variant in [v for v in VARIANT_ORDER if v in set(done["variant"])]:
        d = done[done.variant == variant]
        ax.scatter(d["l0"], d["explained_variance"], label=variant, s=20)
    ax.set_xscale("log")
    ax.set_xlabel("L0 (active features per token)")
    ax.set_ylabel("explained variance")
    ax.set_title("Sparsity vs reconstruction, all trials")
    ax.legend(fontsize=7)
    _save(fig, path)
    return True


SECTIONS = [  # (title, space, grouping columns) of the tables, in report order
    ("Six variants (paper table)", "variants", ["variant"]),
    ("Ablation: orthogonality α", "ortho", ["variant", "cfg_alpha"]),
    ("Ablation: number of groups", "groups", ["variant", "cfg_n_groups"]),
    ("Ablation: dynamic vs static assignment", "dynamic", ["variant", "cfg_temperature_init"]),
    ("Ablation: hierarchy weights", "hier", ["cfg_alpha_l1", "cfg_alpha_l2"]),
    ("Ablation: contrastive learning", "contrast", ["cfg_nce_temperature", "cfg_nce_weight"]),
    ("Baselines", "baselines", ["variant", "cfg_k"]),
]


def load_controls(results_dir: Path) -> dict:
    """The evaluation controls (the last controls/*.json by name), or {} when there are none."""
    controls = {}
    for path in sorted((results_dir / "controls").glob("*.json")):
        controls = json.loads(path.read_text())
    return controls


def header_parts(results_dir: Path, trials: pd.DataFrame) -> list[str]:
    counts = ", ".join(f"{k}: {v}" for k, v in trials["status"].value_counts().items())
    return ["# hsae ablation report\n", f"Results: `{results_dir}` — {len(trials)} trials ({counts}).\n"]


def controls_parts(controls: dict) -> list[str]:
    """The 'Evaluation controls' section: both control scores and whether they are in range."""
    if not controls:
        return []
    pos, neg = controls["positive"]["score"], controls["negative"]["score"]
    ok = pos >= POSITIVE_MIN and neg <= NEGATIVE_MAX
    return ["## Evaluation controls\n",
            f"Positive control (difference-of-means removal): **{pos:.3f}**; negative control (random "
            f"direction): **{neg:.3f}**; bank {controls['positive']['n_forget']} forget / "
            f"{controls['positive']['n_retain']} retain questions. "
            + ("The evaluation can detect removal.\n" if ok else
               "**The controls are out of range: unlearning scores below cannot be trusted.**\n")]


def section_parts(trials: pd.DataFrame, done: pd.DataFrame) -> list[str]:
    """One table per space in ``SECTIONS`` that has completed trials, then a line on its other trials."""
    parts = []
    for title, space, by in SECTIONS:
        df = done[done["space"] == space]
        if df.empty:
            continue
        by = [b for b in by if b in df and (b == "variant" or df[b].notna().any())]
        parts.append(f"## {title}\n")
        parts.append(summary(df, by, list(REPORT_METRICS)))
        stopped = trials[(trials["space"] == space) & (trials["status"] != "completed")]
        if not stopped.empty:
            parts.append(f"\n{len(stopped)} other trial(s): " + ", ".join(describe(r) for r in stopped.itertuples()))
        parts.append("")
    return parts


def write_figures(done: pd.DataFrame, curves: pd.DataFrame, controls: dict, out: Path) -> list[tuple[str, str]]:
    """Draw every figure the data allows into ``out``; (caption, file name) of each one drawn."""
    figures = []
    main = main_trials(done)
    if fig_unlearning(main, controls, out / "fig1a_unlearning.png"):
        figures.append(("Unlearning score per variant", "fig1a_unlearning.png"))
    if fig_tradeoff(main, out / "unlearning_tradeoff.png"):
        figures.append(("Removal vs collateral damage per grid setting", "unlearning_tradeoff.png"))
    if fig_loss_curves(curves, main, out / "fig1b_loss_curves.png"):
        figures.append(("Total loss curves", "fig1b_loss_curves.png"))
    if fig_mechanisms(curves, main, out / "mechanisms.png"):
        figures.append(("Mechanisms during training", "mechanisms.png"))
    if fig_alpha(done[done["space"] == "ortho"], out / "alpha_vs_correlation.png"):
        figures.append(("α vs inter-group correlation", "alpha_vs_correlation.png"))
    if fig_l0_ev(done, out / "l0_vs_ev.png"):
        figures.append(("L0 vs explained variance", "l0_vs_ev.png"))
    return figures


def fig_pareto(rows: pd.DataFrame, objectives: list[tuple[str, str]], path: Path) -> None:
    """The first two objectives of a study: every converged trial, the front joined in order."""
    (x, dx), (y, dy) = objectives[:2]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.scatter(rows[x], rows[y], c="0.7", s=18, label="converged trials")
    front = rows[rows["on_front"]].sort_values(x)
    ax.plot(front[x], front[y], "o-", c="C3", ms=6, label="Pareto front")
    ax.set_xlabel(f"{x} ({'lower' if dx == 'min' else 'higher'} is better)")
    ax.set_ylabel(f"{y} ({'lower' if dy == 'min' else 'higher'} is better)")
    ax.legend(fontsize=8)
    _save(fig, path)


def pareto_parts(trials: pd.DataFrame, out: Path) -> list[str]:
    """Each multi-objective Optuna study's Pareto front: a figure (first two objectives) and its rows."""
    parts = []
    for i, (study, objectives, rows) in enumerate(study_fronts(trials)):
        names = [m for m, _ in objectives]
        sampled = varying_params(rows)
        png = f"pareto_{i}.png"
        fig_pareto(rows, objectives, out / png)
        front = rows[rows["on_front"]].sort_values(names[0])
        parts += [f"## Pareto front: Optuna study {study}\n",
                  f"Optuna study over {', '.join(f'{m} ({d})' for m, d in objectives)}: {len(front)} of "
                  f"{len(rows)} converged trials are on the front (no other trial is as good on every "
                  f"objective and better on one; docs/sweeps.md, \"Optuna\").\n", f"![Pareto front]({png})\n",
                  "| trial | variant | seed | " + " | ".join(sampled + names) + " |",
                  "|---|---|---|" + "---|" * len(sampled + names)]
        parts += [f"| {r['trial_id']} | {r['variant']} | {r['seed']} | "
                  + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in sampled + names) + " |"
                  for _, r in front.iterrows()]
        parts.append("")
    return parts


def figure_parts(figures: list[tuple[str, str]]) -> list[str]:
    if not figures:
        return []
    return ["## Figures\n", *(f"![{title}]({name})\n" for title, name in figures)]


# -- the verdict (hsae/verdict.py): what the report leads with ------------------------------------
METRIC_LABELS = {
    **{bar_metric(b): f"forget acc at retain ≥ {b}" for b in BARS},
    "frontier_area": "frontier area (retain 0.9–1)",
    "unlearning_score": "SAEBench unlearning score",
}
BANNER = "The evaluation cannot detect removal on this model: no score below is a result."


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


def converged(df: pd.DataFrame) -> pd.DataFrame:
    """The rows whose SAE converged (docs/training.md); rows from before the rule count as unconverged."""
    if "converged" not in df:
        return df.iloc[:0]
    return df[df["converged"].fillna(False).astype(bool)]


def convergence_parts(done: pd.DataFrame) -> list[str]:
    """Per variant of the main job: how many seeds converged, the held-out MSE change over the last 20% of
    steps, the unique training tokens and dead fraction; then the unconverged trials by name."""
    main = main_trials(done)
    if main.empty:
        return []
    parts = ["## Convergence (trained means converged: |Δ held-out MSE| < 2% over the last 20% of steps)\n",
             "| variant | converged | Δ held-out MSE, last 20% | unique train tokens | dead |", "|---|---|---|---|---|"]
    for variant in ordered(main["variant"]):
        g = main[main["variant"] == variant]
        change = g["val_mse_rel_change"].dropna().astype(float) if "val_mse_rel_change" in g else pd.Series([])
        tokens = g["unique_train_tokens"].dropna() if "unique_train_tokens" in g else pd.Series([])
        parts.append(f"| {variant} | {len(converged(g))}/{len(g)} | "
                     + (f"{change.min():+.2%} … {change.max():+.2%}" if len(change) else "–") + " | "
                     + (f"{int(tokens.min()):,}" if len(tokens) else "–") + f" | {fmt(g['dead_fraction'].tolist())} |")
    missing = main[~main["trial_id"].isin(converged(main)["trial_id"])]
    if not missing.empty:
        parts.append("\n**Unconverged, marked † and never ranked:** "
                     + ", ".join(f"{r.variant} seed {r.seed}" for r in missing.itertuples()) + ".")
    return parts + [""]


def main_trials(done: pd.DataFrame) -> pd.DataFrame:
    """The main job: the completed trials of the "variants" space if there are any, else all completed."""
    return done[done["space"] == "variants"] if (done["space"] == "variants").any() else done


def ordered(variants: object) -> list[str]:
    return sorted(dict.fromkeys(variants), key=lambda v: _order_key((v,)))


def banner_parts(problems: list[str]) -> list[str]:
    if not problems:
        return []
    return [f"**{BANNER}** " + "; ".join(problems) + ". The numbers below are diagnostics only.\n"]


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


def _frontier_line(ax: plt.Axes, rows: pd.DataFrame, x_min: float, label: str | None) -> None:
    xs, ys = frontier_steps(rows, x_min)
    if xs:
        ax.step(xs, ys, where="pre", color="C0", lw=1.3, label=label)


def _panel(ax: plt.Axes, grid: pd.DataFrame, trial_ids: list[str], x_min: float) -> None:
    sae = grid[(grid["control"] == "sae") & grid["trial_id"].isin(trial_ids)]
    rnd = grid[(grid["control"] == "random") & grid["trial_id"].isin(trial_ids)]
    pos = grid[grid["control"] == "positive"]
    ax.scatter(sae["retain_acc"], sae["forget_acc"], s=10, alpha=0.25, color="C0", label="SAE settings")
    for i, (_, rows) in enumerate(sae.groupby("trial_id", sort=False)):
        _frontier_line(ax, rows, x_min, "frontier (one line per seed)" if i == 0 else None)
    ax.scatter(rnd["retain_acc"], rnd["forget_acc"], s=14, marker="x", color="0.5", alpha=0.7,
               label="random features (negative control)")
    ax.scatter(pos["retain_acc"], pos["forget_acc"], s=22, marker="^", color="C3",
               label="positive control (diff. of means)")
    for bar in BARS:
        ax.axvline(bar, color="black", ls=":", lw=0.8)
    hidden = int((pd.concat([sae, rnd, pos])["retain_acc"] < x_min).sum())
    if hidden:
        ax.text(x_min + 0.003, 0.02, f"{hidden} point(s) at retain < {x_min} not shown", fontsize=7)
    ax.set_xlim(x_min, 1.005)
    ax.set_ylim(-0.02, 1.02)


def fig_forget_vs_retain(grid: pd.DataFrame, per_trial: pd.DataFrame, path: Path, x_min: float = 0.8) -> bool:
    """One panel per variant: its grid points (faint), its frontier per seed, the random-feature and
    positive controls, and the retain bars (dotted). x = retain accuracy, y = forget accuracy."""
    variants = ordered(per_trial["variant"])
    if not variants:
        return False
    ncols = min(3, len(variants))
    nrows = math.ceil(len(variants) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.3 * ncols, 3.6 * nrows), sharex=True, sharey=True,
                             squeeze=False)
    for ax, variant in zip(axes.flat, variants, strict=False):
        ids = list(per_trial.loc[per_trial["variant"] == variant, "trial_id"])
        _panel(ax, grid, ids, x_min)
        ax.set_title(f"{variant} ({len(ids)} seed{'s' if len(ids) != 1 else ''})", fontsize=9)
    for ax in axes.flat[len(variants):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=6, loc="upper left")
    fig.supxlabel(f"retain accuracy (dotted: retain bars {', '.join(str(b) for b in BARS)})")
    fig.supylabel("forget accuracy (lower = more removed)")
    _save(fig, path)
    return True


def _interval(lo: float, hi: float, signed: bool = False) -> str:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "[–]"
    return f"[{lo:+.3g}, {hi:+.3g}]" if signed else f"[{lo:.3g}, {hi:.3g}]"


def _metric_cell(v: Verdict, ids: list[str], metric: str) -> str:
    """mean ± 95% CI over seeds, then the question-bootstrap interval of that mean in brackets."""
    values = v.per_trial.loc[v.per_trial["trial_id"].isin(ids), metric].dropna().astype(float).tolist()
    return f"{fmt(values)} {_interval(*mean_interval(v.boot, ids, metric))}"


def _random_area(grid: pd.DataFrame, ids: list[str]) -> str:
    rnd = grid[(grid["control"] == "random") & grid["trial_id"].isin(ids)]
    return fmt([grid_metrics(rows)["frontier_area"] for _, rows in rnd.groupby("trial_id")])


def matched_table(v: Verdict, main: pd.DataFrame, grid: pd.DataFrame, claims: bool) -> str:
    """One line per variant: matched-retain forget accuracies, frontier area, the SAEBench score and (with
    ``claims``) the paired difference with relu on the headline metric and its verdict."""
    metrics = [*(bar_metric(b) for b in BARS), "frontier_area"]
    header = ["variant", "n", *(METRIC_LABELS[m] for m in metrics), "random-feature frontier area",
              "SAEBench unlearning"]
    by_variant = {c.variant: c for c in v.comparisons}
    if claims and v.headline:
        header += [f"Δ vs {BASELINE} ({METRIC_LABELS[v.headline]}) [95% CI]", "verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant in ordered(v.per_trial["variant"]):
        ids = list(v.per_trial.loc[v.per_trial["variant"] == variant, "trial_id"])
        score = main.loc[main["trial_id"].isin(ids), "unlearning_score"].dropna().astype(float).tolist()
        cells = [variant, str(len(ids)), *(_metric_cell(v, ids, m) for m in metrics), _random_area(grid, ids),
                 fmt(score)]
        if claims and v.headline:
            c = by_variant.get(variant)
            cells += (["reference", "—"] if variant == BASELINE or c is None else
                      [f"{c.diff:+.3g} {_interval(c.lo, c.hi, True)} (n={c.n})", c.verdict])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def stability_table(v: Verdict) -> str:
    lines = ["| candidate | defined for every trial | seed-to-seed s.d. | between-variant s.d. | ratio |",
             "|---|---|---|---|---|"]
    for metric, s in v.stability.iterrows():
        lines.append(f"| {METRIC_LABELS[metric]} | {'yes' if s.defined else 'no'} | {s.within_sd:.3g} | "
                     f"{s.between_sd:.3g} | {s.ratio:.3g} |")
    return "\n".join(lines) + "\n"


def _seeds(n: float) -> str:
    return "—" if n != n else ("> 100" if n == math.inf else str(int(n)))


def power_lines(v: Verdict) -> list[str]:
    """The smallest difference the main job can detect, and the seeds the observed differences need."""
    if math.isfinite(v.mdd):
        out = [f"With n = {v.n_seeds} seeds, the smallest paired difference the main job can detect (two-sided "
               f"α = 0.05, power 0.8) is **{v.mdd:.3g}** (pooled s.d. of per-seed differences {v.sd_diff:.3g})."]
    else:
        out = [f"With n = {v.n_seeds} seed(s) the smallest detectable difference cannot be estimated: it needs "
               f"≥ 2 seeds paired with {BASELINE}."]
    if v.needed:
        need = ", ".join(f"{k}: {_seeds(n)}" for k, n in v.needed.items())
        out.append(f"Seeds needed to detect each observed difference (same test): {need}.")
    return out


def claim_lines(v: Verdict) -> list[str]:
    if not v.comparisons:
        return [f"No completed {BASELINE} trial with grid rows: no paired comparison."]
    out = []
    for word in ("better", "worse"):
        names = [c.variant for c in v.comparisons if c.verdict.startswith(word)]
        if names:
            out.append(f"{word.capitalize()} than {BASELINE} on {METRIC_LABELS[v.headline]}: {', '.join(names)}.")
    if v.inseparable():
        out.append(f"**The data cannot separate {', '.join(v.inseparable())} from {BASELINE}** "
                   f"(paired interval contains 0).")
    return out


def headline_parts(v: Verdict) -> list[str]:
    if v.headline is None:
        return [f"No headline metric: {v.reason}.\n"]
    parts = [f"**Headline metric: {METRIC_LABELS[v.headline]}** — {v.reason}.\n", stability_table(v)]
    return parts + [" ".join(power_lines(v)) + "\n", " ".join(claim_lines(v)) + "\n"]


def counts_table(v: Verdict) -> str:
    """Per variant and grid: settings selecting no feature and settings tying another (mean per trial)."""
    c = v.counts.merge(v.per_trial[["trial_id", "variant"]], on="trial_id")
    grids = [g for g in ("saebench", "extended") if g in set(c["grid"])]
    header = ["variant", *(f"{g}: {k} / settings" for g in grids for k in ("selecting none", "tied"))]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant in ordered(c["variant"]):
        cells = [variant]
        for g in grids:
            rows = c[(c["variant"] == variant) & (c["grid"] == g)]
            n = f" / {rows['settings'].mean():.3g}" if len(rows) else ""
            cells += [f"{rows[k].astype(float).mean():.3g}{n}" if len(rows) else "–"
                      for k in ("selecting_none", "tied")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _upper_bounds(v: Verdict, grid: pd.DataFrame) -> str:
    """A note when some settings' retain accuracy is only an upper bound (retain questions were skipped)."""
    if "retain_acc_exact" not in grid:
        return ""
    rows = grid[(grid["control"] == "sae") & grid["trial_id"].isin(v.per_trial["trial_id"])]
    inexact = int(rows["retain_acc_exact"].astype("boolean").eq(False).fillna(False).sum())
    return (f" **{inexact} setting(s) have retain accuracy as an upper bound (retain questions skipped): their "
            f"matched-retain values are optimistic.**" if inexact else "")


def bank_line(v: Verdict, questions: pd.DataFrame | None, grid: pd.DataFrame) -> str:
    line = (f"Cells: mean ± 95% CI over seeds; in brackets the 95% interval of that mean over "
            f"{next(iter(v.boot.samples.values())).shape[1]} bootstrap resamples of the {v.boot.n_forget} forget "
            f"and {v.boot.n_retain} retain questions. Lower forget accuracy = more removed.") + _upper_bounds(v, grid)
    if questions is not None and v.bank is not None and "bank" in questions:
        questions = questions[questions["bank"].astype(str) == v.bank]
    if questions is not None and "domain" in questions:
        n = questions["domain"].value_counts()
        if (n.get("forget", 0), n.get("retain", 0)) != (v.boot.n_forget, v.boot.n_retain):
            line += (f" **questions.parquet holds {n.get('forget', 0)} forget / {n.get('retain', 0)} retain "
                     f"questions, the grid's outcomes another count.**")
    excluded = [f"{t} ({why})" for t, why in v.excluded.items()]
    if excluded:
        line += " Not in the verdict: " + ", ".join(excluded) + "."
    return line + "".join(f" **Mismatch: {m}.**" for m in v.mismatches) + "\n"


def verdict_parts(main: pd.DataFrame, grid: pd.DataFrame | None, questions: pd.DataFrame | None,
                  problems: list[str], out: Path, n_boot: int = 1000) -> list[str]:
    """The figure, the matched-retain table (a verdict only when the controls are in range), the headline
    metric with its power, and the settings that select nothing or tie. Nothing without grid.parquet."""
    if grid is None:
        return []
    try:
        v = build_verdict(main, grid, n_boot=n_boot)
    except ValueError as exc:
        return [f"_Verdict not computed: {exc}._\n"]
    if v.per_trial.empty:
        return ["_No completed trial has grid rows: no verdict._\n"]
    parts = []
    if fig_forget_vs_retain(grid, v.per_trial, out / "forget_vs_retain.png"):
        parts += ["![Forget vs retain accuracy per variant](forget_vs_retain.png)\n",
                  "_Forget vs retain accuracy, every grid setting (faint), the frontier of each seed (line), random-"
                  "feature control (×) and positive control (▲); dotted: retain bars._\n"]
    return parts + verdict_text(v, main, grid, questions, problems)


def verdict_text(v: Verdict, main: pd.DataFrame, grid: pd.DataFrame, questions: pd.DataFrame | None,
                 problems: list[str]) -> list[str]:
    """The verdict's Markdown after its figure (report.md and report.html both show it): the matched-retain
    table, a verdict only when the controls are in range, the headline metric, the no-feature/tie counts."""
    claims = not problems
    parts = ["## Verdict: forget accuracy at matched retain\n" if claims else
             "## Diagnostics (controls out of range — not results): forget accuracy at matched retain\n"]
    parts += [matched_table(v, main, grid, claims), bank_line(v, questions, grid)]
    if claims:
        parts += headline_parts(v)
    return parts + ["### Settings that select no feature / tie another\n", counts_table(v)]


def build_report(results_dir: str | Path, out_dir: str | Path | None = None, n_boot: int = 1000) -> Path:
    results_dir = Path(results_dir)
    out = Path(out_dir) if out_dir else results_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    trials = load_trials(results_dir)
    curves = load_curves(results_dir)
    done = trials[trials["status"] == "completed"]
    controls = load_controls(results_dir)
    problems = controls_problems(done, controls)
    grid, questions = load_grid(results_dir), load_optional(results_dir, "questions.parquet")
    parts = header_parts(results_dir, trials) + banner_parts(problems)
    parts += verdict_parts(converged(main_trials(done)), grid, questions, problems, out, n_boot)
    parts += convergence_parts(done) + controls_parts(controls) + section_parts(trials, done)
    parts += figure_parts(write_figures(done, curves, controls, out)) + pareto_parts(trials, out)
    report = out / "report.md"
    atomic_write_text(report, "\n".join(parts))
    from tune.report_html import write_html  # here, not at the top: report_html imports this module

    write_html(results_dir, out, n_boot)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hsae-report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results_dir")
    ap.add_argument("--out", default=None, help="report directory (default RESULTS_DIR/report)")
    args = ap.parse_args(argv)
    try:
        path = build_report(args.results_dir, args.out)
    except FileNotFoundError as exc:
        print(f"hsae-report: error: {exc}", file=sys.stderr)
        return 2
    print(path.read_text())
    print(f"[hsae] report written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
