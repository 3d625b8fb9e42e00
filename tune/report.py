"""``python tune/report.py RESULTS_DIR``: the paper's tables (Markdown) and figures (PNG) from Parquet.

Writes RESULTS_DIR/report/report.md, RESULTS_DIR/report/*.png and RESULTS_DIR/report/report.html (the same
report as one interactive, self-contained page: tune/report_html.py). With several seeds a cell reads
``mean ± half-width of the 95% CI``; n counts the seeds behind it.

The report leads with the verdict (``hsae/verdict.py``, docs/evaluation.md "The verdict"), computed once in
``tune/report_data.py``, worded as the blocks of ``tune/report_blocks.py`` and rendered here as Markdown and in
``tune/report_html.py`` as HTML: a banner when the evaluation's controls are out of range, the forget-vs-retain
figure, forget accuracy at matched retain per arm with intervals over seeds and questions, the block-design test
against relu on the declared headline metric (and the secondary metrics), its power, and the settings that select
nothing or tie; then the second witness (k-sparse probing) with one agreement line per arm, where each difference's
noise comes from (question sampling or seed to seed, ``hsae/noise.py``), the sparsity frontier when the trials span
several target L0s, and convergence and health per arm (docs/evaluation.md, "Report sections"). External arms
are ranked and drawn after the trained ones. Results without grid.parquet get the rest of the report only.
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
import matplotlib.ticker  # noqa: E402
import pandas as pd  # noqa: E402

from hsae.ablation import AblationVerdict, arm_summary, level_order  # noqa: E402
from hsae.atomic import atomic_file, atomic_write_text  # noqa: E402
from hsae.pareto import study_fronts, varying_params  # noqa: E402
from hsae.results import asked_by  # noqa: E402
from hsae.schema import REPORT_METRICS, label  # noqa: E402
from hsae.scoring import BARS  # noqa: E402
from hsae.stats import mean_ci95  # noqa: E402
from hsae.verdict import BASELINE, arm_names  # noqa: E402
from tune.report_analyses import ablation_section, budget_blocks, frontier_blocks, noise_blocks  # noqa: E402
from tune.report_blocks import (  # noqa: E402
    Block,
    Heading,
    Paragraph,
    Table,
    banner_blocks,
    controls_blocks,
    fmt,
    header_blocks,
    metric_label,
    probe_blocks,
    verdict_blocks,
)
from tune.report_data import (  # noqa: E402
    ReportInputs,
    converged,
    external_rows,
    frontier_points,
    frontier_steps,
    main_trials,
    order_key,
    ordered,
    report_variants,
    variant_index,
)
from tune.report_html import write_html  # noqa: E402


def summary(df: pd.DataFrame, by: list[str], metrics: list[str]) -> str:
    """Markdown table: one line per group of ``by``, mean ± CI of each metric over its seeds."""
    if df.empty:
        return "_no completed trials_\n"
    metrics = [m for m in metrics if m in df and df[m].notna().any()]
    header = by + ["n", "converged"] + [label(m) for m in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    groups = [(key if isinstance(key, tuple) else (key,), g) for key, g in df.groupby(by, dropna=False, sort=False)]
    for key, g in sorted(groups, key=lambda kg: order_key(kg[0])):
        n_conv = len(converged(g))
        mark = f"{n_conv}/{len(g)}" + ("" if n_conv == len(g) else " †")
        cells = [str(k) for k in key] + [str(len(g)), mark] + [fmt(g[m].dropna().astype(float).tolist())
                                                              for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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
    variants = report_variants(done["variant"])
    df = done[done["variant"].isin(variants)]
    if df.empty or df["unlearning_score"].isna().all():
        return False
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
    for variant in report_variants(rows["variant"]):
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
    for variant in report_variants(c["variant"]):
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
        for variant in report_variants(c["variant"]):
            per_step = c[c.variant == variant].groupby("step")[metric].mean().dropna()
            if not per_step.empty:  # one colour per variant in every panel, so the one legend holds
                ax.plot(per_step.index, per_step.values, label=variant, color=f"C{variant_index(variant) % 10}")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=f"C{variant_index(v) % 10}", label=v) for v in report_variants(c["variant"])]
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
    for variant in report_variants(done["variant"]):
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
    ("Baselines", "baselines", ["variant"]),
]


def section_parts(trials: pd.DataFrame, done: pd.DataFrame) -> list[str]:
    """One table per space in ``SECTIONS`` that has completed trials, then a line on its other trials."""
    parts = []
    for title, space, by in SECTIONS:
        df = done[asked_by(done, space)]
        if df.empty:
            continue
        by = [b for b in by if b in df and (b == "variant" or df[b].notna().any())]
        parts.append(f"## {title}\n")
        parts.append(summary(df, by, list(REPORT_METRICS)))
        stopped = trials[asked_by(trials, space) & (trials["status"] != "completed")]
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
    if fig_alpha(done[asked_by(done, "ortho")], out / "alpha_vs_correlation.png"):
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


def _span(values: pd.Series, form: str) -> str:
    """'min … max' of the values in ``form`` ('–' without any)."""
    v = values.dropna().astype(float)
    if not len(v):
        return "–"
    lo, hi = form.format(v.min()), form.format(v.max())
    return lo if lo == hi else f"{lo} … {hi}"


def health_cells(g: pd.DataFrame) -> list[str]:
    """An arm's convergence and health: seeds converged, the MSE changes, tokens, steps trained (and how many seeds
    the rule extended), target and held-out L0, the seeds within ±5% of the target, dead fraction and revived
    latents (external arms: no training)."""
    def col(name: str) -> pd.Series:
        return g[name] if name in g else pd.Series([], dtype=float)

    external = bool(external_rows(g).all())
    met = col("l0_target_met").dropna()
    extended = int((col("extensions").fillna(0) > 0).sum())
    return ["– (external: no training)" if external else f"{len(converged(g))}/{len(g)}",
            _span(col("val_mse_rel_change"), "{:+.2%}"), _span(col("plateau_rel_change"), "{:+.2%}"),
            _span(col("plateau_multiplier_change"), "{:+.2%}"), _span(col("unique_train_tokens"), "{:,.0f}"),
            _span(col("steps"), "{:,.0f}") + (f" ({extended} extended)" if extended else ""),
            _span(col("cfg_target_l0"), "{:g}"),
            fmt(col("l0").tolist()), f"{int(met.astype(bool).sum())}/{len(met)}" if len(met) else "–",
            fmt(col("dead_fraction").tolist()), _span(col("revived_latents"), "{:,.0f}")]


def convergence_parts(done: pd.DataFrame) -> list[str]:
    """Per arm of the main job: how many seeds converged, the held-out MSE change over the last 20% of steps
    and over the constant-rate plateau (and the L0 controller's coefficient there), the unique training tokens,
    the steps trained (extensions: docs/training.md), the target and held-out L0 (seeds within ±5%), dead fraction
    and revived latents; then the unconverged trials by name."""
    main = main_trials(done)
    if main.empty:
        return []
    main = main.assign(arm=arm_names(main).to_numpy())
    header = ["arm", "converged", "Δ held-out MSE, last 20%", "Δ held-out MSE, plateau", "Δ L0 multiplier, plateau",
              "unique train tokens", "steps trained",
              "target L0", "held-out L0", "within ±5% of target", "dead", "revived latents"]
    parts = ["## Convergence and health (trained means converged: docs/training.md)\n",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm in ordered(main["arm"]):
        parts.append("| " + " | ".join([arm, *health_cells(main[main["arm"] == arm])]) + " |")
    missing = main[~main["trial_id"].isin(converged(main)["trial_id"])]
    if not missing.empty:
        parts.append("\n**Unconverged, marked † and never ranked:** "
                     + ", ".join(f"{r.arm} seed {r.seed}" for r in missing.itertuples()) + ".")
    return parts + [""]


def fig_frontier(points: pd.DataFrame, path: Path) -> bool:
    """SAEBench's form: one panel per metric against held-out L0, a line per arm, mean ± 95% CI over seeds."""
    metrics = list(dict.fromkeys(points["metric"]))
    if not metrics:
        return False
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.8), squeeze=False)
    lines = ordered(points["line"])
    for ax, metric in zip(axes.flat, metrics, strict=True):
        for line in lines:
            d = points[(points["metric"] == metric) & (points["line"] == line)].sort_values("target")
            ax.errorbar(d["l0"], d["mean"], xerr=d["l0_half"].fillna(0), yerr=d["half"].fillna(0), marker="o",
                        ms=4, capsize=2, label=line, color=f"C{variant_index(line.split('[')[0]) % 10}")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("held-out L0")
        ax.set_title(metric_label(metric), fontsize=9)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Sparsity frontier: each metric against held-out L0 (mean ± 95% CI over seeds)")
    _save(fig, path)
    return True


