"""Ablation verdicts: a space's declared reference and trend, and the section's one family of claims.

The trend test's false-claim rate is simulated here as the many-to-one test's is in test_calibration.py:
flat tables (arms with unequal spreads, heavy tails) at 3 and 5 seeds, and a planted dose-response found."""

import math

import numpy as np
import pandas as pd
import pytest

from hsae import stats as S
from hsae import verdict as V
from hsae.ablation import ablation_verdict, arm_levels, reference_arm
from hsae.spaces import Reference, SpaceError, default_spaces_dir, load_space, parse_space
from tests.test_verdict import RETAINS, grid_frame, grid_rows

RELU_CURVE = (1.0, 0.9, 0.85, 0.8, 0.7, 0.5, 0.2)
ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.4)
DECLARATION = {"name": "ortho", "reference": {"variant": "fixed_ortho", "params": {"alpha": 0.0}, "arm": ""},
               "trend": ["alpha"]}


def ablation_study(step: float, arm_noise: float, seeds: range, rng: np.random.Generator):
    """relu and fixed_ortho at each alpha: each grid step of alpha lowers forget accuracy at equal retain by
    ``step`` (a planted dose-response; 0: flat), plus a shared seed effect and each trial's own noise."""
    trials, rows = [], []
    arms = [("relu", None, 0.0)] + [("fixed_ortho", a, step * i) for i, a in enumerate(ALPHAS)]
    for seed in seeds:
        shared = rng.normal(0, 0.02)
        for variant, alpha, drop in arms:
            tid = f"{variant}-{alpha}-{seed}"
            shift = drop + shared + rng.normal(0, arm_noise)
            points = [(RELU_CURVE[0], RETAINS[0], 0)]
            points += [(float(np.clip(f - shift, 0, 1)), r) for f, r in zip(RELU_CURVE[1:], RETAINS[1:], strict=True)]
            rows += grid_rows(tid, points, rng)
            trials.append({"trial_id": tid, "variant": variant, "seed": seed, "status": "completed",
                           "cfg_alpha": alpha})
    return pd.DataFrame(trials), grid_frame(rows)


def test_a_planted_dose_response_is_a_trend_and_its_strongest_arm_beats_the_reference_and_relu():
    trials, grid = ablation_study(step=0.06, arm_noise=0.004, seeds=range(42, 47), rng=np.random.default_rng(3))
    av = ablation_verdict(trials, grid, DECLARATION, n_boot=50)
    assert av.reference == "fixed_ortho[alpha=0]"
    assert av.family == 5 + 4 + 1  # 5 arms vs the reference, 4 more vs relu (reference vs relu once), 1 trend
    assert av.verdict.main.baseline == av.reference and av.verdict.main.family == av.family
    (tr,) = av.trends
    assert tr.parameter == "alpha" and tr.n == 5 and tr.slope > 0 and tr.lo > 0
    assert tr.claim == "better as alpha grows"
    by = av.verdict.main.by_arm()
    assert by["fixed_ortho[alpha=0.4]"].claim == f"better than {av.reference}"
    assert "fixed_ortho" in by  # alpha = 0.1, fixed_ortho's default, keeps the bare name
    relu = av.versus_relu.by_arm()
    assert relu["fixed_ortho[alpha=0.4]"].claim == "better than relu" and av.versus_relu.family == av.family
    assert set(relu) == {a for a in av.verdict.arms() if a != "relu"}  # the reference against relu too


def test_a_flat_ablation_shows_no_trend_and_no_claim():
    trials, grid = ablation_study(step=0.0, arm_noise=0.01, seeds=range(42, 45), rng=np.random.default_rng(5))
    av = ablation_verdict(trials, grid, DECLARATION, n_boot=50)
    assert [t.claim for t in av.trends] == ["no trend shown"]
    assert not any(a.claim.startswith(("better", "worse")) for a in av.verdict.main.arms)
    assert not any(a.claim.startswith(("better", "worse")) for a in av.versus_relu.arms)


def test_an_ablation_of_one_ranked_arm_says_there_is_nothing_to_compare():
    trials, grid = ablation_study(step=0.0, arm_noise=0.01, seeds=range(42, 45), rng=np.random.default_rng(5))
    alone = trials[trials["cfg_alpha"] == 0.0]
    with pytest.raises(ValueError, match=r"only 1 arm \(fixed_ortho\) has ranked trials"):
        ablation_verdict(alone, grid, DECLARATION, n_boot=10)


