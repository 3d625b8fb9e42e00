"""Ctrl-C ends a sweep as an interruption: exit 130, no row for an interrupted trial, --resume finishes it."""

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tune.interrupt import Interrupts, SweepInterrupted, resume_command

REPO = Path(__file__).resolve().parent.parent


def test_the_resume_command_is_the_same_command_with_resume():
    cmd = resume_command(["--space", "variants", "--out", "my results"])
    assert cmd.endswith("tune/ablate.py --space variants --out 'my results' --resume")
    assert resume_command(["--space", "x", "--resume"]).count("--resume") == 1


def test_ray_init_gives_sigterm_back_to_the_sweep():
    """ray.init replaces the driver's SIGTERM handler (a Python one exiting with status 15, then a C++ one that
    dumps a stack): ours is put back after it, and a SIGTERM Ray's Python handler caught meanwhile interrupts."""
    interrupts = Interrupts().install()
    try:
        with interrupts.ray_init():
            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))  # what ray.init does
        assert signal.getsignal(signal.SIGTERM) == interrupts._handle
        with pytest.raises(SweepInterrupted) as caught, interrupts.ray_init():
            raise SystemExit(signal.SIGTERM)  # Ray's handler, during ray.init
        assert caught.value.signum == signal.SIGTERM and interrupts.exit_code == 143
        with pytest.raises(SystemExit), interrupts.ray_init():
            raise SystemExit(1)  # any other exit is not an interruption
        with pytest.raises(SweepInterrupted):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises at the next bytecode
    finally:
        interrupts.uninstall()


def test_sigterm_before_ray_exits_143_with_the_resume_command_and_the_rows_consolidated(tmp_path, monkeypatch,
                                                                                        capsys):
    from hsae.results import ResultsStore
    from tune import ablate

    out = tmp_path / "r"
    ResultsStore(out).write_trial({"experiment": "e", "trial_id": "t1", "status": "completed", "seed": 42})

    def resolve(args):  # the signal arrives while the plan is made (the model's config read, a conversion)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    monkeypatch.setattr(ablate, "resolve", resolve)
    assert ablate.main(["--space", "variants", "--profile", "tiny", "--out", str(out)]) == 143
    err = capsys.readouterr().err
    assert "interrupted by SIGTERM" in err and "--space variants --profile tiny --out" in err and "--resume" in err
    assert list(pd.read_parquet(out / "trials.parquet")["trial_id"]) == ["t1"]  # readable as they are


