"""report/report.html: the report as one self-contained, interactive page (``tune/report.py`` writes it).

plotly.js is inlined once, in <head>, so the page opens without a network; every figure is a plotly div
that only calls ``Plotly.newPlot``. The page is the list ``SECTIONS``, in order: the header and the
verdict (the blocks of tune/report_blocks.py that report.md renders as Markdown, here as HTML; the verdict is
computed once in tune/report_data.py), the second witness and where the noise comes from, the forget-vs-retain
figure per arm, parallel coordinates of the trials' parameters against their metrics, the training curves and
the trial table. A section is a function ``Inputs -> str`` (an HTML fragment); one whose data is missing returns
one line saying so. To add a section (say, an Optuna study's Pareto front), write such a function and
append it to ``SECTIONS``.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from hsae.atomic import atomic_write_text
from hsae.pareto import study_fronts, varying_params
from hsae.schema import label
from hsae.scoring import BARS
from tune.report_analyses import (
    ablation_blocks,
    budget_blocks,
    frontier_blocks,
    noise_blocks,
)
from tune.report_blocks import (
    Block,
    Heading,
    Paragraph,
    Table,
    banner_blocks,
    controls_blocks,
    header_blocks,
    metric_label,
    probe_blocks,
    verdict_blocks,
)
from tune.report_data import (
    ReportInputs,
    frontier_points,
    frontier_steps,
    ordered,
    variant_index,
)

X_MIN = 0.8  # the forget-vs-retain view starts where report.md's figure does; zooming out shows the rest
PLOT_CONFIG = {"displaylogo": False, "responsive": True}
PALETTE = qualitative.D3  # matplotlib's tab10: the same colour per variant as the PNG figures
SEED_PALETTE = qualitative.Dark2
# Grid columns that name a setting, in the order the hover text lists them (absent or empty ones are left out).
SETTING_COLUMNS = ["grid", "retain_threshold", "n_features", "features_selected", "multiplier", "percentile",
                   "questions_touched"]
PARCOORDS_METRICS = ["explained_variance", "l0", "val_mse", "forget_acc_at_retain98", "unlearning_score"]
TABLE_COLUMNS = ["trial_id", "variant", "seed", "space", "status", "converged", "explained_variance", "l0",
                 "val_mse", "forget_acc_at_retain98", "unlearning_score", "wall_s", "error"]
CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1400px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 13px; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } tbody tr:nth-child(even) { background: #fafafa; }
td.better { background: #d9f2d9; font-weight: bold; } td.worse { background: #f8d7d7; font-weight: bold; }
.banner { background: #fde2e2; border: 2px solid #c0392b; padding: 0.4em 1em; margin: 0.8em 0; }
.note, .caption { color: #555; font-size: 13px; } .note { font-style: italic; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; margin: 0 0.25em 0 0.8em; vertical-align: middle; }
.scroll { overflow-x: auto; }
"""


Inputs = ReportInputs  # a section is a function of the shared inputs (tune/report_data.py)


# -- blocks (tune/report_blocks.py) as HTML ----------------------------------------------------------
TAGS = {"strong": "strong", "code": "code", "em": "em"}


def spans_html(spans: tuple[tuple[str, str], ...]) -> str:
    return "".join(f"<{TAGS[style]}>{html.escape(text)}</{TAGS[style]}>" if style else html.escape(text)
                   for style, text in spans)


def table_html(table: Table) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.header)
    body = "\n".join(
        "<tr>" + "".join(f'<td class="{table.marks[(i, j)]}">{html.escape(c)}</td>' if (i, j) in table.marks
                         else f"<td>{html.escape(c)}</td>" for j, c in enumerate(row)) + "</tr>"
        for i, row in enumerate(table.rows))
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table></div>'


def blocks_html(blocks: list[Block]) -> str:
    """Format-free blocks (headings, paragraphs, tables) as HTML, text escaped."""
    out = []
    for block in blocks:
        if isinstance(block, Heading):
            level = min(block.level, 4)
            out.append(f"<h{level}>{html.escape(block.text)}</h{level}>")
        elif isinstance(block, Paragraph):
            out.append(f"<p>{spans_html(block.spans)}</p>")
        elif isinstance(block, Table):
            out.append(table_html(block))
    return "\n".join(out)


