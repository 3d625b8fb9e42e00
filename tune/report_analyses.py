"""The analyses beside the verdict, as format-free blocks for report.md and report.html: where the noise comes from
(question sampling or seed to seed, ``hsae/noise.py``), the sparsity frontier, each ablation space's verdict and the
budget check. The verdict, its witness and the blocks' types are ``tune/report_blocks.py``'s.
"""

from __future__ import annotations

import math

import pandas as pd

from hsae.ablation import AblationVerdict, arm_summary, level_order
from hsae.budget import arm_outcomes
from hsae.noise import SHARE_LEVEL, MetricNoise, NoiseSplit
from hsae.verdict import (
    BASELINE,
    Verdict,
)
from tune.report_blocks import (
    Block,
    Heading,
    Paragraph,
    Span,
    Table,
    claim_cells,
    claim_word,
    code,
    interval_text,
    mark_column,
    metric_label,
    p_text,
    strong,
)
from tune.report_data import PROBE_PRIMARY, ReportInputs, frontier_lines, order_key, ordered

# -- where the noise comes from: question sampling or seed to seed (hsae/noise.py) ----------------------------
NOISE_HEADING = "Where the noise comes from"


def _percent(share: float) -> str:
    return "–" if not math.isfinite(share) else f"{100 * share:.0f}%"


def _number(x: float) -> str:
    return "–" if not math.isfinite(x) else f"{x:.3g}"


def _seeds_cell(s: NoiseSplit, role: str) -> str:
    if s.decided:
        return "decided" if role == "headline" else "decided (were it a claim)"
    return str(s.seeds_needed) if s.seeds_needed else "> 200"


def noise_table(m: MetricNoise) -> Table:
    """One row per tested arm: the difference, the test's s.d. of its mean, the question and seed shares of that
    variance, the MDE at the arm's seeds (and were question noise gone) and the seeds a decision would take."""
    header = ["arm", "seeds", f"Δ vs {m.baseline}", "s.d. of the mean Δ (the test's)",
              f"question share ({SHARE_LEVEL:.0%} interval)", "seed share", "MDE at these seeds",
              "MDE without question noise", "seeds to decide"]
    rows = []
    for s in m.splits:
        share = _percent(s.question_share)
        if math.isfinite(s.share_lo):
            share += f" ({_percent(s.share_lo)}–{_percent(s.share_hi)})"
        if s.question_exceeds:
            share += " (exceeds the total)"
        if m.resampled and 0 < s.resamples < m.n_boot:
            share += f" ({s.resamples}/{m.n_boot} resamples defined)"
        floor = "≈ 0" if s.question_exceeds else _number(s.mdd_seed_only)  # the questions explain it all
        rows.append([s.arm, str(s.n), f"{s.diff + 0.0:+.3g}", _number(s.total_sd), share, _percent(s.seed_share),
                     _number(s.mdd), floor, _seeds_cell(s, m.role)])
    return Table(header, rows)


def _median(values: list[float]) -> float:
    return float(pd.Series(values, dtype=float).median()) if values else math.nan


def noise_reading(noise: list[MetricNoise]) -> Paragraph:
    """What the split says: the headline's question share across arms, which part dominates and what would shrink
    it, the arms whose question variance exceeds the total, the undecided arms' seeds, the secondary metrics."""
    head = noise[0]
    label = metric_label(head.metric)
    shares = head.shares()
    parts: list[str | Span] = []
    if not shares:
        parts.append(f"The headline ({label}) has no question resamples to split its noise by. ")
    else:
        pooled = head.pooled_share()
        span = _percent(min(shares)) if len(shares) == 1 else f"{_percent(min(shares))}–{_percent(max(shares))}"
        rest = "; seed-to-seed variation is the rest" if pooled <= 1 else ""
        parts.append(f"On the headline ({label}), question sampling is {_percent(pooled)} of the variance of the "
                     f"arms' mean differences from {head.baseline}, pooled over the arms (one arm's share: {span})"
                     f"{rest}. ")
        over = [s.arm for s in head.splits if s.question_exceeds]
        if over:
            parts.append(f"For {', '.join(over)} the question variance exceeds the test's total (seed share read as "
                         "0): at few seeds the paired s.d. is itself noisy. ")
        # What an unlimited bank would buy, over the arms whose split can be read (not flagged).
        read = [s for s in head.splits if not s.question_exceeds and math.isfinite(s.question_share)]
        now = _median([s.mdd for s in read if math.isfinite(s.mdd)])
        floor = _median([s.mdd_seed_only for s in read if math.isfinite(s.mdd_seed_only)])
        mde = (f"the median MDE at the run's seeds would fall from {_number(now)} to {_number(floor)} with no "
               f"question noise at all" if math.isfinite(now) and math.isfinite(floor) else "")
        if pooled >= 0.5:
            parts += [strong("Question noise dominates"), ": more questions (a larger bank, or per-question outcomes "
                      "that carry more than right or wrong) would shrink the differences' spread at the same seeds"
                      + (f" — {mde}" if mde else "") + "; more seeds shrink the seed part and each seed's own "
                      "question noise, not the part every seed shares. "]
        else:
            parts += [strong("Seed noise dominates"), ": a larger bank would buy little" + (f" ({mde})" if mde else "")
                      + "; more seeds (", code("--until-decided"), ") are what decides an arm. "]
    undecided = [s for s in head.splits if not s.decided]
    if undecided:
        needs = ", ".join(f"{s.arm} {s.seeds_needed if s.seeds_needed else '> 200'}" for s in undecided)
        parts.append(f"Seeds a decision would take at the measured difference and spread: {needs}. ")
    other = [f"{metric_label(m.metric)} {_percent(m.pooled_share())}" for m in noise[1:] if m.shares()]
    if other:
        parts.append(f"Secondary metrics, question share pooled over the arms: {'; '.join(other)}.")
    return Paragraph.of(*parts)


