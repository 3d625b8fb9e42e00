"""Machine settings: what the run chooses for the machine in front of it, never part of a trial's identity.

Precision is decided by the device, not by a profile: bfloat16 only where the device computes it natively
and faster. On CUDA that is a capability (8.0, Ampere, and later); on a CPU it is measured: one product at
the trial's own shapes in fp32 and in bf16 under autocast, bounded in time and cached per machine (CPUs
of one model name differ: one has AVX-512 BF16, another runs bf16 products 70x slower than fp32).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hsae.atomic import atomic_write_text

PRECISIONS = ("auto", "bf16", "fp32")
# bf16 pays only when it is clearly faster: below this the rounding costs accuracy for nothing.
BF16_MIN_SPEEDUP = 1.1
# The CPU probe's rows: a slow bf16 product at the trial's width takes about a second at this height.
PROBE_ROWS = 256
PROBE_BUDGET_S = 2.0
# Autocast's name of each precision (TrainConfig.autocast).
AUTOCAST = {"bf16": "bf16", "fp32": "none"}


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run uses and why, in words a person reads in the plan and on the row."""

    precision: str  # "bf16" | "fp32"
    reason: str
    speedup: float | None = None  # fp32 time / bf16 time, where measured

    @property
    def autocast(self) -> str:
        return AUTOCAST[self.precision]


def check_precision(value: str) -> str:
    if value not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {value!r}")
    return value


def cpu_identity() -> dict[str, str]:
    """What tells two CPUs apart for speed: model name, torch's capability level and the instruction flags."""
    name, flags = "unknown", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name == "unknown":
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = value.strip()
    except OSError:
        pass
    return {"model": name, "capability": torch.backends.cpu.get_cpu_capability(),
            "flags": hashlib.sha256(flags.encode()).hexdigest()[:16], "torch": torch.__version__}


Matmul = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]


def autocast_matmul(a: torch.Tensor, w: torch.Tensor, bf16: bool) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return a @ w


def measure_bf16_speedup(d_in: int, d_out: int, threads: int = 1, budget_s: float = PROBE_BUDGET_S,
                         matmul: Matmul = autocast_matmul) -> float:
    """fp32 time / bf16 time of a (PROBE_ROWS x d_in) @ (d_in x d_out) product on this CPU with ``threads``.

    fp32 and bf16 products alternate (so a burst of other load hits both), best time of each; up to 7 rounds
    within ``budget_s``. A bf16 product slower than the whole budget ends the probe after the warm-up round:
    the answer is plain by then.
    """
    gen = torch.Generator().manual_seed(0)
    a, w = torch.randn(PROBE_ROWS, d_in, generator=gen), torch.randn(d_in, d_out, generator=gen)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        best = {False: math.inf, True: math.inf}
        spent = 0.0
        for _ in range(7):
            for bf16 in (False, True):
                t0 = time.perf_counter()
                matmul(a, w, bf16)
                took = time.perf_counter() - t0
                best[bf16], spent = min(best[bf16], took), spent + took
            if spent > budget_s:
                break
        return best[False] / best[True]
    finally:
        torch.set_num_threads(previous)


def cache_root() -> Path:
    """Where this machine keeps converted models, activation shards and probes: $HSAE_CACHE or ~/.cache/hsae."""
    return Path(os.environ.get("HSAE_CACHE", Path.home() / ".cache" / "hsae"))


def probe_cache_path() -> Path:
    return cache_root() / "machine" / "bf16_probe.json"


_MEASURED: dict[str, float] = {}


def cpu_bf16_speedup(d_in: int, d_out: int, threads: int, persist: bool = True) -> float:
    """The measured bf16 speed-up for these shapes on this CPU: from memory, the per-machine cache, or a probe
    (kept in the cache unless ``persist`` is False: a dry run writes nothing)."""
    key = hashlib.sha256(json.dumps({**cpu_identity(), "d_in": d_in, "d_out": d_out, "threads": threads},
                                    sort_keys=True).encode()).hexdigest()[:16]
    if key in _MEASURED:
        return _MEASURED[key]
    path = probe_cache_path()
    cached = _read_json(path)
    if key not in cached:
        cached[key] = measure_bf16_speedup(d_in, d_out, threads)
        if persist:
            _keep(path, key, cached[key])
    _MEASURED[key] = float(cached[key])
    return _MEASURED[key]


