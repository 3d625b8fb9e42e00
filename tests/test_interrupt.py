"""Ctrl-C ends a sweep as an interruption: exit 130, no row for an interrupted trial, --resume finishes it."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tune.interrupt import resume_command

REPO = Path(__file__).resolve().parent.parent


def test_the_resume_command_is_the_same_command_with_resume():
    cmd = resume_command(["--space", "variants", "--out", "my results"])
    assert cmd.endswith("tune/ablate.py --space variants --out 'my results' --resume")
    assert resume_command(["--space", "x", "--resume"]).count("--resume") == 1


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
