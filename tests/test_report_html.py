"""report.html (tune/report_html.py): built from planted results, opened in headless Chromium, figures counted.

The page must render without a console error, draw every figure with as many traces as the data calls for,
and need no network. Missing inputs leave a one-line note instead of a section, never an exception.
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.test_verdict import planted_study, write_results
from tune.report import build_report
from tune.report_html import PARCOORDS_METRICS, write_html

UNCONVERGED = "adaptive_ortho-44"  # completed but not converged: in the table and curves, not in the verdict figure
# WebGL performance notes that Chromium's software GL prints through the console (parcoords reads pixels back to
# pick lines); the page did not log them, so they are not errors of the page. Everything else counts.
BENIGN = re.compile(r"GL Driver Message \(OpenGL, Performance")


# -- planted results ----------------------------------------------------------------------------
def add_training_data(root: Path) -> pd.DataFrame:
    """Give the planted trials what a sweep writes besides the verdict: varying cfg_* columns, val_mse, curves."""
    trials = pd.read_parquet(root / "trials.parquet")
    done = trials["status"] == "completed"
    trials["cfg_variant"] = trials["variant"]
    trials["cfg_steps"] = 200  # the same for every trial: not a parcoords axis
    trials["cfg_l1_coeff"] = trials["variant"].map({"relu": 1e-3, "fixed_ortho": 2e-3, "adaptive_ortho": 3e-3})
    trials["val_mse"] = np.where(done, 0.1 + 0.01 * (trials["seed"] % 3), np.nan)
    trials.to_parquet(root / "trials.parquet", index=False)
    rows = []
    for t in trials[done].itertuples():
        for step in range(0, 250, 50):
            rows.append({"experiment": t.experiment, "trial_id": t.trial_id, "variant": t.variant, "step": step,
                         "loss": 1.0 / (1 + step), "val_mse": np.nan if step == 0 else 0.5 / (1 + step)})
    pd.DataFrame(rows).to_parquet(root / "curves.parquet", index=False)
    return trials


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, pd.DataFrame, pd.DataFrame]:
    """A results directory (3 variants x 3 seeds, a failed trial, one unconverged), its report, trials, grid."""
    study = planted_study(np.random.default_rng(7))
    root = write_results(tmp_path_factory.mktemp("html") / "r", study, unconverged=(UNCONVERGED,))
    trials = add_training_data(root)
    build_report(root, n_boot=100)
    return root, trials, study[1]


# -- what the page should hold, from the data ---------------------------------------------------
def expected_scatter_traces(trials: pd.DataFrame, grid: pd.DataFrame) -> int:
    """Each converged seed with grid rows: its points and frontier; each variant: random and positive controls."""
    ranked = trials[(trials["status"] == "completed") & trials["converged"].astype(bool)]
    ranked = ranked[ranked["trial_id"].isin(grid.loc[grid["control"] == "sae", "trial_id"])]
    n = 2 * len(ranked)
    for _, group in ranked.groupby("variant"):
        n += int(grid.loc[grid["control"] == "random", "trial_id"].isin(group["trial_id"]).any())
        n += int((grid["control"] == "positive").any())
    return n


def expected_curve_traces(trials: pd.DataFrame, curves: pd.DataFrame) -> int:
    """One line per completed trial per metric (loss, held-out MSE) that has a value."""
    c = curves[curves["trial_id"].isin(trials.loc[trials["status"] == "completed", "trial_id"])]
    return sum(int(c.dropna(subset=[m]).groupby("trial_id").ngroups) for m in ("loss", "val_mse"))


def expected_axes(trials: pd.DataFrame) -> int:
    """variant, the cfg_* columns whose values differ (not cfg_variant), seed, the metrics with no gaps."""
    done = trials[trials["status"] == "completed"]
    cfg = [c for c in done if c.startswith("cfg_") and c != "cfg_variant" and done[c].dropna().nunique() > 1]
    return 2 + len(cfg) + sum(m in done and done[m].notna().all() for m in PARCOORDS_METRICS)


# -- headless Chromium ----------------------------------------------------------------------------
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("chromium not found: `apt-get install chromium` (CI installs it); report.html is checked in it")
    return path


def render(page: Path, profile: Path) -> tuple[str, str]:
    """(DOM after the scripts ran, Chromium's stderr) for ``page`` opened headless with its console logged."""
    # --enable-unsafe-swiftshader: WebGL (parcoords) on the software renderer without a deprecation warning.
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader",
           "--enable-logging=stderr", "--v=0",
           f"--user-data-dir={profile}", "--window-size=1400,2000", "--virtual-time-budget=15000", "--dump-dom",
           page.resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, done.stderr


def console_errors(stderr: str) -> list[str]:
    """Console lines of the page (Chromium logs every level, uncaught exceptions included, as CONSOLE)."""
    return [line for line in stderr.splitlines() if "CONSOLE" in line and not BENIGN.search(line)]


class PlotCounter(HTMLParser):
    """Per rendered plotly div (by id): its scatter traces, parcoords blocks and parcoords axes."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, Counter] = {}
        self.current: str | None = None
        self.depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        if tag == "div" and self.current is not None:
            self.depth += 1
        elif tag == "div" and "js-plotly-plot" in classes:
            self.current, self.depth = a.get("id") or "?", 1
            self.counts[self.current] = Counter()
        if self.current is not None:
            self.counts[self.current].update(name for name, need in (("scatter", {"trace", "scatter"}),
                                             ("parcoords", {"parcoords"}), ("axis", {"y-axis"})) if need <= classes)

    def handle_endtag(self, tag: str) -> None:
        if tag == "div" and self.current is not None:
            self.depth -= 1
            if self.depth == 0:
                self.current = None


def plots(dom: str) -> dict[str, Counter]:
    counter = PlotCounter()
    counter.feed(dom)
    return counter.counts


# -- tests ----------------------------------------------------------------------------------------
def test_report_html_renders_every_figure_without_console_errors(planted, tmp_path):
    root, trials, grid = planted
    page = root / "report" / "report.html"
    dom, stderr = render(page, tmp_path / "profile")
    assert console_errors(stderr) == []
    found = plots(dom)
    assert set(found) == {"fig-forget-retain", "fig-parcoords", "fig-curves"}
    assert found["fig-forget-retain"]["scatter"] == expected_scatter_traces(trials, grid) > 0
    assert found["fig-curves"]["scatter"] == expected_curve_traces(trials, pd.read_parquet(root / "curves.parquet"))
    assert found["fig-parcoords"]["parcoords"] == 1
    assert found["fig-parcoords"]["axis"] == expected_axes(trials) == 2 + 1 + 5  # + cfg_l1_coeff, 5 metrics


def test_console_error_detector_catches_a_broken_page(tmp_path):
    broken = tmp_path / "broken.html"  # small, so the proof costs a second, not the 5 MB page's four
    broken.write_text('<!DOCTYPE html><html><body><div id="x"></div><script>window.notAFunction();</script>'
                      "</body></html>")
    _, stderr = render(broken, tmp_path / "profile")
    assert any("Uncaught TypeError" in line for line in console_errors(stderr))


def test_report_html_is_self_contained_and_leads_with_the_verdict(planted):
    root, _, _ = planted
    text = (root / "report" / "report.html").read_text()
    assert not re.search(r"<script[^>]*\bsrc\s*=", text, re.I)  # no script from anywhere, http(s) or not
    assert not re.search(r"""<(link|img)[^>]*\b(href|src)\s*=\s*["']?https?:""", text, re.I)
    assert len(re.findall(r"\* plotly\.js v\d", text)) == 1  # plotly.js inlined once, not per figure
    order = ["<h1>hsae ablation report</h1>", "Evaluation controls", "<h2>Verdict: forget accuracy at matched",
             'id="fig-forget-retain"', 'id="fig-parcoords"', 'id="fig-curves"', "<h2>Trials (10)</h2>"]
    assert [text.index(s) for s in order] == sorted(text.index(s) for s in order)
    assert '<td>fixed_ortho</td>' in text and '<td class="better">better than relu</td>' in text
    body = text.split("</head>")[1]
    assert "|---|" not in body and "**" not in body  # the Markdown became HTML
    assert "relu-42 (seed 42)" in text and "multiplier=" in text and "features_selected=" in text  # hover text


def degrade(root: Path, how: str) -> None:
    """Take from a results directory what older or smaller results lack."""
    trials = pd.read_parquet(root / "trials.parquet")
    if how == "single trial":
        trials = trials[trials["trial_id"] == "relu-42"]
    if how in ("no evaluation", "single trial"):
        trials = trials.drop(columns=[c for c in trials if c.startswith(("forget_acc", "unlearning", "controls_ok"))])
        shutil.rmtree(root / "controls")
    trials.to_parquet(root / "trials.parquet", index=False)
    if how == "interrupted before a trial finished":  # what the sweep consolidates then: no rows, untyped curves
        trials.iloc[:0].to_parquet(root / "trials.parquet", index=False)
        pd.DataFrame({c: pd.Series(dtype=float) for c in ("trial_id", "step", "loss")}).to_parquet(
            root / "curves.parquet", index=False)
        return
    if how != "no curves":
        (root / "grid.parquet").unlink()
    else:
        (root / "curves.parquet").unlink()


@pytest.mark.parametrize("how", ["no grid", "no evaluation", "single trial", "no curves",
                                 "interrupted before a trial finished"])
def test_missing_inputs_leave_a_note_not_a_crash(planted, tmp_path, how):
    root = tmp_path / "r"
    shutil.copytree(planted[0], root, ignore=shutil.ignore_patterns("report"))
    degrade(root, how)
    text = write_html(root, root, n_boot=50).read_text()
    notes = [html.unescape(n) for n in re.findall(r'<p class="note">([^<]*)</p>', text)]
    if how == "no curves":
        assert notes == ["No curves.parquet rows for the completed trials: no training curves."]
        return
    if how == "interrupted before a trial finished":
        assert "No curves.parquet rows for the completed trials: no training curves." in notes
        assert "<h2>Trials (0)</h2>" in text
        return
    assert "No verdict: no grid.parquet in the results." in notes
    assert "No forget-vs-retain figure: no grid.parquet in the results." in notes
    if how == "single trial":
        assert "1 completed trial(s): parallel coordinates need at least 2." in notes
        assert "<h2>Trials (1)</h2>" in text
        dom, stderr = render(root / "report.html", tmp_path / "profile")  # what is left still renders cleanly
        assert console_errors(stderr) == [] and set(plots(dom)) == {"fig-curves"}
    if how == "no evaluation":
        assert "No controls/*.json in the results: the controls' status is unknown." in notes
        assert 'id="fig-parcoords"' in text and "unlearning" not in text  # no such axis, column or cell


def test_the_verdict_is_computed_once_and_neither_rendering_imports_the_other(planted, tmp_path, monkeypatch):
    import ast

    import tune.report_data as report_data

    calls = []
    real = report_data.build_verdict
    monkeypatch.setattr(report_data, "build_verdict", lambda *a, **k: calls.append(1) or real(*a, **k))
    root = tmp_path / "r"
    shutil.copytree(planted[0], root, ignore=shutil.ignore_patterns("report"))
    build_report(root, n_boot=50)
    assert len(calls) == 1  # report.md and report.html render the one verdict object
    for module, other in (("report_html", "tune.report"), ("report_data", "tune.report"),
                          ("report_blocks", "tune.report")):
        tree = ast.parse((Path(__file__).parent.parent / "tune" / f"{module}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert other not in imported and "tune.report_html" not in imported, module