def test_the_reference_is_the_one_arm_the_declaration_names():
    trials = pd.DataFrame({"variant": ["relu", "fixed_ortho", "fixed_ortho", "fixed_ortho"],
                           "cfg_alpha": [None, 0.0, 0.1, 0.2], "arm": [None, None, None, None]})
    names = V.arm_names(trials)
    assert reference_arm(trials, names, Reference("fixed_ortho", {"alpha": 0.0})) == "fixed_ortho[alpha=0]"
    assert reference_arm(trials, names, Reference("relu")) == "relu"
    with pytest.raises(ValueError, match="is 0 arm"):
        reference_arm(trials, names, Reference("fixed_ortho", {"alpha": 0.3}))
    # A bare variant is the variant at its defaults (alpha = 0.1 here), as a space file's 'reference: relu' is.
    assert reference_arm(trials, names, Reference("fixed_ortho")) == "fixed_ortho"
    no_default = trials[trials["cfg_alpha"] != 0.1]
    with pytest.raises(ValueError, match="is 2 arm"):
        reference_arm(no_default, V.arm_names(no_default), Reference("fixed_ortho"))
    # alpha = 0.1 is fixed_ortho's default: that arm keeps the bare name (hsae.verdict.arm_names)
    assert arm_levels(trials, names, "alpha") == {"fixed_ortho[alpha=0]": 0.0, "fixed_ortho": 0.1,
                                                  "fixed_ortho[alpha=0.2]": 0.2}


# -- the trend test's calibration -----------------------------------------------------------------
N_SIM = 4000


def flat_tables(n_seeds: int, spreads: tuple[float, ...], rng: np.random.Generator, tails: str = "normal"):
    """(N_SIM, arms, seeds) tables where no arm differs: a shared seed effect and each arm's own spread."""
    k = len(spreads)
    draw = (lambda size: rng.standard_t(3, size) / math.sqrt(3)) if tails == "t3" else rng.standard_normal
    shared = draw((N_SIM, 1, n_seeds))
    own = draw((N_SIM, k, n_seeds)) * np.asarray(spreads)[None, :, None]
    return 0.3 + shared + own


@pytest.mark.parametrize("n_seeds", [3, 5])
@pytest.mark.parametrize("spreads,tails", [
    ((1.0,) * 5, "normal"),  # equal spread
    ((3.0, 1.0, 1.0, 1.0, 1.0), "normal"),  # the lowest level 3x wider
    ((1.0, 1.0, 1.0, 1.0, 3.0), "normal"),  # the highest level 3x wider
    ((1.0,) * 5, "t3"),  # heavy-tailed
])
def test_the_trend_test_claims_a_flat_table_at_most_at_its_rate(n_seeds, spreads, tails):
    rng = np.random.default_rng(11)
    y = flat_tables(n_seeds, spreads, rng, tails)
    res = S.trend_test(y, ALPHAS, alpha=0.05, family=1)
    rate = float(((res.lo > 0) | (res.hi < 0)).mean())
    assert rate <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / N_SIM), rate  # nominal + 3 Monte Carlo s.d.


def test_the_trend_test_finds_a_planted_dose_response_and_its_slope():
    rng = np.random.default_rng(12)
    y = flat_tables(5, (1.0,) * 5, rng) + 1.5 * np.arange(5)[None, :, None]  # 1.5 s.d. per grid step
    res = S.trend_test(y, ALPHAS, alpha=0.05, family=10)
    assert float((res.lo[..., 0] > 0).mean()) > 0.9
    assert abs(float(np.median(res.diff)) - 1.5) < 0.05  # the slope is per grid step, whatever the spacing
    spaced = S.trend_test(y, (0.0, 0.1, 0.2, 0.4, 0.8), alpha=0.05, family=10)  # unequal spacing: same ranks
    assert np.allclose(spaced.diff, res.diff)


def test_the_trends_shared_variance_comes_from_the_slope_on_each_question_resample():
    """``stats.slopes`` is the trend's per-seed slope on each resample, and its shared variance widens the
    trend's interval exactly as it widens a comparison's."""
    rng = np.random.default_rng(4)
    resampled = rng.normal(size=(5, 3, 200)) + rng.normal(size=(5, 1, 200))  # a bank effect every seed shares
    per_seed = S.slopes(resampled, ALPHAS)
    assert per_seed.shape == (3, 200)
    direct = S.trend_test(resampled[..., 7], ALPHAS)  # the slope of one resample's table, seed by seed
    assert np.allclose(per_seed[:, 7].mean(), direct.diff[0])
    shared = float(S.shared_variance(per_seed))
    assert shared > 0
    y = resampled.mean(axis=-1)
    plain, widened = S.trend_test(y, ALPHAS), S.trend_test(y, ALPHAS, shared=shared)
    assert widened.hi[0] - widened.lo[0] == pytest.approx(
        (plain.hi[0] - plain.lo[0]) * math.sqrt(1 + shared / (plain.sd[0] ** 2 / 3)))


def test_a_trend_needs_three_levels_and_a_level_per_arm():
    with pytest.raises(ValueError, match=">= 3 distinct levels"):
        S.level_ranks([0.0, 0.1, 0.1])
    with pytest.raises(ValueError, match="needs a level"):
        S.level_ranks([0.0, np.nan, 0.2])
    with pytest.raises(ValueError, match="3 arms but 4 levels"):
        S.trend_test(np.zeros((3, 4)), [0, 1, 2, 3])


# -- declared in the space file -------------------------------------------------------------------
TWO_ARMS = """
trials:
  - variant: relu
  - variant: fixed_ortho
    params: {alpha: {grid: [0.0, 0.1, 0.2]}}
"""


