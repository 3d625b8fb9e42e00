"""What report.md (tune/report.py) and report.html (tune/report_html.py) both show, as format-free blocks.

``header_blocks``, ``banner_blocks``, ``controls_blocks``, ``verdict_blocks`` and ``probe_blocks`` turn the inputs
of ``tune/report_data.py`` (the verdict computed once) into headings, paragraphs of styled spans and tables that each
rendering writes in its own format; the analyses beside the verdict (noise split, frontier, ablations, budget check)
are ``tune/report_analyses.py``'s, in the same block types. Neither rendering is imported here; both import this
module (nothing is imported back).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from hsae.scoring import BARS, FOLDS, bar_metric, grid_metrics, mean_interval
from hsae.stats import mean_ci95
from hsae.verdict import (
    ALPHA,
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


def claim_cells(test: MetricTest, arm: str) -> list[str]:
    """Δ vs relu [simultaneous CI], adjusted p and the claim (or "descriptive") of one arm on one metric."""
    if arm == test.baseline:
        return ["reference", "—", "—"]
    if arm in test.untested:
        return ["–", "–", f"not tested ({test.untested[arm]})"]
    r = test.by_arm().get(arm)
    if r is None:
        return ["–", "–", "not tested"]
    return [f"{r.diff:+.3g} {interval_text(r.lo, r.hi, True)} (n={r.n})", p_text(r.p_adj), r.claim]


def mark_column(table: Table, column: int) -> Table:
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
        rows.append(cells + (claim_cells(v.main, arm) if claims else []))
    return mark_column(Table(header, rows), len(header) - 1) if claims else Table(header, rows)


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
            diff, p, said = claim_cells(t, arm)
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
    rule = ("Questions carry no select/test role: settings are chosen and scored on the same questions "
            "(optimistic). " if not v.boot.select_test else
            "Matched retain and frontier area are cross-fitted: fold A chooses its features on select documents and "
            "its setting on select questions and is scored on test questions, fold B the reverse, and each value is "
            "the mean of both. " if v.boot.reported == FOLDS else
            "Matched retain and frontier area choose each setting on select questions and report it on test "
            "questions (fold A alone: not every trial's grid has a fold B of its own; such grids were evaluated before "
            "cross-fitting). ")
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
                                f"seeds (a seed is a block) and the variance the seeds share through the one bank "
                                f"of questions (from the question resamples), Bonferroni over the {v.main.family} "
                                f"comparisons "
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
        rows.append(cells + (claim_cells(test, arm) if test is not None else []))
    return mark_column(Table(header, rows), len(header) - 1) if test is not None else Table(header, rows)


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
