"""Every shipped space plans on every profile (``--dry-run``), and ``--space`` offers what the files say.

The spaces are read from ``tune/spaces/*.yaml`` here, never from a list kept by hand, so a new space file is
planned on every profile as soon as it exists. The ``real`` profile's hub names point at local stand-ins of
the same architectures (tests/standins.py): its own sizes, offline.
"""

import pytest

from hsae.profiles import PROFILES
from hsae.spaces import default_spaces_dir
from tests import standins
from tune import ablate

SPACES = sorted(p.stem for p in default_spaces_dir().glob("*.yaml"))


def dry_run(capsys, *args: str) -> str:
    """The plan's printout; fp32 asked for, so that no bf16 probe is measured (the plan prints the choice)."""
    rc = ablate.main([*args, "--dry-run", "--precision", "fp32"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    return printed.out


def test_every_profile_is_planned_below():
    assert set(PROFILES) == {"tiny", "embedded", "real"}  # a new profile needs its dry-run test here


# tiny as it is (no target L0, like real) and at the embedded profile's target L0 of 64, where a TopK block whose k
# disagrees with the target is refused (docs/sweeps.md, "Spaces").
@pytest.mark.parametrize("target", [[], ["--set", "target_l0=64"]], ids=["no-target", "target64"])
@pytest.mark.parametrize("space", SPACES)
def test_every_shipped_space_plans_on_tiny(space, target, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HSAE_CACHE", str(tmp_path / "cache"))
    out = dry_run(capsys, "--profile", "tiny", "--space", space, "--out", str(tmp_path / "r"), *target)
    assert f"space {space:<12} " in out
    # The machine's choices a real run prints first: precision and why, concurrency and its rule.
    assert "[hsae] precision fp32: asked for; concurrency " in out and " trials x " in out
    assert not (tmp_path / "r").exists() and not (tmp_path / "cache").exists()


@pytest.mark.slow
@pytest.mark.parametrize("space", SPACES)
def test_every_shipped_space_plans_on_embedded(space, tmp_path, capsys):
    # The embedded model from the user's cache (a cold cache converts it once: what a dry run does).
    out = dry_run(capsys, "--space", space, "--out", str(tmp_path / "r"))
    assert "plan for profile 'embedded'" in out and f"space {space:<12} " in out


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    return standins.save_all(tmp_path_factory.mktemp("hub"))


@pytest.mark.slow
@pytest.mark.parametrize("space", SPACES)
def test_every_shipped_space_plans_on_real(space, hub, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HSAE_CACHE", str(tmp_path / "cache"))
    local = ["--model", hub["model"], "--eval-model", hub["eval_model"], "--forget-corpus", hub["forget"],
             "--retain-corpus", hub["retain"], "--wmdp", hub["wmdp"], "--mmlu", hub["mmlu"]]
    out = dry_run(capsys, "--profile", "real", "--space", space, "--out", str(tmp_path / "r"), *map(str, local))
    assert "plan for profile 'real'" in out and f"space {space:<12} " in out


def test_all_is_every_shipped_space_but_the_aa_test_and_the_frontier(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HSAE_CACHE", str(tmp_path / "cache"))
    out = dry_run(capsys, "--profile", "tiny", "--space", "all", "--out", str(tmp_path / "r"))
    planned = {line.split()[1] for line in out.splitlines() if line.startswith("space ")}
    assert planned == set(SPACES) - {"aa", "frontier"}


def test_the_space_help_lists_every_shipped_space():
    text = " ".join(ablate.build_parser().format_help().split())
    listed = text.split("a shipped space (")[1].split(")")[0].split(", ")
    assert listed == SPACES and "'all' (every shipped space but aa and frontier" in text