def note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def figure_html(fig: go.Figure, div_id: str, caption: str) -> str:
    """A figure as a div that draws itself with the page's one copy of plotly.js, then its caption."""
    div = fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config=PLOT_CONFIG)
    return f'{div}\n<p class="caption">{caption}</p>'


def variant_color(variant: str) -> str:
    """The variant's colour in every figure (its place in VARIANT_ORDER, as report.py's mechanism figure)."""
    return PALETTE[variant_index(variant) % len(PALETTE)]


# -- sections -----------------------------------------------------------------------------------
def header_section(inp: Inputs) -> str:
    """Title and results line, the banner when the controls are out of range, and the controls' status."""
    head = blocks_html(header_blocks(inp))
    banner = blocks_html(banner_blocks(inp.problems))
    controls = (blocks_html(controls_blocks(inp.controls)) if inp.controls else "<h2>Evaluation controls</h2>"
                + note("No controls/*.json in the results: the controls' status is unknown."))
    return head + (f'<div class="banner">{banner}</div>' if banner else "") + controls


def verdict_section(inp: Inputs) -> str:
    """The matched-retain table, headline metric and setting counts: report.md's verdict text, as HTML."""
    if isinstance(inp.verdict, str):
        return "<h2>Verdict</h2>" + note(f"No verdict: {inp.verdict}.")
    return blocks_html(verdict_blocks(inp.verdict, inp.main, inp.grid, inp.questions, inp.problems))


def probe_section(inp: Inputs) -> str:
    """The second witness (k-sparse probing): its table, claims and agreement lines; nothing without columns."""
    return blocks_html(probe_blocks(inp))


def noise_section(inp: Inputs) -> str:
    """Where each difference's noise comes from (question sampling or seed to seed): report.md's tables, as HTML."""
    return blocks_html(noise_blocks(inp))


def frontier_figure(points: pd.DataFrame) -> go.Figure:
    """One panel per metric against held-out L0, a line per arm with seed intervals on both axes."""
    metrics = list(dict.fromkeys(points["metric"]))
    fig = make_subplots(1, len(metrics), subplot_titles=[metric_label(m) for m in metrics], horizontal_spacing=0.06)
    for j, metric in enumerate(metrics, start=1):
        for line in ordered(points["line"]):
            d = points[(points["metric"] == metric) & (points["line"] == line)].sort_values("target")
            fig.add_trace(go.Scatter(
                x=d["l0"], y=d["mean"], mode="lines+markers", name=line, legendgroup=line, showlegend=j == 1,
                line={"color": variant_color(line.split("[")[0])},
                error_x={"type": "data", "array": d["l0_half"].fillna(0).tolist()},
                error_y={"type": "data", "array": d["half"].fillna(0).tolist()},
                text=[f"{line}, target L0 {t:g}" for t in d["target"]], hoverinfo="text+x+y"), row=1, col=j)
    fig.update_xaxes(type="log", title_text="held-out L0")
    fig.update_layout(height=420, margin={"t": 50}, hovermode="closest")
    return fig


def frontier_section(inp: Inputs) -> str:
    """The sparsity frontier (only when the trials span several target L0s): figure, then per-target verdict."""
    blocks = frontier_blocks(inp)
    if not blocks:
        return ""
    points = frontier_points(inp)
    figure = figure_html(frontier_figure(points), "fig-frontier", "Mean ± 95% CI over seeds of each metric and of "
                         "held-out L0, one line per arm (one point per target L0).") if len(points) else ""
    return blocks_html(blocks[:2]) + figure + blocks_html(blocks[2:])


def _hover(rows: pd.DataFrame, seeds: dict[str, object]) -> list[str]:
    """One hover text per grid row: which trial and seed, the accuracies, and the setting's parameters."""
    texts = []
    for r in rows.to_dict("records"):
        seed = seeds.get(r["trial_id"])
        params = ", ".join(f"{c}={r[c]:.4g}" if isinstance(r[c], float) else f"{c}={r[c]}"
                           for c in SETTING_COLUMNS if c in r and not pd.isna(r[c]))
        texts.append(f"{r['trial_id']}" + ("" if seed is None else f" (seed {seed})")
                     + f"<br>forget {r['forget_acc']:.3f}, retain {r['retain_acc']:.4f}<br>{params}")
    return texts


