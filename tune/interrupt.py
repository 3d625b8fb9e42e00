"""Ctrl-C and SIGTERM end a sweep as an interruption, never as a finished run.

Inside ``Tuner.fit`` the first signal asks Tune for its own graceful stop (SIGUSR1, which Tune always
handles): the experiment state is saved with the running trials resumable, and ``fit`` returns. Outside it,
the signal raises ``SweepInterrupted``. Either way the driver writes no row for an interrupted trial, prints
the product's resume command and exits 128 + the signal's number (130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType

# Tune's own SIGINT handler would print Tune's restore hint; ours asks Tune to stop through SIGUSR1 instead.
os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SweepInterrupted(Exception):
    """A signal arrived outside Tune's loop (harvest, controls, report)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class TuneHintFilter(logging.Filter):
    """Drops Tune's own stop and restore messages: the driver prints the product's resume command instead."""

    HIDDEN = ("Stop signal received", "Tuner.restore", "Experiment has been interrupted", "Trials did not complete")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in self.HIDDEN)


class Interrupts:
    """Catches SIGINT/SIGTERM for the driver's lifetime; ``signum`` is the first one caught (None: none)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.in_tune = False
        self._previous: dict[int, object] = {}

    def install(self) -> Interrupts:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        logging.getLogger("ray.tune.tune").addFilter(TuneHintFilter())
        return self

    @contextmanager
    def ray_init(self) -> Iterator[None]:
        """Around ``ray.init``, which replaces the driver's SIGTERM handler twice: with a Python one that exits with
        status 15, then with its core worker's C++ one, which prints a stack and kills the process. Ours is put
        back after it, and a SIGTERM that Ray's Python handler caught meanwhile is the interruption it is."""
        try:
            yield
        except SystemExit as exc:
            if exc.code != signal.SIGTERM:
                raise
            self.signum = self.signum or signal.SIGTERM
            raise SweepInterrupted(signal.SIGTERM) from None
        finally:
            for sig in SIGNALS:
                signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.signum is None
        self.signum = self.signum or signum
        if self.in_tune and first:
            print(f"\n[hsae] {signal.Signals(signum).name}: stopping the running trials (their state is saved; "
                  f"a second signal stops at once)", file=sys.stderr, flush=True)
            signal.raise_signal(signal.SIGUSR1)  # Tune's own graceful stop
            return
        raise SweepInterrupted(signum)

    @contextmanager
    def tune_loop(self) -> Iterator[None]:
        """Inside ``Tuner.fit``: a signal stops Tune gracefully instead of raising."""
        self.in_tune = True
        try:
            yield
        finally:
            self.in_tune = False

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum or 0)


def resume_command(argv: Sequence[str]) -> str:
    """The command that continues this sweep: the same arguments with --resume."""
    args = [a for a in argv if a != "--resume"]
    return shlex.join([sys.executable, "tune/ablate.py", *args, "--resume"])


def interrupted_message(signum: int, argv: Sequence[str]) -> str:
    return (f"[hsae] interrupted by {signal.Signals(signum).name}: finished trials are kept; interrupted ones have "
            f"no row and are re-run (from their last checkpoint) by:\n  {resume_command(argv)}")