def _keep(path: Path, key: str, speedup: float) -> None:
    try:
        atomic_write_text(path, json.dumps({**_read_json(path), key: speedup}, indent=1))
    except OSError:
        pass  # a read-only cache costs a probe per process, nothing more


def _read_json(path: Path) -> dict[str, float]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def resolve_precision(requested: str, device: torch.device, d_in: int, d_out: int,
                      threads: int | None = None, persist: bool = True) -> PrecisionChoice:
    """What ``requested`` ("auto", "bf16", "fp32") means on ``device`` for a d_in -> d_out dictionary
    (``persist``: whether a CPU probe's measurement goes to the machine's cache)."""
    check_precision(requested)
    if requested != "auto":
        return PrecisionChoice(requested, f"{requested}: asked for")
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) >= (8, 0):
            return PrecisionChoice("bf16", f"bf16: CUDA capability {major}.{minor} computes it natively")
        return PrecisionChoice("fp32", f"fp32: CUDA capability {major}.{minor} has no native bf16")
    if device.type != "cpu":
        return PrecisionChoice("fp32", f"fp32: no bf16 rule for device {device.type!r}")
    speedup = cpu_bf16_speedup(d_in, d_out, threads or torch.get_num_threads(), persist)
    capability = torch.backends.cpu.get_cpu_capability()
    if speedup >= BF16_MIN_SPEEDUP:
        return PrecisionChoice("bf16", f"bf16: {speedup:.1f}x faster than fp32 on this CPU ({capability})", speedup)
    slower = f"{1 / speedup:.0f}x slower" if speedup < 0.5 else f"only {speedup:.2f}x as fast"
    return PrecisionChoice("fp32", f"fp32: bf16 is {slower} on this CPU ({capability})", speedup)


@dataclass(frozen=True)
class RunSettings:
    """How this run uses the machine: kept out of every trial key, recorded (resolved) on every row."""

    precision: str = "auto"
    threads_per_trial: int = 1

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if isinstance(self.threads_per_trial, bool) or not isinstance(self.threads_per_trial, int) \
                or self.threads_per_trial < 1:
            raise ValueError(f"threads_per_trial must be an integer >= 1, got {self.threads_per_trial!r}")

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def machine_cores() -> int:
    """Cores this process may use (the affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Layout:
    """Trials at once, torch threads per trial and the server's evaluators on a CPU, with the rule that chose
    them (printed in the plan)."""

    trials: int
    threads: int
    rule: str
    evaluators: int = 1


def default_layout(cores: int, evaluate: bool) -> Layout:
    """One thread per trial, and one trial more than cores while trials wait for their evaluations.

    Measured with bench/concurrency.py (docs/performance.md, "Precision and concurrency"): at the main job's
    shape a second thread speeds one trial's step far less than a second trial adds, so threads stay at 1;
    a trial waits for the activation server to evaluate its SAE for part of its life, and an extra trial
    keeps the cores busy meanwhile, at no cost to training throughput while all train. Two evaluators (each a
    model copy on a thread of the server) where there are two cores: trials finishing together no longer
    queue for one (docs/performance.md, "Evaluation").
    """
    if evaluate:
        evaluators = min(cores, 2)
        return Layout(cores + 1, 1, f"{cores} cores: {cores + 1} trials x 1 thread (one extra trial trains while "
                                    f"another waits for its evaluation), {evaluators} evaluator(s)", evaluators)
    return Layout(cores, 1, f"{cores} cores: {cores} trials x 1 thread (no evaluation to wait for)")
