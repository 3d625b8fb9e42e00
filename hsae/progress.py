"""Progress lines a person can read: durations in words, an ETA, and a rate limit for long loops.

Long steps (harvesting, scoring a question bank, the evaluation controls) print through the caller's
``progress`` callback (``print`` by default, ``None`` for silence); this module only formats the text and
decides when a line is worth printing. No logging framework: the lines go where the callback sends them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


def format_duration(seconds: float) -> str:
    """``40 s``, ``3 min 10 s``, ``1 h 05 min``: rounded to the second, then to the minute past an hour."""
    if not math.isfinite(seconds):
        return "?"
    whole = max(int(round(seconds)), 0)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    hours, rest = divmod(int(round(whole / 60)), 60)  # past an hour the seconds are noise
    return f"{hours} h {rest:02d} min"


def eta_text(done: float, total: float, elapsed_s: float) -> str:
    """``ETA 3 min 10 s`` at the rate so far; ``""`` before anything is done (no rate to extrapolate)."""
    if done <= 0 or elapsed_s <= 0 or not math.isfinite(elapsed_s):
        return ""
    remaining = max(total - done, 0) * elapsed_s / done
    return f"ETA {format_duration(remaining)}"


def rate_text(done: float, elapsed_s: float, unit: str) -> str:
    """``1,250 tokens/s``; slow rates keep two significant digits (``0.41 settings/s``)."""
    rate = done / max(elapsed_s, 1e-9)
    return f"{rate:,.0f} {unit}/s" if rate >= 10 else f"{rate:.2g} {unit}/s"


class ProgressLine:
    """Rate-limited progress of one loop: a line once both ``every_fraction`` of the work and ``every_s``
    seconds have passed since the last one (whichever comes later), so a short loop stays silent and a
    long one never prints a line per item. ``say`` is the module's progress callback (``None``: silent)."""

    def __init__(self, say: Callable[[str], None] | None, label: str, total: int, unit: str,
                 every_fraction: float = 0.1, every_s: float = 30.0,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.say, self.label, self.total, self.unit = say, label, total, unit
        self.every_fraction, self.every_s, self.clock = every_fraction, every_s, clock
        self.done = 0
        self.t0 = clock()
        self._last_done, self._last_t = 0, self.t0

    def text(self) -> str:
        """``label: 1,280/5,600 prompts, 42 prompts/s, ETA 1 min 43 s``."""
        elapsed = self.clock() - self.t0
        parts = [f"{self.label}: {self.done:,}/{self.total:,} {self.unit}", rate_text(self.done, elapsed, self.unit),
                 eta_text(self.done, self.total, elapsed)]
        return ", ".join(p for p in parts if p)

    def advance(self, n: int = 1) -> None:
        self.update(self.done + n)

    def update(self, done: int) -> None:
        self.done = done
        now = self.clock()
        enough_work = done - self._last_done >= self.every_fraction * self.total
        if self.say is None or done >= self.total or not enough_work or now - self._last_t < self.every_s:
            return  # the caller says when the loop is finished, in its own words
        self._last_done, self._last_t = done, now
        self.say(self.text())

    def elapsed(self) -> float:
        return self.clock() - self.t0