def frontier_parts(inp: ReportInputs, out: Path) -> list[str]:
    """The sparsity frontier's heading and text, its figure, then the verdict at each target L0."""
    blocks = frontier_blocks(inp)
    if not blocks:
        return []
    figure = (["![Sparsity frontier](sparsity_frontier.png)\n"]
              if fig_frontier(frontier_points(inp), out / "sparsity_frontier.png") else [])
    return markdown(blocks[:2]) + figure + markdown(blocks[2:])


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
    """One panel per arm: its grid points (faint), its frontier per seed, the random-feature and
    positive controls, and the retain bars (dotted). x = retain accuracy, y = forget accuracy."""
    arms = ordered(per_trial["arm"])
    if not arms:
        return False
    ncols = min(3, len(arms))
    nrows = math.ceil(len(arms) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.3 * ncols, 3.6 * nrows), sharex=True, sharey=True,
                             squeeze=False)
    for ax, arm in zip(axes.flat, arms, strict=False):
        ids = list(per_trial.loc[per_trial["arm"] == arm, "trial_id"])
        _panel(ax, grid, ids, x_min)
        ax.set_title(f"{arm} ({len(ids)} seed{'s' if len(ids) != 1 else ''})", fontsize=9)
    for ax in axes.flat[len(arms):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=6, loc="upper left")
    fig.supxlabel(f"retain accuracy (dotted: retain bars {', '.join(str(b) for b in BARS)})")
    fig.supylabel("forget accuracy (lower = more removed)")
    _save(fig, path)
    return True