def _seed_traces(sae: pd.DataFrame, trial: pd.Series, color: str, show: bool) -> list[go.Scatter]:
    """One trial's grid points (faint) and its frontier (line), in its seed's colour."""
    rows = sae[sae["trial_id"] == trial["trial_id"]]
    group = f"seed {trial['seed']}"
    points = go.Scatter(x=rows["retain_acc"], y=rows["forget_acc"], mode="markers", name=group, legendgroup=group,
                        showlegend=False, marker={"color": color, "size": 6, "opacity": 0.45},
                        hovertext=_hover(rows, {trial["trial_id"]: trial["seed"]}), hoverinfo="text")
    xs, ys = frontier_steps(rows, X_MIN)
    line = go.Scatter(x=xs, y=ys, mode="lines", line={"shape": "vh", "color": color, "width": 1.6},
                      name=group, legendgroup=group, showlegend=show,
                      hovertext=f"frontier of {trial['trial_id']} (seed {trial['seed']})", hoverinfo="text")
    return [points, line] if xs else [points]


def _control_traces(grid: pd.DataFrame, ids: list[str], seeds: dict[str, object], show: bool) -> list[go.Scatter]:
    """The random-feature control of these trials (grey ×) and the positive control (red ▲), where present."""
    out = []
    styles = [("random", grid["trial_id"].isin(ids), "random features (neg. control)",
               {"symbol": "x", "color": "#888888", "size": 7}),
              ("positive", True, "positive control",
               {"symbol": "triangle-up", "color": "#C44E52", "size": 9})]
    for control, keep, name, marker in styles:
        rows = grid[(grid["control"] == control) & keep]
        if not rows.empty:
            out.append(go.Scatter(x=rows["retain_acc"], y=rows["forget_acc"], mode="markers", name=name,
                                  legendgroup=control, showlegend=show, marker=marker,
                                  hovertext=_hover(rows, seeds), hoverinfo="text"))
    return out


def _panel(fig: go.Figure, grid: pd.DataFrame, per_trial: pd.DataFrame, colors: dict, where: tuple[int, int],
           shown: set[str]) -> None:
    """One variant's subplot: each seed's points and frontier, the controls, and how many points lie left.
    ``shown``: the legend entries already drawn (each once for the whole figure)."""
    seeds = dict(zip(per_trial["trial_id"], per_trial["seed"], strict=True))
    sae = grid[(grid["control"] == "sae") & grid["trial_id"].isin(list(seeds))]
    traces = []
    for _, trial in per_trial.iterrows():
        key = f"seed {trial['seed']}"
        traces += _seed_traces(sae, trial, colors[trial["seed"]], key not in shown)
        shown.add(key)
    traces += _control_traces(grid, list(seeds), seeds, "controls" not in shown)
    shown.add("controls")
    for trace in traces:
        fig.add_trace(trace, row=where[0], col=where[1])
    points = [t for t in traces if t.mode == "markers"]
    hidden = sum(int((pd.Series(t.x, dtype=float) < X_MIN).sum()) for t in points)
    if hidden:
        fig.add_annotation(text=f"{hidden} point(s) at retain < {X_MIN}: zoom out", x=X_MIN + 0.004, y=0.0,
                           xanchor="left", showarrow=False, font={"size": 10, "color": "#666"},
                           row=where[0], col=where[1])


