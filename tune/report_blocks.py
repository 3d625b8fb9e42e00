"""What report.md (tune/report.py) and report.html (tune/report_html.py) both show, as format-free blocks.

``header_blocks``, ``banner_blocks``, ``controls_blocks``, ``verdict_blocks``, ``probe_blocks``, ``noise_blocks``,
``frontier_blocks``, ``ablation_blocks`` and ``budget_blocks`` turn the inputs of ``tune/report_data.py`` (the
verdict computed once) into headings, paragraphs of styled spans and tables that each rendering writes in its
own format. Neither rendering is imported here; both import this module (nothing is imported back).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from hsae.ablation import AblationVerdict, arm_summary, level_order
from hsae.budget import arm_outcomes
from hsae.noise import SHARE_LEVEL, MetricNoise, NoiseSplit
from hsae.scoring import BARS, bar_metric, grid_metrics, mean_interval
from hsae.stats import mean_ci95
from hsae.verdict import (
    ALPHA,
    BASELINE,
    NEGATIVE_MAX,
    POSITIVE_MIN,
    ArmResult,
    MetricTest,
    Verdict,
    arm_names,
    claim,
    controls_in_range,
)
from tune.report_data import (
    CE_METRIC,
    PROBE_METRICS,
    PROBE_PRIMARY,
    ReportInputs,
    frontier_lines,
    order_key,
    ordered,
)

PROBE_KS = (1, 2, 5, 20)
NO_PROBE = "no probe (too few held-out documents)"
METRIC_LABELS = {
    **{bar_metric(b): f"forget acc at retain ≥ {b}" for b in BARS},
    "frontier_area": "frontier area (retain 0.9–1)",
    "frontier_area_p": "frontier area on p(correct option) (retain share 0.9–1)",
    "unlearning_score": "SAEBench unlearning score",
    **{f"sparse_probe_mean_k{k}": f"probe accuracy, mean over tasks, k={k}" for k in PROBE_KS},
    **{f"sparse_probe_forget_k{k}": f"probe accuracy, forget task, k={k}" for k in PROBE_KS},
    "explained_variance": "explained variance",
    CE_METRIC: "CE loss score (retain text)",
}
BANNER = "The evaluation cannot detect removal on this model: no score below is a result."


def metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


# -- format-free blocks -------------------------------------------------------------------------
Span = tuple[str, str]  # (style, text); style "" (plain), "strong", "code" or "em"


def strong(text: str) -> Span:
    return ("strong", text)


def code(text: str) -> Span:
    return ("code", text)


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Paragraph:
    spans: tuple[Span, ...]

    @classmethod
    def of(cls, *parts: str | Span) -> Paragraph:
        return cls(tuple(("", p) if isinstance(p, str) else p for p in parts))


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]
    marks: dict[tuple[int, int], str] = field(default_factory=dict)  # (row, column) -> "better" / "worse"


Block = Heading | Paragraph | Table


def fmt(values: list[float]) -> str:
    mean, half = mean_ci95(values)
    if mean != mean:
        return "–"
    digits = 4 if abs(mean) < 0.1 else 3
    return f"{mean:.{digits}g}" if half != half else f"{mean:.{digits}g} ± {half:.2g}"


# -- the blocks both renderings show ------------------------------------------------------------
def header_blocks(inp: ReportInputs) -> list[Block]:
    """Title, results line and the metric declared before the run (the report's first lines)."""
    counts = ", ".join(f"{k}: {v}" for k, v in inp.trials["status"].value_counts().items())
    blocks: list[Block] = [Heading(1, "hsae ablation report"),
                           Paragraph.of("Results: ", code(str(inp.results_dir)),
                                        f" — {len(inp.trials)} trials ({counts}).")]
    if inp.exploratory:
        blocks.append(Paragraph.of(strong("EXPLORATORY, not a result:"), " the verdict below includes trials that did "
                                   "not converge (docs/training.md); the report without --exploratory ranks none of "
                                   "them."))
    if inp.headline is not None:
        blocks.append(Paragraph.of("Headline metric, declared before the run (profile field ", code("headline_metric"),
                                   "): ", strong(metric_label(inp.headline)), ". Every other metric is secondary."))
    return blocks


def banner_blocks(problems: list[str]) -> list[Block]:
    if not problems:
        return []
    return [Paragraph.of(strong(BANNER), " " + "; ".join(problems) + ". The numbers below are diagnostics only.")]


def controls_blocks(controls: dict) -> list[Block]:
    """The 'Evaluation controls' section: both control scores and whether they are in range."""
    if not controls:
        return []
    pos, neg = controls["positive"]["score"], controls["negative"]["score"]
    verdict = ("The evaluation can detect removal." if controls_in_range(pos, neg) else
               strong("The controls are out of range: unlearning scores below cannot be trusted."))
    return [Heading(2, "Evaluation controls"),
            Paragraph.of("Positive control (difference-of-means removal): ", strong(f"{pos:.3f}"),
                         f" (must be ≥ {POSITIVE_MIN}); negative control (random direction): ", strong(f"{neg:.3f}"),
                         f" (must be ≤ {NEGATIVE_MAX}); bank {controls['positive']['n_forget']} forget / "
                         f"{controls['positive']['n_retain']} retain questions. ", verdict)]


def interval_text(lo: float, hi: float, signed: bool = False) -> str:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "[–]"
    return f"[{lo:+.3g}, {hi:+.3g}]" if signed else f"[{lo:.3g}, {hi:.3g}]"


def p_text(p: float) -> str:
    return "–" if not math.isfinite(p) else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def _metric_cell(v: Verdict, ids: list[str], metric: str) -> str:
    """mean ± 95% CI over seeds, then the question-bootstrap interval of that mean in brackets."""
    values = v.per_trial.loc[v.per_trial["trial_id"].isin(ids), metric].dropna().astype(float).tolist()
    return f"{fmt(values)} {interval_text(*mean_interval(v.boot, ids, metric))}"


def _random_area(grid: pd.DataFrame, ids: list[str]) -> str:
    rnd = grid[(grid["control"] == "random") & grid["trial_id"].isin(ids)]
    return fmt([grid_metrics(rows)["frontier_area"] for _, rows in rnd.groupby("trial_id")])


def _claim_cells(test: MetricTest, arm: str) -> list[str]:
    """Δ vs relu [simultaneous CI], adjusted p and the claim (or "descriptive") of one arm on one metric."""
    if arm == test.baseline:
        return ["reference", "—", "—"]
    if arm in test.untested:
        return ["–", "–", f"not tested ({test.untested[arm]})"]
    r = test.by_arm().get(arm)
    if r is None:
        return ["–", "–", "not tested"]
    return [f"{r.diff:+.3g} {interval_text(r.lo, r.hi, True)} (n={r.n})", p_text(r.p_adj), r.claim]


def _mark(table: Table, column: int) -> Table:
    for i, row in enumerate(table.rows):
        kind = next((k for k in ("better", "worse") if row[column].startswith(k)), "")
        if kind:
            table.marks[(i, column)] = kind
    return table


def matched_table(v: Verdict, main: pd.DataFrame, grid: pd.DataFrame, claims: bool) -> Table:
    """One row per arm: matched-retain forget accuracies, frontier area, the SAEBench score and (with
    ``claims``) the headline metric's difference with relu, adjusted interval and p, and the claim."""
    metrics = [*(bar_metric(b) for b in BARS), "frontier_area"]
    header = ["arm", "n", *(metric_label(m) for m in metrics), "random-feature frontier area", "SAEBench unlearning"]
    if claims:
        header += [f"Δ vs {v.baseline} ({metric_label(v.headline)}, headline) [adjusted 95% CI]", "adjusted p",
                   "claim"]
    rows = []
    for arm in ordered(v.per_trial["arm"]):
        ids = list(v.per_trial.loc[v.per_trial["arm"] == arm, "trial_id"])
        score = main.loc[main["trial_id"].isin(ids), "unlearning_score"].dropna().astype(float).tolist() \
            if "unlearning_score" in main else []
        cells = [arm, str(len(ids)), *(_metric_cell(v, ids, m) for m in metrics), _random_area(grid, ids), fmt(score)]
        rows.append(cells + (_claim_cells(v.main, arm) if claims else []))
    return _mark(Table(header, rows), len(header) - 1) if claims else Table(header, rows)


def secondary_table(v: Verdict) -> Table | None:
    """The secondary metrics through the same test: one row per arm, one column per metric."""
    tests = v.tests[1:]
    if not tests:
        return None
    header = ["arm", *(f"{metric_label(t.metric)} ({'higher' if t.higher_is_better else 'lower'} is better): "
                       f"Δ [adj. CI], adj. p, claim" for t in tests)]
    rows = []
    for arm in ordered(v.per_trial["arm"]):
        cells = [arm]
        for t in tests:
            diff, p, said = _claim_cells(t, arm)
            cells.append(diff if diff in ("reference", "–") else f"{diff}, p {p}, {said}")
        rows.append(cells)
    return Table(header, rows)


def power_table(test: MetricTest) -> Table | Paragraph:
    """Per arm: its paired spread, the smallest true difference the test detects at its seeds and at others,
    and the seeds that would decide an undecided arm (at the measured difference and spread)."""
    if not test.arms:
        return Paragraph.of(f"No power estimate: {test.note or 'no arm shares 2 seeds with the baseline'}.")
    counts = sorted({n for a in test.arms for n in a.mdd_by_seeds})
    header = ["arm", "seeds", "s.d. of paired differences", *(f"MDE at {n} seeds" for n in counts),
              "seeds to decide (at the measured Δ and s.d.)"]
    rows = []
    for a in test.arms:
        needed = "decided" if a.decided else (str(a.seeds_needed) if a.seeds_needed else "> 200")
        rows.append([a.arm, str(a.n), f"{a.sd:.3g}",
                     *(f"{a.mdd_by_seeds[n]:.3g}" if n in a.mdd_by_seeds else "–" for n in counts), needed])
    return Table(header, rows)


def power_paragraph(test: MetricTest) -> Paragraph:
    """How to read the power table: what the MDE is and what it is not."""
    return Paragraph.of(
        "Power of this test: the minimal detectable difference (MDE) is the true difference from "
        f"{test.baseline} that an arm's comparison detects with probability 0.8 at the family-wise α, from that "
        "comparison's own spread (no observed difference is taken as the truth). \"Seeds to decide\" projects the "
        "measured difference and spread: the seeds at which the arm would be called better, worse or equivalent "
        "with probability 0.8 (", code("--until-decided"), " adds seeds in stages until it is).")


def _looks_text(v: Verdict) -> str:
    looks = round(ALPHA / v.main.alpha) if v.main.alpha > 0 else 1
    return f", 0.05 split over {looks} planned looks of a staged run" if looks > 1 else ""


def claim_paragraph(v: Verdict) -> Paragraph:
    test = v.main
    if not test.arms:
        return Paragraph.of(f"No claim: {test.note or 'no arm to compare'}.")
    parts: list[str | Span] = []
    for word in ("better", "worse"):
        names = [a.arm for a in test.arms if a.claim.startswith(word)]
        if names:
            parts.append(f"{word.capitalize()} than {test.baseline} on {metric_label(test.metric)}: "
                         f"{', '.join(names)}. ")
    same = [a.arm for a in test.arms if a.claim.startswith("equivalent")]
    if same:
        parts.append(f"Equivalent to {test.baseline} within ±{test.margin:g}: {', '.join(same)}. ")
    if undecided := test.undecided():
        needs = [f"{a.arm} {a.seeds_needed}" if a.seeds_needed else f"{a.arm} > 200"
                 for a in test.arms if a.arm in undecided]
        parts.append(strong(f"Undecided: {', '.join(undecided)}"))
        parts.append(f" — neither separable from {test.baseline} nor shown equivalent within ±{test.margin:g}; "
                     f"seeds a decision would take at the measured difference and spread: {', '.join(needs)}.")
    return Paragraph.of(*parts)


def stability_table(v: Verdict) -> Table:
    rows = [[metric_label(str(m)), "yes" if s.defined else "no", f"{s.within_sd:.3g}", f"{s.between_sd:.3g}",
             f"{s.ratio:.3g}"] for m, s in v.stability.iterrows()]
    return Table(["candidate", "defined for every trial", "seed-to-seed s.d.", "between-arm s.d.", "ratio"], rows)


def counts_table(v: Verdict) -> Table:
    """Per arm and grid: settings selecting no feature and settings tying another (mean per trial)."""
    c = v.counts.merge(v.per_trial[["trial_id", "arm"]], on="trial_id")
    grids = [g for g in ("saebench", "extended") if g in set(c["grid"])]
    header = ["arm", *(f"{g}: {k} / settings" for g in grids for k in ("selecting none", "tied"))]
    rows = []
    for arm in ordered(c["arm"]):
        cells = [arm]
        for g in grids:
            sel = c[(c["arm"] == arm) & (c["grid"] == g)]
            n = f" / {sel['settings'].mean():.3g}" if len(sel) else ""
            cells += [f"{sel[k].astype(float).mean():.3g}{n}" if len(sel) else "–" for k in ("selecting_none", "tied")]
        rows.append(cells)
    return Table(header, rows)


def _upper_bounds(v: Verdict, grid: pd.DataFrame) -> str:
    """A note when some settings' retain accuracy is only an upper bound (retain questions were skipped)."""
    if "retain_acc_exact" not in grid:
        return ""
    rows = grid[(grid["control"] == "sae") & grid["trial_id"].isin(v.per_trial["trial_id"])]
    inexact = int(rows["retain_acc_exact"].astype("boolean").eq(False).fillna(False).sum())
    return (f"{inexact} setting(s) have retain accuracy as an upper bound (retain questions skipped): their "
            f"matched-retain values are optimistic." if inexact else "")


def bank_paragraph(v: Verdict, questions: pd.DataFrame | None, grid: pd.DataFrame) -> Paragraph:
    n_boot = next(iter(v.boot.samples.values())).shape[1]
    rule = ("Matched retain and frontier area choose each setting on select questions and report it on test "
            "questions. " if v.boot.select_test else
            "Questions carry no select/test role: settings are chosen and scored on the same questions "
            "(optimistic). ")
    parts: list[str | Span] = [
        f"Cells: mean ± 95% CI over seeds; in brackets the 95% interval of that mean over {n_boot} bootstrap "
        f"resamples of the {v.boot.n_forget} forget and {v.boot.n_retain} retain questions (question noise "
        f"only). Lower forget accuracy = more removed. " + rule]
    if note := _upper_bounds(v, grid):
        parts.append(strong(note))
    if questions is not None and v.bank is not None and "bank" in questions:
        questions = questions[questions["bank"].astype(str) == v.bank]
    if questions is not None and "domain" in questions:
        n = questions["domain"].value_counts()
        if (n.get("forget", 0), n.get("retain", 0)) != (v.boot.n_forget, v.boot.n_retain):
            parts.append(strong(f" questions.parquet holds {n.get('forget', 0)} forget / {n.get('retain', 0)} "
                                f"retain questions, the grid's outcomes another count."))
    excluded = [f"{t} ({why})" for t, why in v.excluded.items()]
    if excluded:
        parts.append(" Not in the verdict: " + ", ".join(excluded) + ".")
    parts += [strong(f" Mismatch: {m}.") for m in v.mismatches]
    return Paragraph.of(*parts)


def verdict_blocks(v: Verdict, main: pd.DataFrame, grid: pd.DataFrame, questions: pd.DataFrame | None,
                   problems: list[str]) -> list[Block]:
    """The verdict after its figure: the matched-retain table with the headline's claims (only when the
    controls are in range), the test's power, the secondary metrics, the exploratory spread table and the
    no-feature/tie counts."""
    claims = not problems
    blocks: list[Block] = [Heading(2, "Verdict: forget accuracy at matched retain" if claims else
                                   "Diagnostics (controls out of range — not results): forget accuracy at matched "
                                   "retain"),
                           matched_table(v, main, grid, claims), bank_paragraph(v, questions, grid)]
    if claims:
        blocks += [Paragraph.of(strong(f"Headline metric (declared before the run): {metric_label(v.headline)}"),
                                f". Claims: each arm against {v.baseline} by its own paired differences over the "
                                f"seeds (a seed is a block), Bonferroni over the {v.main.family} comparisons "
                                f"(family-wise α = {v.main.alpha:.3g}{_looks_text(v)}); equivalent when the "
                                f"two-one-sided-tests interval lies within the declared margin ±{v.main.margin:g} "
                                f"(profile field ", code("equivalence_margin"), "; docs/evaluation.md)."),
                   claim_paragraph(v), power_paragraph(v.main), power_table(v.main)]
        secondary = secondary_table(v)
        if secondary is not None:
            blocks += [Heading(3, "Secondary metrics (descriptive: the same intervals, no claim is made on them)"),
                       secondary]
        blocks += [Heading(3, "Exploratory: spread of each candidate (chooses nothing)"), stability_table(v)]
    return blocks + [Heading(3, "Settings that select no feature / tie another"), counts_table(v)]


# -- the second witness: k-sparse probing ---------------------------------------------------------
CLAIM_WORDS = ("better", "worse", "equivalent", "undecided")
DIRECTIONS = ("better", "worse")
DESCRIPTIVE_NOTE = "(descriptive)"


def claim_word(said: str | None) -> str:
    """'better' / 'worse' / 'equivalent' / 'undecided' from a claim text; '' when there is none (not tested)."""
    said = said or ""
    return next((w for w in CLAIM_WORDS if said.startswith(w)), "")


def witness_text(result: ArmResult | None, claimed: bool, higher_is_better: bool, baseline: str) -> str | None:
    """The probe's word on one arm: its claim, or (not a claim) the side of 0 its interval lies on."""
    if result is None or claimed:
        return result and result.claim
    return f"{claim(result.lo, result.hi, higher_is_better, result.n, baseline)} {DESCRIPTIVE_NOTE}"


def agreement(unlearning: str | None, probe: str | None, baseline: str = "relu") -> str:
    """Whether the two witnesses agree on one arm: the same word from both, a direction the other witness does
    not confirm, or a conflict (opposite directions, reported as such)."""
    u, p = claim_word(unlearning), claim_word(probe)
    if not u or not p:
        return f"no agreement to read (unlearning: {unlearning or 'not tested'}; probe: {probe or 'not tested'})"
    if u == p:
        note = " (the probe's side of 0 is descriptive)" if (probe or "").endswith(DESCRIPTIVE_NOTE) else ""
        return f"the witnesses agree: both {u}" + (f" than {baseline}" if u in DIRECTIONS else "") + note
    if u in DIRECTIONS and p in DIRECTIONS:
        return (f"in conflict: unlearning says {unlearning}, the probe says {probe}: the claim is contradicted by "
                f"the second witness")
    if u not in DIRECTIONS and p not in DIRECTIONS:
        return f"neither witness separates it from {baseline} (unlearning: {unlearning}; probe: {probe})"
    said, by, other = (unlearning, "unlearning", "the probe") if u in DIRECTIONS else (probe, "the probe", "unlearning")
    return f"unconfirmed: {by} says {said}, {other} does not separate it from {baseline}"


def _probe_cells(g: pd.DataFrame) -> list[str]:
    """An arm's probe accuracies (mean ± 95% CI over seeds): mean and forget task per k, floor, ceiling."""
    def cell(col: str) -> str:
        return fmt(g[col].dropna().astype(float).tolist()) if col in g else "–"

    floor = " / ".join(cell(f"sparse_probe_random_mean_k{k}") for k in (1, 20))
    ceiling = f"{cell('sparse_probe_raw_mean')} / {cell('sparse_probe_raw_forget')}"
    return [*(cell(f"sparse_probe_{task}_k{k}") for task in ("mean", "forget") for k in PROBE_KS), floor, ceiling]


def probe_table(main: pd.DataFrame, test: MetricTest | None) -> Table:
    """One row per arm of the ranked trials: the probe accuracies and (with ``test``) the primary's claim."""
    header = ["arm", "n", *(f"mean over tasks k={k}" for k in PROBE_KS), *(f"forget task k={k}" for k in PROBE_KS),
              "random-latent floor (mean, k=1 / k=20)", "raw-activation ceiling (mean / forget)"]
    if test is not None:
        header += [f"Δ vs {test.baseline} ({metric_label(test.metric)}, the witness's primary) [adjusted 95% CI]",
                   "adjusted p", "claim"]
    arms = arm_names(main)
    rows = []
    for arm in ordered(arms):
        g = main[arms == arm]
        probed = PROBE_PRIMARY in g and g[PROBE_PRIMARY].notna().any()
        cells = [arm, str(len(g)), *(_probe_cells(g) if probed else [NO_PROBE] + ["–"] * 9)]
        rows.append(cells + (_claim_cells(test, arm) if test is not None else []))
    return _mark(Table(header, rows), len(header) - 1) if test is not None else Table(header, rows)


def agreement_blocks(v: Verdict, test: MetricTest, main: pd.DataFrame) -> list[Block]:
    """One line per arm: do the unlearning headline's claim and the probe primary's claim agree?"""
    arms = arm_names(main)
    out: list[Block] = []
    for arm in ordered(arms):
        if arm == v.baseline:
            continue
        g = main[arms == arm]
        if PROBE_PRIMARY not in g or g[PROBE_PRIMARY].isna().all():
            out.append(Paragraph.of(strong(arm), f": {NO_PROBE}: only the unlearning witness speaks."))
            continue
        u, p = (t.by_arm().get(arm) for t in (v.main, test))
        probe = witness_text(p, test.claimed, test.higher_is_better, v.baseline)
        out.append(Paragraph.of(strong(arm), ": " + agreement(u and u.claim, probe, v.baseline) + "."))
    return out


def probe_blocks(inp: ReportInputs) -> list[Block]:
    """The 'Second witness' section: the probe table per arm, its primary metric's claims through the same
    test (a secondary metric of the verdict) and one agreement line per arm. Nothing without probe columns."""
    main = inp.main
    if not any(c in main for c in PROBE_METRICS) or main.empty:
        return []
    v = inp.verdict
    claims = not inp.problems and isinstance(v, Verdict)
    test = next((t for t in v.tests if t.metric == PROBE_PRIMARY), None) if claims else None
    blocks: list[Block] = [
        Heading(2, "Second witness: k-sparse probing"),
        Paragraph.of("Balanced accuracy of a logistic probe on the k latents with the largest class-mean difference "
                     "(chosen and fitted on select documents, scored on test documents; docs/evaluation.md, \"Second "
                     "witness\"). Cells: mean ± 95% CI over seeds. The witness's primary metric: ",
                     strong(metric_label(PROBE_PRIMARY)), ", tested against "
                     f"{v.baseline if isinstance(v, Verdict) else 'relu'} as the headline is; it is worded as a claim "
                     "only when the headline decided every arm better or worse, else it is descriptive."),
        probe_table(main, test)]
    if test is not None:
        blocks += [Heading(3, "Do the two witnesses agree?")] + agreement_blocks(v, test, main)
    elif not inp.probes:
        blocks.append(Paragraph.of(f"Every ranked trial: {NO_PROBE}."))
    return blocks


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
                         "0): at few seeds the paired s.d. is itself noisy, or question effects common to every seed "
                         "move the mean difference without moving the paired s.d. ")
        # What an unlimited bank would buy, over the arms whose split can be read (not flagged).
        read = [s for s in head.splits if not s.question_exceeds and math.isfinite(s.question_share)]
        now = _median([s.mdd for s in read if math.isfinite(s.mdd)])
        floor = _median([s.mdd_seed_only for s in read if math.isfinite(s.mdd_seed_only)])
        mde = (f"the median MDE at the run's seeds would fall from {_number(now)} to {_number(floor)} with no "
               f"question noise at all" if math.isfinite(now) and math.isfinite(floor) else "")
        if pooled >= 0.5:
            parts += [strong("Question noise dominates"), ": more questions (a larger bank, or per-question outcomes "
                      "that carry more than right or wrong) would shrink the differences' spread at the same seeds"
                      + (f" — {mde}" if mde else "") + "; more seeds shrink both parts alike. "]
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
            "seed. The test's variance of the mean difference over the seeds is the paired s.d.² / n (its s.d. "
            f"below); the question part is the variance of that same mean difference over the verdict's {n_boot} "
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
            diff, p, said = _claim_cells(test, line)
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
        cells = [arm, seeds, mean, *_claim_cells(head, arm)]
        if av.versus_relu is not None:
            cells += _claim_cells(av.versus_relu, arm)
        if witness:
            cells.append(probe.get(arm, ("–", "0"))[0])
        rows.append(cells)
    table = _mark(Table(header, rows), 5)
    return _mark(table, 8) if av.versus_relu is not None else table


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
          f"{head.alpha / av.family:.2g}), each by its own paired differences over the seeds; equivalence within "
          f"±{head.margin:g}. The second witness is shown beside it, descriptive. "]
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