@pytest.mark.slow  # a tiny sweep interrupted and resumed (≈ 1-2 min)
def test_sigint_mid_trial_exits_130_writes_no_stopped_row_and_resume_completes_each_trial_once(tmp_path):
    out = tmp_path / "r"
    env = {**os.environ, "HSAE_CACHE": str(tmp_path / "cache"), "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "tune/ablate.py", "--space", "variants", "--profile", "tiny", "--out", str(out),
           "--max-concurrent", "1"]
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        parts = out / "parts" / "trials" / "tiny-variants"
        deadline = time.time() + 400
        while len(list(parts.glob("*.parquet"))) < 1:  # one trial done, the next one training
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)  # to the driver alone, as a Ctrl-C
        code = proc.wait(timeout=300)
    text = log_path.read_text()
    assert code == 130, text[-3000:]
    assert "interrupted by SIGINT" in text and "--resume" in text and "Tuner.restore" not in text
    first = pd.concat([pd.read_parquet(p) for p in parts.glob("*.parquet")])
    assert 1 <= len(first) < 7
    assert set(first["status"]) == {"completed"}  # nothing early_stopped, nothing half-written
    done = subprocess.run([*cmd, "--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = pd.read_parquet(out / "trials.parquet")
    assert len(rows) == 7 and rows["trial_id"].is_unique and (rows["status"] == "completed").all()
    again = rows.set_index("trial_id").loc[first["trial_id"], "finished_at"]
    assert list(again) == list(first["finished_at"])  # finished before the signal: not redone


# What differs between two runs of the same trials: when and how fast they ran.
TIMINGS = ("finished_at", "wall_s", "tokens_per_s", "eval_s")


def marked_sweep(tmp_path):
    """A one-relu space, a folder where the held driver leaves its marks, and the environment pointing at both."""
    space = tmp_path / "one.yaml"
    space.write_text("trials:\n  - variant: relu\n")
    marks = tmp_path / "marks"
    marks.mkdir()
    env = {**os.environ, "HSAE_CACHE": str(tmp_path / "cache"), "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1",
           "HSAE_TEST_MARKS": str(marks)}
    return space, marks, env


@pytest.mark.slow  # a tiny sweep run whole, then stopped by SIGTERM mid-trial and resumed (≈ 2-3 min)
def test_sigterm_mid_trial_exits_143_keeps_finished_rows_and_resume_gives_the_uninterrupted_numbers(tmp_path):
    """SIGTERM to the driver alone, as `timeout`, Slurm, Kubernetes and systemd send it, while a trial trains in
    Tune's loop: after ray.init, where Ray's own handler (a C++ stack dump) used to take it."""
    space, marks, env = marked_sweep(tmp_path)
    driver = [sys.executable, "-c", "import sys; from tune.ablate import main; "
              "sys.exit(main(sys.argv[1:], trial_hooks=['tests.faults:hold_seed_43_mid_training']))"]

    def args(out):
        return ["--space", str(space), "--profile", "tiny", "--seeds", "2", "--max-concurrent", "1", "--out", str(out)]

    clean = subprocess.run([*driver, *args(tmp_path / "clean")], cwd=REPO, env={**env, "HSAE_TEST_MARKS": ""},
                           capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stdout[-3000:] + clean.stderr[-3000:]
    out = tmp_path / "r"
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*driver, *args(out)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.time() + 400
        while not (marks / "training").exists():  # seed 42 done, seed 43 at step 20 of 40
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)  # to the driver alone, as `timeout` sends it
        code = proc.wait(timeout=300)
    text = log_path.read_text()
    assert code == 143, text[-3000:]
    assert "interrupted by SIGTERM" in text and "--resume" in text and "*** SIGTERM received" not in text, text[-3000:]
    first = pd.read_parquet(out / "trials.parquet")  # consolidated: the finished trial, nothing of the other
    assert list(first["seed"]) == [42] and list(first["status"]) == ["completed"]
    done = subprocess.run([*driver, *args(out), "--resume"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (marks / "restored").read_text() == (marks / "training").read_text()  # from its step-10 checkpoint
    rows = pd.read_parquet(out / "trials.parquet").set_index("trial_id").sort_index()
    assert len(rows) == 2 and (rows["status"] == "completed").all()
    assert rows.loc[first["trial_id"], "finished_at"].tolist() == first["finished_at"].tolist()  # not redone
    reference = pd.read_parquet(tmp_path / "clean" / "trials.parquet").set_index("trial_id").sort_index()
    compared = [c for c in reference.columns if c not in TIMINGS and not c.endswith("_s")]
    assert list(rows.index) == list(reference.index) and len(compared) > 100
    pd.testing.assert_frame_equal(rows[compared], reference[compared])


def driver(*calls, hooks=()):
    """``python -c``: the sweep's main, after the driver-side faults ``calls`` (tests/faults.py) are in place."""
    setup = "".join(f"from tests.faults import {c}; {c}(); " for c in calls)
    return [sys.executable, "-c", f"import sys; from tune.ablate import main; {setup}"
            f"sys.exit(main(sys.argv[1:], trial_hooks={list(hooks)!r}))"]


def wait_for(path, proc, log_path, seconds=400):
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.1)


@pytest.mark.slow  # a tiny sweep stopped by SIGTERM between Ray's start and Tune's loop, then resumed (≈ 1 min)
def test_sigterm_after_ray_init_outside_tune_exits_143_and_resume_runs_the_sweep(tmp_path):
    """SIGTERM while the driver runs the controls (Ray up, the activations harvested, no Tuner yet): the driver's
    own handler, put back after ray.init, turns it into the interruption (not Ray's C++ stack dump)."""
    space, marks, env = marked_sweep(tmp_path)
    out = tmp_path / "r"
    args = ["--space", str(space), "--profile", "tiny", "--seeds", "1", "--out", str(out)]
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*driver("hold_the_controls"), *args], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(marks / "controls", proc, log_path)
        proc.send_signal(signal.SIGTERM)  # to the driver alone, as `timeout` sends it
        code = proc.wait(timeout=300)
    text = log_path.read_text()
    assert code == 143, text[-3000:]
    assert "interrupted by SIGTERM" in text and "*** SIGTERM received" not in text, text[-3000:]
    assert shlex.join([*args, "--resume"]) in text, text[-3000:]  # the product's resume command
    assert not (marks / "controls-done").exists()  # the signal ended the controls: nothing after them ran
    assert not (out / "ray_results").exists()  # no Tuner was made
    done = subprocess.run([*driver(), *args, "--resume"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = pd.read_parquet(out / "trials.parquet")
    assert list(rows["seed"]) == [42] and list(rows["status"]) == ["completed"]


@pytest.mark.slow  # a tiny sweep stopped by two SIGINTs mid-trial, then resumed (≈ 1-2 min)
def test_a_second_sigint_during_tunes_stop_exits_130_at_once_and_resume_completes(tmp_path):
    """The first Ctrl-C asks Tune to stop (the experiment is saved); a second one, while Tune's stop waits on its
    trials inside Tuner.fit, ends the driver there: exit 130, the finished rows kept, --resume finishes the rest."""
    space, marks, env = marked_sweep(tmp_path)
    out = tmp_path / "r"
    args = ["--space", str(space), "--profile", "tiny", "--seeds", "2", "--max-concurrent", "1", "--out", str(out)]
    hooks = ["tests.faults:hold_seed_43_mid_training"]
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*driver("hold_tune_cleanup", hooks=hooks), *args], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(marks / "training", proc, log_path)  # seed 42 done, seed 43 at step 20 of 40
        proc.send_signal(signal.SIGINT)
        wait_for(marks / "cleanup", proc, log_path, 300)  # Tune's loop ended, its stop under way in Tuner.fit
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=300)
    text = log_path.read_text()
    assert code == 130, text[-3000:]
    assert text.count("stopping the running trials") == 1, text[-3000:]  # the first signal's message only
    assert "interrupted by SIGINT" in text and shlex.join([*args, "--resume"]) in text, text[-3000:]
    assert not (marks / "cleanup-done").exists()  # the second signal did not wait for Tune's stop
    first = pd.read_parquet(out / "trials.parquet")  # consolidated: the finished trial, nothing of the other
    assert list(first["seed"]) == [42] and list(first["status"]) == ["completed"]
    done = subprocess.run([*driver(hooks=hooks), *args, "--resume"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (marks / "restored").read_text() == (marks / "training").read_text()  # from its step-10 checkpoint
    rows = pd.read_parquet(out / "trials.parquet").set_index("trial_id")
    assert sorted(rows["seed"]) == [42, 43] and (rows["status"] == "completed").all()
    assert rows.loc[first["trial_id"], "finished_at"].tolist() == first["finished_at"].tolist()  # not redone
