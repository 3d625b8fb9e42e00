"""Faults injected into sweep trials through ``tune.ablate.main(..., trial_hooks=[...])`` (a test-only seam).

Each hook is called as ``hook(spec, step, restored)`` when a trial starts (step 0) and at every logged
step, inside the trial's own process.
"""

import json
import os
import signal
import time
from pathlib import Path


def kill_first_attempt_at_step_25(spec, step, restored):
    """Die like an OOM-killed worker at step 25, on the first attempt only (Tune then restores it)."""
    if step == 25 and not restored:
        os.kill(os.getpid(), signal.SIGKILL)


def raise_in_adaptive_ortho(spec, step, restored):
    if spec.variant == "adaptive_ortho":
        raise RuntimeError("injected fault for variant 'adaptive_ortho'")


def kill_server_at_step_20(spec, step, restored):
    """Kill the activation server (it restarts: max_restarts=-1) mid-stream, once, from the seed-42 trial."""
    import ray

    if step == 20 and not restored and spec.seed == 42:
        for name in ray.util.list_named_actors():
            if name.startswith("hsae-activations"):
                ray.kill(ray.get_actor(name), no_restart=False)


def hold_seed_43_mid_training(spec, step, restored):
    """The signal tests' marker: the seed-43 trial's first attempt writes ``$HSAE_TEST_MARKS/training`` at step 20
    (before that step's checkpoint is reported: its last one is step 10) and holds there for a while, so a signal
    sent to the driver meanwhile finds it mid-training; a restored attempt writes ``restored`` when it starts."""
    marks = os.environ.get("HSAE_TEST_MARKS")
    if not marks or spec.seed != 43:
        return
    if restored and step == 0:
        Path(marks, "restored").write_text(spec.key)
    elif step == 20 and not restored:
        Path(marks, "training").write_text(spec.key)
        time.sleep(20)


# The resume test's witness: every hook call, kept by a named actor the test starts (tests run Ray in-process, so
# an environment variable set by a test never reaches the trials' workers, which Ray started before it).
CALL_LOG = "hsae-test-call-log"


class CallLog:
    """What ``record_calls`` saw, in order: (trial key, step, restored, the restored checkpoint's step)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, bool, int | None]] = []

    def add(self, call: tuple[str, int, bool, int | None]) -> None:
        self.calls.append(call)

    def take(self) -> list[tuple[str, int, bool, int | None]]:
        calls, self.calls = self.calls, []
        return calls


def record_calls(spec, step, restored):
    """Each call to the ``CALL_LOG`` actor (none running: nothing), before the next hook may kill the trial; a
    restored attempt's first call carries the step of the checkpoint Tune handed it (the trainer's state.json)."""
    import ray
    from ray import tune

    try:
        log = ray.get_actor(CALL_LOG)
    except ValueError:
        return
    checkpoint_step = None
    if restored and step == 0:
        with tune.get_checkpoint().as_directory() as path:
            checkpoint_step = json.loads(Path(path, "state.json").read_text())["step"]
    ray.get(log.add.remote((spec.key, step, restored, checkpoint_step)))


# Driver-side faults: the signal tests' driver (``python -c ...``) calls one of these before ``tune.ablate.main``.

def hold_the_controls():
    """The controls (after ray.init and the harvest, before any Tuner) write ``$HSAE_TEST_MARKS/controls`` and
    wait up to 120 s for a signal; if none interrupts them they write ``controls-done`` and go on."""
    from tune import ablate

    original = ablate.run_controls

    def run_controls(*args, **kwargs):
        marks = Path(os.environ["HSAE_TEST_MARKS"])
        (marks / "controls").write_text(str(os.getpid()))
        time.sleep(120)
        (marks / "controls-done").write_text("")
        return original(*args, **kwargs)

    ablate.run_controls = run_controls


def hold_tune_cleanup():
    """Tune's cleanup at the end of ``Tuner.fit`` (after a first signal ended its loop and saved the experiment)
    writes ``$HSAE_TEST_MARKS/cleanup`` and waits up to 120 s, as a stop waiting on a stuck trial does, so a
    second signal finds the driver inside ``Tuner.fit``; if none interrupts it, it writes ``cleanup-done``."""
    from ray.tune.execution.tune_controller import TuneController

    original = TuneController.cleanup

    def cleanup(self):
        marks = Path(os.environ["HSAE_TEST_MARKS"])
        (marks / "cleanup").write_text(str(os.getpid()))
        time.sleep(120)
        (marks / "cleanup-done").write_text("")
        return original(self)

    TuneController.cleanup = cleanup