# -- blocks (tune/report_blocks.py) as Markdown ---------------------------------------------------------
MARKS = {"": "{}", "strong": "**{}**", "code": "`{}`", "em": "_{}_"}


def fig_ablation(av: AblationVerdict, path: Path) -> bool:
    """The headline per arm with its 95% seed interval: along each trend's levels (one panel each), else one
    point per arm; relu's mean and interval as a band, the reference marked."""
    summary = arm_summary(av.verdict.per_trial, av.headline)
    panels = [(t.parameter, level_order(t.levels), [t.levels[a] for a in level_order(t.levels)]) for t in av.trends]
    if not panels:
        arms = [a for a in summary if a != BASELINE]
        panels = [("arm", arms, list(range(len(arms))))]
    if not any(arms for _, arms, _ in panels):
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (name, arms, xs) in zip(axes[0], panels, strict=True):
        means = [summary[a][0] for a in arms]
        halves = [0.0 if not math.isfinite(summary[a][1]) else summary[a][1] for a in arms]
        ax.errorbar(xs, means, yerr=halves, marker="o", capsize=3, label="arm (95% seed CI)")
        if av.reference in arms:
            i = arms.index(av.reference)
            ax.scatter([xs[i]], [means[i]], s=90, facecolors="none", edgecolors="k",
                       label=f"{av.reference} (reference)")
        if BASELINE in summary:
            mean, half, _ = summary[BASELINE]
            ax.axhline(mean, color="grey", linestyle="--", label=f"{BASELINE} (95% seed CI shaded)")
            if math.isfinite(half):
                ax.axhspan(mean - half, mean + half, color="grey", alpha=0.15)
        if name == "arm":
            ax.set_xticks(xs, arms, rotation=30, ha="right", fontsize=7)
        ax.set_xlabel(name)
        ax.set_ylabel(metric_label(av.headline))
        ax.legend(fontsize=7)
    fig.suptitle(f"Ablation {av.space}: headline per arm")
    _save(fig, path)
    return True


def ablation_parts(inp: ReportInputs, out: Path) -> list[str]:
    """Each ablation section's blocks, its figure after its heading and description."""
    parts = []
    for name, av in inp.ablations.items():
        blocks = ablation_section(name, inp.declarations[name], av)
        head = 2 if inp.declarations[name].get("description") else 1  # the heading and the description first
        parts += markdown(blocks[:head])
        if not isinstance(av, str) and fig_ablation(av, out / f"ablation_{name}.png"):
            parts.append(f"![Headline per arm, ablation {name}](ablation_{name}.png)\n")
        parts += markdown(blocks[head:])
    return parts


