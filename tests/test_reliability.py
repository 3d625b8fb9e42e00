"""Faults a cluster produces and bad input a researcher types: nothing finished is lost or duplicated."""

import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from hsae.results import ResultsStore
from tests.helpers import killed_after_rows, small_space
from tune import ablate

REPO = Path(__file__).resolve().parent.parent
COMPARED = ["explained_variance", "l0", "mse", "dead_fraction", "inter_group_correlation", "unlearning_score",
            "ce_score_retain", "steps"]


@pytest.fixture
def tiny(ray_session, tmp_path, monkeypatch):
    monkeypatch.setenv("HSAE_CACHE", str(tmp_path / "cache"))

    def run(out, *args, hooks=()):
        return ablate.main(["--profile", "tiny", "--out", str(out), *args], trial_hooks=hooks)

    run.ray = ray_session
    return run


def rows(out):
    return pd.read_parquet(Path(out) / "trials.parquet").set_index("trial_id").sort_index()


@pytest.mark.slow  # two sweeps with a kill (≈ 18 s): in the full suite, out of the fast loop
def test_killed_trial_resumes_from_checkpoint_to_the_same_numbers(tiny, tmp_path):
    """Training is deterministic, so equal numbers alone would not tell a restore from a rerun from scratch: every
    hook call is recorded, and the retry must start from the step-20 checkpoint and log only the steps after it."""
    from tests.faults import CALL_LOG, CallLog

    log = tiny.ray.remote(num_cpus=0)(CallLog).options(name=CALL_LOG).remote()
    try:
        assert tiny(tmp_path / "clean", "--space", small_space("groups"), "--experiment", "e",
                    hooks=["tests.faults:record_calls"]) == 0
        clean_calls = tiny.ray.get(log.take.remote())
        # Each trial's first attempt is SIGKILLed at step 25; Tune retries it from its step-20 checkpoint.
        assert tiny(tmp_path / "killed", "--space", small_space("groups"), "--experiment", "e",
                    hooks=["tests.faults:record_calls", "tests.faults:kill_first_attempt_at_step_25"]) == 0
        killed_calls = tiny.ray.get(log.take.remote())
    finally:
        tiny.ray.kill(log)
    clean, killed = rows(tmp_path / "clean"), rows(tmp_path / "killed")
    assert list(clean.index) == list(killed.index) and (killed["status"] == "completed").all()
    pd.testing.assert_frame_equal(clean[COMPARED], killed[COMPARED])
    keys = sorted({call[0] for call in clean_calls})
    assert keys == sorted({call[0] for call in killed_calls}) and len(keys) == 2
    for key in keys:
        steps = [step for k, step, restored, _ in clean_calls if k == key]
        assert steps[0] == 0 and 20 in steps and 25 in steps and steps[-1] > 25
        assert all(not restored for k, _, restored, _ in clean_calls if k == key)
        calls = [(step, restored, at) for k, step, restored, at in killed_calls if k == key]
        first = [(s, False, None) for s in steps if s <= 25]  # killed at step 25, after its step-20 checkpoint
        retry = [(0, True, 20)] + [(s, True, None) for s in steps if s > 20]  # restored: never steps 5-20 again
        assert calls == first + retry


@pytest.mark.slow  # an end-to-end fault run (≈ 15 s): in the full suite, out of the fast loop
def test_nan_trial_ends_degenerate_with_reason_and_the_sweep_goes_on(tiny, tmp_path, capsys):
    space = tmp_path / "blowup.yaml"
    space.write_text("reference: relu\ntrials:\n  - variant: relu\n"
                     "  - variant: relu\n    params: {l1_coeff: 1.0e+38}\n")
    assert tiny(tmp_path / "r", "--space", str(space)) == 0
    t = rows(tmp_path / "r")
    assert sorted(t["status"]) == ["completed", "degenerate"]
    bad = t[t["status"] == "degenerate"].iloc[0]
    assert "not finite" in bad["error"] and pd.isna(bad["unlearning_score"])
    assert "degenerate (no scores)" in capsys.readouterr().err