def noise_blocks(inp: ReportInputs) -> list[Block]:
    """The 'Where the noise comes from' section: per tested metric (the headline's first) a table of each arm's
    noise split (``hsae.noise``), then one paragraph reading it. Nothing without a verdict or with the controls
    out of range (no power is read from an evaluation that cannot detect removal)."""
    noise = [m for m in inp.noise if m.splits]
    if inp.problems or not noise:
        return []
    n_boot = max((m.n_boot for m in noise), default=0)
    blocks: list[Block] = [
        Heading(2, NOISE_HEADING),
        Paragraph.of(
            f"How much of each arm's difference from {noise[0].baseline} is question sampling and how much seed to "
            "seed. The test's variance of the mean difference over the seeds is the paired s.d.² / n plus the part "
            "the seeds share through the one bank of questions (its s.d. below); the question part is the variance "
            f"of that same mean difference over the verdict's {n_boot} "
            "question resamples (one resample for every trial, as every trial answers the same bank; the SAEs held "
            "fixed); the seed part is the rest (floored at 0). The share's interval comes from the paired s.d.'s "
            "n − 1 degrees of freedom: at 3 seeds it spans a factor of 60, so read the share pooled over the arms "
            "(below), not one cell. MDE and seeds to decide are the power table's; "
            "\"MDE without question noise\" is the MDE at the same seeds from the seed part alone "
            "(docs/evaluation.md, \"Where the noise comes from\").")]
    for m in noise:
        role = {"headline": "headline", "witness": "second witness"}.get(m.role, "secondary, descriptive")
        blocks += [Heading(3, f"{metric_label(m.metric)} ({role})"), noise_table(m)]
        if not m.resampled:
            blocks.append(Paragraph.of("No question resamples: this metric is read from the trial rows, not from the "
                                       "question bank, so only the test's total is shown."))
    return blocks + [noise_reading(noise)]


# -- the sparsity frontier (SAEBench's form: every metric against held-out L0) ---------------------------
def frontier_claims_table(inp: ReportInputs, metric: str) -> Table:
    """One row per line, one column per target L0: Δ vs relu [adjusted CI] and the claim, from the test run
    within that target's trials."""
    targets = sorted(inp.frontier)
    lines = ordered(frontier_lines(inp.frontier_rows))
    header = ["arm", *(f"target L0 {t:g}: Δ vs relu [adj. 95% CI], claim" for t in targets)]
    rows, marks = [], {}
    for i, line in enumerate(lines):
        cells = [line]
        for j, t in enumerate(targets, start=1):
            v = inp.frontier[t]
            test = next((x for x in v.tests if x.metric == metric), None) if isinstance(v, Verdict) else None
            if test is None:
                cells.append("–" if isinstance(v, Verdict) else f"no verdict: {v}")
                continue
            diff, p, said = claim_cells(test, line)
            cells.append(diff if diff in ("reference", "–") else f"{diff}, p {p}, {said}")
            kind = claim_word(said)
            if kind in ("better", "worse") and diff not in ("reference", "–"):
                marks[(i, j)] = kind
        rows.append(cells)
    return Table(header, rows, marks)