def markdown(blocks: list[Block]) -> list[str]:
    """Format-free blocks as report.md's parts: headings, paragraphs, pipe tables."""
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"{'#' * block.level} {block.text}\n")
        elif isinstance(block, Paragraph):
            parts.append("".join(MARKS[style].format(text) for style, text in block.spans) + "\n")
        elif isinstance(block, Table):
            lines = ["| " + " | ".join(block.header) + " |", "|" + "---|" * len(block.header)]
            lines += ["| " + " | ".join(row) + " |" for row in block.rows]
            parts.append("\n".join(lines) + "\n")
    return parts


def verdict_parts(inp: ReportInputs, out: Path) -> list[str]:
    """The figure, then the verdict's blocks; nothing without grid.parquet, a line when it cannot be computed."""
    v = inp.verdict
    if inp.grid is None:
        return []
    if isinstance(v, str):
        return [f"_Verdict {v}._\n" if v.startswith("not computed") else f"_No verdict: {v}._\n"]
    parts = []
    if fig_forget_vs_retain(inp.grid, v.per_trial, out / "forget_vs_retain.png"):
        parts += ["![Forget vs retain accuracy per arm](forget_vs_retain.png)\n",
                  "_Forget vs retain accuracy, every grid setting (faint), the frontier of each seed (line), random-"
                  "feature control (×) and positive control (▲); dotted: retain bars._\n"]
    return parts + markdown(verdict_blocks(v, inp.main, inp.grid, inp.questions, inp.problems))


def build_report(results_dir: str | Path, out_dir: str | Path | None = None, n_boot: int = 1000,
                 exploratory: bool = False, budget_dir: str | Path | None = None) -> Path:
    """report.md, its figures and report.html, from one ``ReportInputs`` (the verdict computed once); with
    ``budget_dir``, the budget check's section and budget_check.csv."""
    inp = ReportInputs.load(results_dir, n_boot, exploratory, budget_dir)
    out = Path(out_dir) if out_dir else inp.results_dir / ("report-exploratory" if exploratory else "report")
    out.mkdir(parents=True, exist_ok=True)
    done, trials = inp.done, inp.trials
    parts = markdown(header_blocks(inp) + banner_blocks(inp.problems)) + verdict_parts(inp, out)
    parts += markdown(probe_blocks(inp) + noise_blocks(inp)) + frontier_parts(inp, out) + convergence_parts(done)
    parts += markdown(budget_blocks(inp))
    if isinstance(inp.budget, pd.DataFrame):
        with atomic_file(out / "budget_check.csv") as tmp:
            inp.budget.to_csv(tmp, index=False)
    else:  # no table this time: an earlier report's must not stand beside this one
        (out / "budget_check.csv").unlink(missing_ok=True)
    parts += ablation_parts(inp, out)
    parts += markdown(controls_blocks(inp.controls)) + section_parts(trials, done)
    parts += figure_parts(write_figures(done, inp.curves, inp.controls, out)) + pareto_parts(trials, out)
    report = out / "report.md"
    atomic_write_text(report, "\n".join(parts))
    write_html(inp, out)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hsae-report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results_dir")
    ap.add_argument("--out", default=None, help="report directory (default RESULTS_DIR/report, or "
                                                "RESULTS_DIR/report-exploratory)")
    ap.add_argument("--exploratory", action="store_true",
                    help="a diagnostic, not a result: the verdict over every completed trial, unconverged ones "
                         "included, labelled so at the top")
    ap.add_argument("--budget-check", default=None, metavar="DIR",
                    help="a results directory of the main job's space run again at more steps (e.g. --seeds 1 "
                         "--steps 2x): adds the budget check (docs/training.md)")
    args = ap.parse_args(argv)
    try:
        path = build_report(args.results_dir, args.out, exploratory=args.exploratory, budget_dir=args.budget_check)
    except FileNotFoundError as exc:
        print(f"hsae-report: error: {exc}", file=sys.stderr)
        return 2
    print(path.read_text())
    print(f"[hsae] report written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