def forget_retain_section(inp: Inputs) -> str:
    """One subplot per arm: x = retain accuracy, y = forget accuracy; dotted lines are the retain bars."""
    title = "<h2>Forget vs retain accuracy per arm</h2>"
    if isinstance(inp.verdict, str):
        return title + note(f"No forget-vs-retain figure: {inp.verdict}.")
    per_trial = inp.verdict.per_trial
    variants = ordered(per_trial["arm"])
    ncols = min(3, len(variants))
    nrows = math.ceil(len(variants) / ncols)
    counts = per_trial["arm"].value_counts()
    titles = [f"{v} ({counts[v]} seed{'s' if counts[v] != 1 else ''})" for v in variants]
    fig = make_subplots(nrows, ncols, shared_xaxes="all", shared_yaxes="all", subplot_titles=titles,
                        horizontal_spacing=0.05, vertical_spacing=0.25 / nrows)
    colors = {s: SEED_PALETTE[i % len(SEED_PALETTE)] for i, s in enumerate(sorted(per_trial["seed"].unique()))}
    shown: set[str] = set()
    for i, variant in enumerate(variants):
        rows = per_trial[per_trial["arm"] == variant]
        _panel(fig, inp.grid, rows, colors, (i // ncols + 1, i % ncols + 1), shown)
    for bar in BARS:
        fig.add_vline(x=bar, line={"dash": "dot", "width": 1, "color": "black"})
    fig.update_xaxes(range=[X_MIN, 1.005], showticklabels=True)
    fig.update_yaxes(range=[-0.02, 1.02])
    # The legend sits above the panels and the x title just below them, whatever the number of rows.
    fig.update_layout(height=150 + 300 * nrows, margin={"t": 90, "b": 60}, hovermode="closest",
                      legend={"orientation": "h", "x": 0, "y": 0.99, "yanchor": "top", "yref": "container"})
    fig.add_annotation(text="retain accuracy", x=0.5, y=0, xref="paper", yref="paper", yshift=-30,
                       showarrow=False, yanchor="top")
    fig.update_yaxes(title_text="forget accuracy", col=1)
    caption = (f"Every grid setting of every converged seed (points, coloured by seed; hover for the trial and the "
               f"setting), each seed's frontier (line), the random-feature control (×) and the positive control "
               f"(▲). Lower forget accuracy = more removed. Dotted: the retain bars {', '.join(str(b) for b in BARS)}. "
               f"Drag to zoom, double-click to reset.")
    return title + figure_html(fig, "fig-forget-retain", caption)


def _dimension(values: pd.Series, name: str) -> dict:
    """A parcoords axis: numbers as a range; text, flags, numbers with gaps and a few whole numbers (seeds,
    group counts) as categories, so the axis reads 42, 43, 44 rather than 42.2, 42.4 … ('–' for a gap)."""
    numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
    whole = numeric and values.notna().all() and bool((values.astype(float) % 1 == 0).all()) and values.nunique() <= 8
    if numeric and values.notna().all() and not whole:
        return {"label": name, "values": values.astype(float).tolist()}
    text = values.map(lambda x: "–" if pd.isna(x) else (f"{x:.4g}" if isinstance(x, float) else str(x)))
    cats = ordered(text) if name == "variant" else sorted(text.unique(), key=lambda s: (s == "–", _num(s), s))
    return {"label": name, "values": [cats.index(t) for t in text], "tickvals": list(range(len(cats))),
            "ticktext": cats, "range": [-0.3, max(len(cats) - 1, 1) + 0.3]}


def _num(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.inf


def parcoords_columns(done: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(axes, metrics left out): variant, the cfg_* columns whose set values differ between completed trials
    (a value only some variants have is the variant itself), seed, then the metrics every trial has."""
    cfg = [c for c in done if c.startswith("cfg_") and c != "cfg_variant"
           and done[c].dropna().astype(str).nunique() > 1]
    present = [m for m in PARCOORDS_METRICS if m in done and done[m].notna().any()]
    gaps = [m for m in present if done[m].isna().any()]  # parcoords cannot draw a line through a gap
    return ["variant", *cfg, "seed", *(m for m in present if m not in gaps)], gaps


def parcoords_section(inp: Inputs) -> str:
    """Parallel coordinates: one line per completed trial, coloured by variant; drag along an axis to filter."""
    title = "<h2>Parameters against metrics (parallel coordinates)</h2>"
    done = inp.done
    if len(done) < 2:
        return title + note(f"{len(done)} completed trial(s): parallel coordinates need at least 2.")
    columns, gaps = parcoords_columns(done)
    dims = [_dimension(done[c].reset_index(drop=True), c) for c in columns]
    for d in dims:
        d["label"] = label(d["label"]).removeprefix("cfg_")
    variants = ordered(done["variant"])
    codes = dims[0]["values"]
    # A colour scale exact at each variant's code (0 … k-1), so each line takes its variant's colour.
    scale = [[i / max(len(variants) - 1, 1), variant_color(v)] for i, v in enumerate(variants)]
    scale = scale if len(variants) > 1 else [[0, scale[0][1]], [1, scale[0][1]]]
    line = {"color": codes, "colorscale": scale, "cmin": 0, "cmax": max(len(variants) - 1, 1)}
    fig = go.Figure(go.Parcoords(line=line, dimensions=dims, labelangle=-20 if len(dims) > 10 else 0, labelside="top",
                                 labelfont={"size": 11}, tickfont={"size": 10}))
    fig.update_layout(height=520, margin={"l": 110, "r": 60, "t": 110, "b": 40})
    swatches = "".join(f'<span class="swatch" style="background:{variant_color(v)}"></span>{html.escape(v)}'
                       for v in variants)
    left_out = f" Left out (missing for some trials): {', '.join(gaps)}." if gaps else ""
    caption = f"Colour = variant:{swatches}. Parameters that differ between trials, seed, then metrics.{left_out}"
    return title + figure_html(fig, "fig-parcoords", caption)


def _curve_traces(c: pd.DataFrame, metric: str, show: set[str]) -> list[go.Scatter]:
    """One line per trial for ``metric``, coloured by variant, one legend entry per variant."""
    traces = []
    for variant in ordered(c["variant"]):
        for tid, rows in c[c["variant"] == variant].groupby("trial_id", sort=False):
            rows = rows.dropna(subset=[metric]).sort_values("step")
            if rows.empty:
                continue
            traces.append(go.Scatter(
                x=rows["step"], y=rows[metric], mode="lines", name=variant, legendgroup=variant,
                showlegend=variant not in show, line={"color": variant_color(variant), "width": 1.3},
                hovertemplate=f"{tid} (seed {rows['seed'].iloc[0]})<br>step %{{x}}<br>{metric} %{{y:.4g}}"
                              "<extra></extra>"))
            show.add(variant)
    return traces


def curves_section(inp: Inputs) -> str:
    """Training loss and held-out MSE against step, one line per completed trial (curves.parquet)."""
    title = "<h2>Training curves</h2>"
    if inp.curves.empty or inp.done.empty:  # an interrupted first sweep: empty Parquet has no typed columns
        return title + note("No curves.parquet rows for the completed trials: no training curves.")
    c = inp.curves.drop(columns=["variant", "seed"], errors="ignore").merge(
        inp.done[["trial_id", "variant", "seed"]], on="trial_id")
    metrics = [m for m in ("loss", "val_mse") if m in c and c[m].notna().any()]
    if not metrics:
        return title + note("No curves.parquet rows for the completed trials: no training curves.")
    names = {"loss": "total loss (log scale)", "val_mse": "held-out MSE (log scale)"}
    fig = make_subplots(1, len(metrics), subplot_titles=[names[m] for m in metrics], horizontal_spacing=0.08)
    show: set[str] = set()
    for j, metric in enumerate(metrics):
        for trace in _curve_traces(c, metric, show):
            fig.add_trace(trace, row=1, col=j + 1)
    fig.update_yaxes(type="log")
    fig.update_xaxes(title_text="step")
    fig.update_layout(height=430, margin={"t": 50}, hovermode="closest")
    caption = "One line per trial, coloured by variant; click a legend entry to hide a variant, hover for the trial."
    return title + figure_html(fig, "fig-curves", caption)


def trials_section(inp: Inputs) -> str:
    """Every trial, completed or not, one row each: identity, status and the headline metrics."""
    t = inp.trials[[c for c in TABLE_COLUMNS if c in inp.trials]].copy()
    if "space" in t and "spaces" in inp.trials:  # every space that asked for the trial, not only the one that ran it
        t["space"] = [", ".join(json.loads(s)) if isinstance(s, str) else own
                      for s, own in zip(inp.trials["spaces"], t["space"], strict=True)]
    if "error" in t:  # the last line says what went wrong; the rest is in trials.parquet
        errors = [e.strip().splitlines()[-1][:160] if isinstance(e, str) and e.strip() else "" for e in t["error"]]
        t = t.assign(error=errors) if any(errors) else t.drop(columns="error")
    rank = {v: i for i, v in enumerate(ordered(t["variant"]))}
    t = t.assign(_rank=t["variant"].map(rank)).sort_values(["_rank", "trial_id"]).drop(columns="_rank")
    table = t.rename(columns=label).to_html(index=False, na_rep="–", border=0, float_format=lambda x: f"{x:.4g}")
    return f'<h2>Trials ({len(t)})</h2><div class="scroll">{table}</div>'


def _pareto_hover(rows: pd.DataFrame, names: list[str]) -> list[str]:
    sampled = varying_params(rows)
    return [f"{r['trial_id']} ({r['variant']}, seed {r['seed']})<br>"
            + "<br>".join(f"{c} {r[c]:.4g}" if isinstance(r[c], float) else f"{c} {r[c]}" for c in names + sampled)
            for _, r in rows.iterrows()]


def pareto_section(inp: Inputs) -> str:
    """Each multi-objective Optuna study: its converged trials on the first two objectives, the front joined."""
    parts = []
    for i, (study, objectives, rows) in enumerate(study_fronts(inp.trials)):
        (x, dx), (y, dy) = objectives[:2]
        names = [m for m, _ in objectives]
        front = rows[rows["on_front"]].sort_values(x)
        fig = go.Figure([
            go.Scatter(x=rows[x], y=rows[y], mode="markers", name="converged trials", marker={"color": "#aaa"},
                       text=_pareto_hover(rows, names), hoverinfo="text"),
            go.Scatter(x=front[x], y=front[y], mode="lines+markers", name="Pareto front",
                       marker={"color": "#d62728", "size": 9}, text=_pareto_hover(front, names), hoverinfo="text")])
        fig.update_layout(height=420, xaxis_title=f"{x} ({dx})", yaxis_title=f"{y} ({dy})",
                          margin={"t": 30, "b": 50})
        parts.append(f"<h2>Pareto front: Optuna study {html.escape(study)}</h2>" + figure_html(
            fig, f"pareto-{i}", f"{len(front)} of {len(rows)} converged trials are on the front of the study over "
                                f"{html.escape(', '.join(f'{m} ({d})' for m, d in objectives))}."))
    return "\n".join(parts)  # no multi-objective study: no section


def ablation_section(inp: Inputs) -> str:
    """Each declared ablation space's section: report.md's blocks, as HTML (no section without one)."""
    return blocks_html(ablation_blocks(inp))


def budget_section(inp: Inputs) -> str:
    """The budget check (only with a budget directory): report.md's table, as HTML."""
    return blocks_html(budget_blocks(inp))


SECTIONS: list[Callable[[Inputs], str]] = [
    header_section, verdict_section, probe_section, noise_section, forget_retain_section, frontier_section,
    ablation_section, parcoords_section, curves_section, budget_section, pareto_section, trials_section,
]


def page(inp: Inputs, sections: list[Callable[[Inputs], str]] | None = None) -> str:
    """The whole page: plotly.js once in <head>, then each section in order."""
    body = "\n".join(f"<section>\n{section(inp)}\n</section>" for section in sections or SECTIONS)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>hsae ablation report</title>\n'
            f'<style>{CSS}</style>\n<script type="text/javascript">{get_plotlyjs()}</script>\n</head>\n'
            f"<body>\n{body}\n</body>\n</html>\n")


def write_html(source: str | Path | ReportInputs, out: str | Path, n_boot: int = 1000) -> Path:
    """Write ``out``/report.html atomically from a results directory or from inputs already loaded (whose
    verdict report.md used: computed once); return its path."""
    inp = source if isinstance(source, ReportInputs) else ReportInputs.load(source, n_boot)
    path = Path(out) / "report.html"
    atomic_write_text(path, page(inp))
    return path