def frontier_blocks(inp: ReportInputs) -> list[Block]:
    """The 'Sparsity frontier' section (text and tables; the figure is each rendering's): only when the ranked
    trials span more than one target L0."""
    if not inp.frontier:
        return []
    headline = inp.headline or "frontier_area"
    blocks: list[Block] = [
        Heading(2, "Sparsity frontier: every metric against held-out L0"),
        Paragraph.of(f"Trials trained to target L0 {', '.join(f'{t:g}' for t in sorted(inp.frontier))} (cfg_target_l0; "
                     "docs/training.md, \"Target L0\"), in SAEBench's form: one line per arm, x = held-out L0, points "
                     "at mean ± 95% CI over seeds. The verdict below is the same calibrated test (each arm against "
                     "relu by its paired differences over seeds) run within each target's trials, so arms are "
                     "compared at matched L0.")]
    if problems := inp.problems:
        return blocks + [Paragraph.of(strong("No claims: " + "; ".join(problems) + "."))]
    blocks += [Heading(3, f"Verdict at each target L0: {metric_label(headline)} (headline)"),
               frontier_claims_table(inp, headline)]
    if any(isinstance(v, Verdict) and any(t.metric == PROBE_PRIMARY for t in v.tests) for v in inp.frontier.values()):
        blocks += [Heading(3, f"Verdict at each target L0: {metric_label(PROBE_PRIMARY)} (second witness)"),
                   frontier_claims_table(inp, PROBE_PRIMARY)]
    return blocks


def ablation_blocks(inp: ReportInputs) -> list[Block]:
    """Every declared ablation space's section (``ablation_section``)."""
    return [b for name, av in inp.ablations.items() for b in ablation_section(name, inp.declarations[name], av)]


def ablation_section(name: str, declaration: dict, av: AblationVerdict | str) -> list[Block]:
    """A space's heading, its description, the table of every arm against the reference and relu, the trends
    along its ordered parameters, and what the claims rest on."""
    blocks: list[Block] = [Heading(2, f"Ablation verdict: {name}")]
    if declaration.get("description"):
        blocks.append(Paragraph.of(declaration["description"]))
    if isinstance(av, str):
        return [*blocks, Paragraph.of(f"No verdict: {av}.")]
    return [*blocks, ablation_table(av), *trend_paragraphs(av), ablation_claims_paragraph(av)]


def ablation_arms(av: AblationVerdict) -> list[str]:
    """relu, the reference, then the other arms along the first trend's levels (else in report order)."""
    arms = ordered(av.verdict.per_trial["arm"])
    along = level_order(av.trends[0].levels) if av.trends else []
    rest = along + [a for a in arms if a not in along]
    first = [a for a in (BASELINE, av.reference) if a in arms]
    return first + [a for a in rest if a not in first]


def ablation_table(av: AblationVerdict) -> Table:
    """One row per arm: the headline's mean and seed interval, its difference with the reference and with relu
    (adjusted interval, p, claim), and the second witness's mean, descriptive."""
    v, head = av.verdict, av.verdict.main
    headline = summary_cells(arm_summary(v.per_trial, v.headline))
    header = ["arm", "seeds", f"{metric_label(v.headline)} (headline): mean ± 95% seed CI",
              f"Δ vs {av.reference} [adjusted 95% CI]", "adjusted p", "claim"]
    if av.versus_relu is not None:
        header += [f"Δ vs {BASELINE} [adjusted 95% CI]", "adjusted p", "claim vs relu"]
    witness = [t for t in v.tests[1:] if t.metric == PROBE_PRIMARY]
    probe = summary_cells(arm_summary(v.per_trial, PROBE_PRIMARY)) if witness else {}
    if witness:
        header.append(f"{metric_label(PROBE_PRIMARY)}: mean ± 95% seed CI (descriptive)")
    rows = []
    for arm in ablation_arms(av):
        mean, seeds = headline.get(arm, ("–", "0"))
        cells = [arm, seeds, mean, *claim_cells(head, arm)]
        if av.versus_relu is not None:
            cells += claim_cells(av.versus_relu, arm)
        if witness:
            cells.append(probe.get(arm, ("–", "0"))[0])
        rows.append(cells)
    table = mark_column(Table(header, rows), 5)
    return mark_column(table, 8) if av.versus_relu is not None else table


def summary_cells(summary: dict[str, tuple[float, float, int]]) -> dict[str, tuple[str, str]]:
    """arm -> ("mean ± half-width", seeds) of ``hsae.ablation.arm_summary``."""
    out = {}
    for arm, (mean, half, n) in summary.items():
        text = "–" if not math.isfinite(mean) else (f"{mean:.3g}" if not math.isfinite(half) else
                                                    f"{mean:.3g} ± {half:.2g}")
        out[arm] = (text, str(n))
    return out


