"""The report's sections for the second witness (k-sparse probing), external arms and the sparsity frontier,
each on small planted results with known answers (the frames of tests/test_verdict.py)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from tests.test_verdict import CURVES, NOISE, RETAINS, SEEDS, grid_frame, grid_rows, planted_study, write_results
from tune.report import build_report
from tune.report_analyses import NOISE_HEADING
from tune.report_blocks import NO_PROBE, agreement
from tune.report_data import PROBE_PRIMARY, ReportInputs, ordered, report_variants

N_BOOT = 50
# Planted probe accuracy (mean over tasks, k = 1) per variant: fixed_ortho far above relu, adaptive_ortho relu's twin.
PROBE = {"relu": 0.70, "fixed_ortho": 0.90, "adaptive_ortho": 0.70}
PROBE_NOISE = {42: 0.01, 43: -0.01, 44: 0.0}


def set_columns(root, **columns) -> pd.DataFrame:
    """Write per-trial values (functions of the row) into trials.parquet; return the new frame."""
    trials = pd.read_parquet(root / "trials.parquet")
    for name, fn in columns.items():
        trials[name] = [fn(r) for r in trials.itertuples()]
    trials.to_parquet(root / "trials.parquet", index=False)
    return trials


def with_probe(root, probe: dict[str, float]) -> None:
    """Probe columns on every completed trial: the planted mean k=1 (the other k and tasks near it)."""
    def value(k_shift: float):
        return lambda r: probe[r.variant] + PROBE_NOISE[r.seed] + k_shift if r.status == "completed" else None

    set_columns(root, **{f"sparse_probe_mean_k{k}": value(0.01 * i) for i, k in enumerate((1, 2, 5, 20))},
                **{f"sparse_probe_forget_k{k}": value(0.02 * i) for i, k in enumerate((1, 2, 5, 20))},
                **{f"sparse_probe_random_mean_k{k}": value(-0.15) for k in (1, 2, 5, 20)},
                sparse_probe_raw_mean=lambda r: 0.97, sparse_probe_raw_forget=lambda r: 0.98)


def report_text(root) -> str:
    return build_report(root, n_boot=N_BOOT).read_text()


def section(text: str, heading: str) -> str:
    """The Markdown between ``## heading`` and the next level-2 heading."""
    start = text.index(f"## {heading}")
    end = text.find("\n## ", start + 3)
    return text[start:end if end >= 0 else None]