def test_a_space_of_several_arms_without_a_reference_is_refused_naming_the_space_and_the_field():
    with pytest.raises(SpaceError, match=r"space 'mine' has 4 configurations but no 'reference'"):
        parse_space("mine", TWO_ARMS)
    space = parse_space("mine", "reference: {variant: fixed_ortho, params: {alpha: 0.0}}\ntrend: [alpha]" + TWO_ARMS)
    assert space.reference == Reference("fixed_ortho", {"alpha": 0.0}) and space.trend == ("alpha",)
    assert space.declaration()["reference"] == {"variant": "fixed_ortho", "params": {"alpha": 0.0}, "arm": ""}
    assert parse_space("one", "trials:\n  - variant: relu\n").reference is None  # one arm: nothing to compare


@pytest.mark.parametrize("head,message", [
    ("reference: fixed_ortho", "matches 3 of its configurations, not exactly one"),
    ("reference: {variant: fixed_ortho, params: {alpha: 0.5}}", "matches 0 of its configurations"),
    ("reference: {variant: relu, weight: 1}", "must be a variant name or"),
    ("reference: relu\ntrend: [l1_coeff]", "'trend' parameter 'l1_coeff' takes 0 numeric grid level"),
    ("reference: relu\ntrend: alpha", "'trend' must be a list"),
])
def test_a_bad_reference_or_trend_is_refused_naming_the_field(head, message):
    with pytest.raises(SpaceError, match=message):
        parse_space("mine", head + TWO_ARMS)


def test_the_cli_refuses_a_space_without_a_reference_before_any_compute(tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text(TWO_ARMS)
    from tune.ablate import main

    assert main(["--space", str(path), "--profile", "tiny", "--dry-run", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "space 'mine'" in err and "'reference'" in err
    assert not (tmp_path / "r").exists()


def test_every_shipped_space_of_several_arms_declares_a_reference_that_parses():
    for path in sorted(default_spaces_dir().glob("*.yaml")):
        space = load_space(path.stem)
        if len(space.configurations()) > 1:
            assert space.reference is not None, path.name
        assert all(len({p.get(t) for _, p, _ in space.configurations() if t in p}) >= 3 for t in space.trend)


# -- the report's section -------------------------------------------------------------------------
def write_ablation_results(root, trials: pd.DataFrame, grid: pd.DataFrame, declaration: dict):
    """A results directory of one ortho run: typed rows, the grid, the controls and the space's declaration."""
    from hsae.results import ResultsStore, trial_frame

    rows = [trial_frame({
        "experiment": "embedded-ortho", "space": "ortho", "spaces": '["ortho"]', "variant": t.variant,
        "trial_id": t.trial_id, "seed": t.seed, "status": "completed", "profile": "embedded", "model": "embedded",
        "layer": 13, "mse": 0.1, "explained_variance": 0.8, "l0": 64.0, "converged": True, "controls_ok": True,
        **({"cfg_alpha": t.cfg_alpha} if t.variant == "fixed_ortho" else {})}) for t in trials.itertuples()]
    root.mkdir(parents=True)
    pd.concat(rows, ignore_index=True).to_parquet(root / "trials.parquet", index=False)
    grid.to_parquet(root / "grid.parquet", index=False)
    (root / "controls").mkdir()
    (root / "controls" / "embedded.json").write_text(
        '{"positive": {"score": 0.3, "n_forget": 100, "n_retain": 400}, "negative": {"score": 0.0}}')
    ResultsStore(root).record_space(declaration)
    return root


def test_the_report_gives_an_ablation_its_section_figure_and_trend(tmp_path):
    from tune.report import build_report

    trials, grid = ablation_study(step=0.06, arm_noise=0.004, seeds=range(42, 47), rng=np.random.default_rng(3))
    root = write_ablation_results(tmp_path / "r", trials, grid, {**DECLARATION, "description": "alpha planted"})
    text = build_report(root, n_boot=50).read_text()
    section = text.split("## Ablation verdict: ortho")[1].split("\n## ")[0]
    assert "alpha planted" in section and "![Headline per arm, ablation ortho](ablation_ortho.png)" in section
    assert "**Trend along alpha** (5 levels: 0, 0.1, 0.2, 0.3, 0.4)" in section
    assert "**better as alpha grows**" in section and "10 comparisons in one family" in section
    row = {line.split("|")[1].strip(): line for line in section.splitlines() if line.startswith("| ")}
    assert "better than fixed_ortho[alpha=0]" in row["fixed_ortho[alpha=0.4]"]
    assert "better than relu" in row["fixed_ortho[alpha=0.4]"] and "reference" in row["fixed_ortho[alpha=0]"]
    assert (root / "report" / "ablation_ortho.png").stat().st_size > 5000
    assert "_No verdict: the spaces run here are ablations" in text  # no second copy of the relu comparisons
    assert "Ablation verdict: ortho" in (root / "report" / "report.html").read_text()