def trend_paragraphs(av: AblationVerdict) -> list[Paragraph]:
    """One sentence per declared trend: the slope per grid step, its interval, p and what it says."""
    out = []
    for t in av.trends:
        levels = ", ".join(f"{t.levels[a]:g}" for a in level_order(t.levels))
        out.append(Paragraph.of(
            strong(f"Trend along {t.parameter}"), f" ({len(t.levels)} levels: {levels}): ",
            f"{metric_label(av.headline)} changes by {t.slope:+.3g} per grid step {interval_text(t.lo, t.hi, True)} "
            f"(mean over {t.n} seeds of each seed's least-squares slope), adjusted p {p_text(t.p_adj)}: ",
            strong(t.claim), "."))
    return out


def ablation_claims_paragraph(av: AblationVerdict) -> Paragraph:
    """What the section's claims rest on, and what the undecided arms would need."""
    head = av.verdict.main
    parts: list[str | Span] = [
        f"The claims of this section: each arm against {av.reference} (the space's declared reference)"
        + (f" and against {BASELINE}" if av.versus_relu is not None else "")
        + (f", and {len(av.trends)} trend(s)" if av.trends else "")
        + f", {av.family} comparisons in one family at the family-wise 0.05 (Bonferroni: each at "
          f"{head.alpha / av.family:.2g}), each by its own paired differences over the seeds and the variance "
          f"the seeds share through the bank; equivalence within ±{head.margin:g}. The second witness is shown "
          "beside it, descriptive. "]
    tests = [head] + ([av.versus_relu] if av.versus_relu is not None else [])
    needed = [f"{a.arm} vs {t.baseline} ({a.seeds_needed} seeds)" if a.seeds_needed else f"{a.arm} vs {t.baseline}"
              for t in tests for a in t.arms if not a.decided]
    if needed:
        parts.append(f"Undecided (seeds that would decide it at the measured difference and spread): "
                     f"{'; '.join(needed)}.")
    return Paragraph.of(*parts)


def budget_blocks(inp: ReportInputs) -> list[Block]:
    """The 'Budget check' section: per arm, each checked metric at the main job's steps and at the budget run's,
    the change and the seed noise (docs/training.md, "The budget check"); nothing without a budget directory."""
    check = inp.budget
    if check is None:
        return []
    blocks: list[Block] = [Heading(2, "Budget check: would more tokens change the numbers?")]
    if isinstance(check, str):
        return blocks + [Paragraph.of(f"No budget check: {check}.")]
    if check.empty:
        return blocks + [Paragraph.of("No budget check: no trial of the budget run has a main-job twin (same arm, "
                                      "same seed).")]
    blocks.append(Paragraph.of(
        f"Trials of the main job trained again at {_steps_text(check['budget_steps'])} steps (the main job: "
        f"{_steps_text(check['steps'])}), same arm, seed and recipe (", code(str(inp.budget_dir)), "). More "
        "tokens would not help an arm when every change is smaller than the seed noise: the residual s.d. of the "
        "main job's arm × seed table over its completed trials."))
    header = ["arm", "seed"]
    metrics = list(dict.fromkeys(check["metric"]))
    for m in metrics:
        header += [f"{metric_label(m)}: main → longer", "change", "seed s.d."]
    rows = []
    for (arm, seed), g in sorted(check.groupby(["arm", "seed"]), key=lambda kv: order_key(kv[0])):
        row = [str(arm), str(seed)]
        for m in metrics:
            r = g[g["metric"] == m].iloc[0]
            within = r["within_noise"]
            note = " (no noise estimate)" if pd.isna(within) else "" if within else " (beyond noise)"
            row += [f"{r['value']:.4f} → {r['budget_value']:.4f}", f"{r['change']:+.4f}{note}", f"{r['seed_sd']:.4f}"]
        rows.append(row)
    outcome = arm_outcomes(check)
    moved, unknown = ([a for a in ordered(check["arm"]) if outcome[a] == kind] for kind in ("moved", "unknown"))
    lines = [f"More tokens changed {', '.join(moved)} beyond the seed noise: at this budget their numbers are not "
             "final." if moved else "No arm's numbers moved beyond the seed noise at the longer budget."]
    if unknown:
        lines.append(f"No reading for {', '.join(unknown)}: a metric or its seed noise is undefined.")
    return blocks + [Table(header, rows), Paragraph.of(strong(" ".join(lines)))]


def _steps_text(steps: pd.Series) -> str:
    lo, hi = int(steps.min()), int(steps.max())
    return f"{lo:,}" if lo == hi else f"{lo:,}–{hi:,}"