def table_row(text: str, arm: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| {arm} |"))


# -- 1. the second witness ------------------------------------------------------------------------
def test_agreement_names_both_witnesses_and_reports_a_contradiction():
    assert agreement("better than relu", "better than relu") == "the witnesses agree: both better than relu"
    assert agreement("worse than relu", "worse than relu") == "the witnesses agree: both worse than relu"
    assert agreement("undecided", "undecided (needs ≥ 2 seeds)") == "the witnesses agree: both undecided"
    assert agreement("better than relu", "better than relu (descriptive)") == (
        "the witnesses agree: both better than relu (the probe's side of 0 is descriptive)")
    assert agreement("better than relu", "undecided").startswith("unconfirmed: unlearning says better")
    assert agreement("undecided", "worse than relu").startswith("unconfirmed: the probe says worse")
    assert agreement("equivalent to relu (±0.05)", "worse than relu").startswith("unconfirmed: the probe says worse")
    assert agreement("equivalent to relu (±0.05)", "undecided").startswith("neither witness separates it")
    conflict = agreement("better than relu", "worse than relu")
    assert conflict.startswith("in conflict") and "contradicted" in conflict
    assert agreement("better than relu", None).startswith("no agreement to read")


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """Planted results (relu, fixed_ortho better on both witnesses, adaptive_ortho relu's twin) and the report."""
    root = write_results(tmp_path_factory.mktemp("probe") / "r", planted_study(np.random.default_rng(7)))
    with_probe(root, PROBE)
    return root, report_text(root)


def test_the_second_witness_has_its_table_claims_and_agreement_lines(probed):
    root, text = probed
    body = section(text, "Second witness: k-sparse probing")
    assert "the witness's primary" in body and "probe accuracy, mean over tasks, k=1" in body
    fixed = table_row(body, "fixed_ortho")
    # adaptive_ortho is undecided on the headline, so the gate is shut: the probe's numbers, no claim.
    assert "descriptive (not a claim)" in fixed and "+0.2 [" in fixed and "0.96" in fixed  # ceiling: raw mean 0.97
    assert "better than relu" not in fixed and "descriptive (not a claim)" in table_row(body, "adaptive_ortho")
    assert ("**fixed_ortho**: the witnesses agree: both better than relu (the probe's side of 0 is descriptive)."
            in body)
    assert "**adaptive_ortho**: the witnesses agree: both undecided (the probe's side of 0 is descriptive)." in body
    # The probe metrics went through the verdict's test, the primary as the gated witness.
    v = ReportInputs.load(root, N_BOOT).verdict
    test = next(t for t in v.tests if t.metric == PROBE_PRIMARY)
    assert test.role == "witness" and not test.claimed and test.by_arm()["fixed_ortho"].lo > 0
    assert "probe accuracy, forget task, k=1" in section(text, "Verdict")
    assert "Second witness: k-sparse probing" in (root / "report" / "report.html").read_text()


def test_the_witness_speaks_when_the_headline_decides_every_arm(tmp_path):
    trials, grid = planted_study(np.random.default_rng(7))
    keep = trials["variant"] != "adaptive_ortho"
    root = write_results(tmp_path / "r", (trials[keep], grid[grid["trial_id"].isin(trials.loc[keep, "trial_id"]) |
                                                            (grid["control"] == "positive")]))
    with_probe(root, PROBE)
    body = section(report_text(root), "Second witness: k-sparse probing")
    assert "better than relu" in table_row(body, "fixed_ortho") and "descriptive" not in table_row(body, "fixed_ortho")
    assert "**fixed_ortho**: the witnesses agree: both better than relu." in body


def test_a_claim_the_probe_contradicts_is_reported_as_a_conflict(tmp_path):
    root = write_results(tmp_path / "r", planted_study(np.random.default_rng(7)))
    with_probe(root, {**PROBE, "fixed_ortho": 0.50})  # the probe says fixed_ortho is worse than relu
    body = section(report_text(root), "Second witness: k-sparse probing")
    line = next(s for s in body.splitlines() if s.startswith("**fixed_ortho**"))
    assert "in conflict: unlearning says better than relu, the probe says worse than relu" in line


def test_null_probe_columns_render_as_no_probe(tmp_path):
    root = write_results(tmp_path / "r", planted_study(np.random.default_rng(7)))  # probe columns all null
    body = section(report_text(root), "Second witness: k-sparse probing")
    assert table_row(body, "relu").startswith(f"| relu | 3 | {NO_PROBE} |")
    assert f"Every ranked trial: {NO_PROBE}." in body


# -- where the noise comes from (hsae/noise.py) ------------------------------------------------------------
def test_the_noise_section_splits_each_tested_metric_headline_first(probed):
    root, text = probed
    body = section(text, NOISE_HEADING)
    noise = ReportInputs.load(root, N_BOOT).noise
    assert [m.metric for m in noise][:2] == ["frontier_area", "forget_acc_at_retain99"]  # the verdict's order
    headings = [line for line in body.splitlines() if line.startswith("### ")]
    assert headings[0] == "### frontier area (retain 0.9–1) (headline)"
    assert len(headings) == len([m for m in noise if m.splits])  # a metric no arm is tested on has no table
    assert "### probe accuracy, mean over tasks, k=1 (second witness)" in headings
    head = noise[0].by_arm()
    for arm in ("fixed_ortho", "adaptive_ortho"):  # each row is the computed split, as the report words it
        s = head[arm]
        row = table_row(body, arm)
        assert row.startswith(f"| {arm} | 3 | {s.diff + 0.0:+.3g} | {s.total_sd:.3g} | {100 * s.question_share:.0f}% (")
        assert f"| {s.mdd:.3g} |" in row and math.isfinite(s.question_share)
    assert table_row(body, "fixed_ortho").endswith("| decided |")  # fixed_ortho is better on the headline
    undecided = head["adaptive_ortho"]
    assert table_row(body, "adaptive_ortho").endswith(
        f"| {undecided.seeds_needed if undecided.seeds_needed else '> 200'} |")
    # The probe's accuracies are not scored on the question bank: the total only, said so.
    probe = body[body.index("### probe accuracy, mean over tasks, k=1"):]
    probe = probe[:probe.find("\n### ", 4) if "\n### " in probe[4:] else None]
    assert "No question resamples" in probe and "No question resamples" not in body[:body.index("### probe")]
    pooled, shares = noise[0].pooled_share(), noise[0].shares()
    assert (f"On the headline (frontier area (retain 0.9–1)), question sampling is {100 * pooled:.0f}% of the "
            f"variance of the arms' mean differences from relu, pooled over the arms (one arm's share: "
            f"{100 * min(shares):.0f}%–{100 * max(shares):.0f}%)") in body
    assert "Seeds a decision would take at the measured difference and spread: adaptive_ortho" in body
    page = (root / "report" / "report.html").read_text()
    assert f"<h2>{NOISE_HEADING}</h2>" in page and page.index(NOISE_HEADING) > page.index("Second witness")
    assert text.index(f"## {NOISE_HEADING}") > text.index("## Second witness")


def test_no_noise_section_when_the_controls_are_out_of_range(tmp_path):
    root = write_results(tmp_path / "r", planted_study(np.random.default_rng(7)), positive=0.1)
    text = report_text(root)
    assert NOISE_HEADING not in text and NOISE_HEADING not in (root / "report" / "report.html").read_text()


# -- 2. external arms ---------------------------------------------------------------------------
def test_an_external_arm_is_one_arm_paired_by_seed_ranked_and_claimed(tmp_path):
    trials, grid = planted_study(np.random.default_rng(7))
    trials = trials[trials["variant"] != "adaptive_ortho"]
    external = trials["variant"] == "fixed_ortho"  # SAEs trained elsewhere that remove far more than relu
    trials.loc[external, "variant"] = "external:mine"
    root = write_results(tmp_path / "r", (trials, grid[grid["trial_id"].isin(trials["trial_id"]) |
                                                       (grid["control"] == "positive")]))
    is_ext = lambda r: r.variant.startswith("external:")  # noqa: E731
    set_columns(root, converged=lambda r: None if is_ext(r) else True, val_mse_rel_change=lambda r: None
                if is_ext(r) else 0.0, source=lambda r: "folder" if is_ext(r) else None,
                source_path=lambda r: f"/saes/{r.seed}" if is_ext(r) else None,
                cfg_l1_coeff=lambda r: None if is_ext(r) else 0.1, cfg_steps=lambda r: None if is_ext(r) else 200)
    v = ReportInputs.load(root, N_BOOT).verdict
    assert sorted(set(v.per_trial["arm"])) == ["external:mine", "relu"]  # one arm, not split by params
    result = v.main.by_arm()["external:mine"]
    assert result.claim == "better than relu" and result.seeds == SEEDS  # paired with relu's seeds 42..44
    text = report_text(root)
    verdict = section(text, "Verdict")
    assert "better than relu" in table_row(verdict, "external:mine")
    assert verdict.index("| relu |") < verdict.index("| external:mine |")
    assert "– (external: no training)" in table_row(section(text, "Convergence"), "external:mine")
    assert "Unconverged" not in text
    assert report_variants(["external:mine", "topk", "relu"]) == ["relu", "topk", "external:mine"]
    assert ordered(["external:a", "relu_aa1", "fixed_ortho", "relu"]) == ["relu", "fixed_ortho", "relu_aa1",
                                                                          "external:a"]


# -- 3. the sparsity frontier -------------------------------------------------------------------
TARGETS = (16, 64)


def frontier_study(rng: np.random.Generator, targets=TARGETS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """relu and fixed_ortho (which removes far more) at each target L0, three seeds each, with controls."""
    trials, rows = [], []
    for target in targets:
        for variant in ("relu", "fixed_ortho"):
            for seed in SEEDS:
                tid = f"{variant}-t{target}-{seed}"
                noise = NOISE[seed] if variant != "relu" else -NOISE[seed] / 2
                points = [(min(1.0, f + noise), r) for f, r in zip(CURVES[variant], RETAINS, strict=True)]
                rows += grid_rows(tid, points, rng)
                rows += grid_rows(tid, [(1.0, 1.0), (0.9, 0.95)], rng, control="random")
                trials.append({"trial_id": tid, "variant": variant, "seed": seed, "status": "completed",
                               "target": target})
    rows += grid_rows("positive-control", [(0.9, 1.0), (0.3, 0.95)], rng, control="positive")
    return pd.DataFrame(trials), grid_frame(rows)


def write_frontier(root, targets=TARGETS):
    trials, grid = frontier_study(np.random.default_rng(3), targets)
    write_results(root, (trials, grid))
    target = dict(zip(trials["trial_id"], trials["target"], strict=True))
    return set_columns(root, space=lambda r: "frontier", cfg_target_l0=lambda r: target[r.trial_id],
                       l0=lambda r: target[r.trial_id] * (1.02 if r.seed != 44 else 0.9),
                       l0_target_met=lambda r: r.seed != 44,
                       explained_variance=lambda r: 0.6 + target[r.trial_id] / 400,
                       ce_score_retain=lambda r: 0.8 + target[r.trial_id] / 1000, dead_fraction=lambda r: 0.004,
                       revived_latents=lambda r: 12, plateau_rel_change=lambda r: -0.01,
                       steps=lambda r: 6000 if r.seed == 43 else 4500, extensions=lambda r: int(r.seed == 43),
                       sparse_probe_mean_k1=lambda r: PROBE[r.variant] + PROBE_NOISE[r.seed])


def test_the_sparsity_frontier_shows_every_metric_against_l0_and_the_verdict_at_each_target(tmp_path):
    root = tmp_path / "r"
    write_frontier(root)
    inp = ReportInputs.load(root, N_BOOT)
    assert sorted(inp.frontier) == [16.0, 64.0]
    for v in inp.frontier.values():  # within one target the arms are the variants, relu the baseline
        assert sorted(set(v.per_trial["arm"])) == ["fixed_ortho", "relu"]
        assert v.main.by_arm()["fixed_ortho"].claim == "better than relu"
    text = report_text(root)
    body = section(text, "Sparsity frontier: every metric against held-out L0")
    assert "![Sparsity frontier](sparsity_frontier.png)" in body
    assert (root / "report" / "sparsity_frontier.png").stat().st_size > 5000
    rows = [line for line in body.splitlines() if line.startswith("| fixed_ortho |")]
    assert [r.count("better than relu") for r in rows] == [2, 2]  # headline, then probe: at each target
    assert "target L0 16" in body and "target L0 64" in body and "(second witness)" in body
    page = (root / "report" / "report.html").read_text()
    assert 'id="fig-frontier"' in page and "Sparsity frontier" in page
    health = section(text, "Convergence")
    assert "| target L0 | held-out L0 | within ±5% of target | dead | revived latents |" in health
    assert table_row(health, "relu[target_l0=16]").endswith(
        "| 4,500 … 6,000 (1 extended) | 16 | 15.7 ± 2.8 | 2/3 | 0.004 ± 0 | 12 |")


def test_one_target_l0_gives_no_frontier_section(tmp_path):
    root = tmp_path / "r"
    write_frontier(root, targets=(32,))
    assert ReportInputs.load(root, N_BOOT).frontier == {}
    text = report_text(root)
    assert "Sparsity frontier" not in text and not (root / "report" / "sparsity_frontier.png").exists()


# -- 4. the exploratory report: a diagnostic over unconverged trials, labelled, never the default -----------
def test_an_exploratory_report_ranks_unconverged_trials_and_says_so_at_the_top(tmp_path):
    study = planted_study(np.random.default_rng(0))
    write_results(tmp_path, study, unconverged=set(study[0]["trial_id"]))  # nothing converged
    honest = build_report(tmp_path, n_boot=N_BOOT).read_text()
    assert "No verdict: no converged, completed trial: nothing is ranked" in honest
    assert "EXPLORATORY" not in honest
    path = build_report(tmp_path, n_boot=N_BOOT, exploratory=True)
    assert path.parent.name == "report-exploratory"  # the honest report is not overwritten
    text = path.read_text()
    assert text.index("EXPLORATORY, not a result:") < text.index("## Verdict")
    assert "better than relu" in table_row(section(text, "Verdict"), "fixed_ortho")
