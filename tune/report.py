"""``python tune/report.py RESULTS_DIR``: the paper's tables (Markdown) and figures (PNG) from Parquet.

Writes RESULTS_DIR/report/report.md and RESULTS_DIR/report/*.png. With several seeds a cell reads
``mean ± half-width of the 95% CI``; n counts the seeds behind it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from hsae.atomic import atomic_file, atomic_write_text  # noqa: E402
from hsae.results import load_curves, load_trials  # noqa: E402
from hsae.schema import REPORT_METRICS, label  # noqa: E402
from hsae.spaces import mean_ci95  # noqa: E402
from hsae.variants import PAPER_VARIANTS  # noqa: E402

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
    header = by + ["n"] + [label(m) for m in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    groups = [(key if isinstance(key, tuple) else (key,), g) for key, g in df.groupby(by, dropna=False, sort=False)]
    for key, g in sorted(groups, key=lambda kg: _order_key(kg[0])):
        cells = [str(k) for k in key] + [str(len(g))] + [fmt(g[m].dropna().astype(float).tolist()) for m in metrics]
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


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
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
    ok = pos >= 0.2 and neg <= 0.05
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
    main = done[done["space"] == "variants"] if (done["space"] == "variants").any() else done
    if fig_unlearning(main, controls, out / "fig1a_unlearning.png"):
        figures.append(("Unlearning score per variant", "fig1a_unlearning.png"))
    if fig_tradeoff(main, out / "unlearning_tradeoff.png"):
        figures.append(("Removal vs collateral damage per grid setting", "unlearning_tradeoff.png"))
    if fig_loss_curves(curves, main, out / "fig1b_loss_curves.png"):
        figures.append(("Total loss curves", "fig1b_loss_curves.png"))
    if fig_alpha(done[done["space"] == "ortho"], out / "alpha_vs_correlation.png"):
        figures.append(("α vs inter-group correlation", "alpha_vs_correlation.png"))
    if fig_l0_ev(done, out / "l0_vs_ev.png"):
        figures.append(("L0 vs explained variance", "l0_vs_ev.png"))
    return figures


def figure_parts(figures: list[tuple[str, str]]) -> list[str]:
    if not figures:
        return []
    return ["## Figures\n", *(f"![{title}]({name})\n" for title, name in figures)]


def build_report(results_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    results_dir = Path(results_dir)
    out = Path(out_dir) if out_dir else results_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    trials = load_trials(results_dir)
    curves = load_curves(results_dir)
    done = trials[trials["status"] == "completed"]
    controls = load_controls(results_dir)
    parts = header_parts(results_dir, trials) + controls_parts(controls) + section_parts(trials, done)
    parts += figure_parts(write_figures(done, curves, controls, out))
    report = out / "report.md"
    atomic_write_text(report, "\n".join(parts))
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