@pytest.mark.slow  # an end-to-end fault run (≈ 15 s): in the full suite, out of the fast loop
def test_restarted_server_serves_from_disk_with_zero_forwards(ray_session, tiny_harvest_cfg, tmp_path):
    import numpy as np

    from hsae.server import create_activation_server, fetch

    ray = ray_session
    server = create_activation_server(tiny_harvest_cfg, name="test-restart", cache_root=str(tmp_path), num_cpus=0)
    before = fetch(ray.get(server.prepare.remote()))
    x_before = before.x[np.arange(len(before.x))].copy()
    assert ray.get(server.forwards.remote()) > 0
    first_pid = ray.get(server.__ray_call__.remote(lambda _: os.getpid()))
    ray.kill(server, no_restart=False)  # the process dies; max_restarts=-1 brings it back
    deadline = time.time() + 60
    while True:  # the kill is asynchronous: wait for the new process, not an answer from the dying one
        try:
            if ray.get(server.__ray_call__.remote(lambda _: os.getpid()), timeout=30) != first_pid:
                info = ray.get(server.prepare.remote(), timeout=30)
                break
        except ray.exceptions.RayActorError:
            pass
        assert time.time() < deadline
        time.sleep(0.5)
    assert ray.get(server.forwards.remote()) == 0 and ray.get(server.model_loaded.remote()) is False
    after = fetch(info)
    np.testing.assert_array_equal(after.x[np.arange(len(after.x))], x_before)
    ray.kill(server)


def _writer(root, experiment, n):
    store = ResultsStore(root)
    for i in range(n):
        store.write_trial({"experiment": experiment, "space": "s", "variant": "relu", "trial_id": f"{experiment}-{i}",
                           "seed": 42, "status": "completed", "l0": float(i)},
                          [{"experiment": experiment, "trial_id": f"{experiment}-{i}", "step": 1, "loss": 0.1}])
        store.consolidate()


@pytest.mark.slow  # two sweeps at once in subprocesses (≈ 21 s): in the full suite, out of the fast loop
def test_two_sweeps_sharing_a_results_directory_never_corrupt_each_other(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), exp, 25)) for exp in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    ResultsStore(tmp_path).consolidate()
    t = pd.read_parquet(tmp_path / "trials.parquet")
    assert len(t) == 50 and t["trial_id"].is_unique
    assert sorted(t[t.experiment == "a"]["l0"]) == [float(i) for i in range(25)]
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]  # no half-written file left behind


@pytest.mark.parametrize("space_text,message", [
    ("trials:\n  - variant: nope\n", "unknown variant 'nope'; valid variants"),
    ("trials:\n  - variant: fixed_ortho\n    params: {n_groups: 30}\n", "n_groups=30 does not divide"),
    ("reference: {variant: fixed_ortho, params: {alpha: 0.1}}\ntrials:\n  - variant: fixed_ortho\n"
     "    params: {alpha: {grid: [0.1, high]}}\n", "alpha must be a number"),
    ("trials: [variant: relu\n", "malformed YAML"),
    ("trials:\n  - variant: fixed_ortho\n    params: {alpha: -1}\n", "alpha must be a finite number >= 0"),
])
def test_bad_space_files_exit_2_naming_the_problem(space_text, message, tmp_path, capsys):
    space = tmp_path / "bad.yaml"
    space.write_text(space_text)
    assert ablate.main(["--space", str(space), "--profile", "tiny", "--out", str(tmp_path / "r")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r" / "trials.parquet").exists()


def test_address_of_no_cluster_exits_2_quickly(tmp_path):
    t0 = time.time()
    proc = subprocess.run([sys.executable, "tune/ablate.py", "--space", "ortho", "--profile", "tiny",
                           "--address", "127.0.0.1:1", "--out", str(tmp_path / "r")],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HSAE_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no Ray cluster answers at '127.0.0.1:1'" in proc.stderr
    assert time.time() - t0 < 60


@pytest.mark.slow
def test_killed_driver_then_resume_completes_without_redoing_finished_trials(tmp_path):
    out = tmp_path / "r"
    env = {**os.environ, "HSAE_CACHE": str(tmp_path / "cache"), "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "tune/ablate.py", "--space", "variants", "--profile", "tiny", "--out", str(out),
           "--max-concurrent", "1"]
    parts = out / "parts" / "trials" / "tiny-variants"
    first = killed_after_rows(cmd, env, parts, "*.parquet", 2, tmp_path / "first.log", REPO)
    assert 2 <= len(first) < 7
    done = subprocess.run([*cmd, "--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    t = rows(out)
    assert len(t) == 7 and (t["status"] == "completed").all()
    for trial_id, finished_at in first.items():
        assert t.loc[trial_id, "finished_at"] == finished_at  # finished before the kill: not redone
