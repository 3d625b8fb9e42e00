"""Validators shared by the configuration dataclasses and every variant's parameters.

Each raises ``ValueError`` naming the field, the value and what would be valid. This module imports
nothing from ``hsae``, so both ``hsae.config`` and ``hsae.variants`` can use it without a cycle.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any


def check_finite_nonneg(name: str, value: Any) -> None:
    """Coefficients: a finite number >= 0 (NaN, inf and negatives are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_positive(name: str, value: Any) -> None:
    """Temperatures, learning rates: a finite number > 0."""
    check_finite_nonneg(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def check_positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_divides(name: str, groups: int, d_sae: int) -> None:
    if d_sae % groups != 0:
        divisors = [g for g in range(2, min(d_sae, 256) + 1) if d_sae % g == 0]
        raise ValueError(
            f"{name}={groups} does not divide the dictionary size d_sae={d_sae}; "
            f"choose one of {divisors[:16]}{' ...' if len(divisors) > 16 else ''}"
        )


def build_params(params_cls: type, values: Mapping[str, Any], where: str) -> Any:
    """Instantiate a variant's parameter dataclass, refusing unknown keys by name."""
    known = {f.name for f in dataclasses.fields(params_cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {unknown} for {where}; valid parameters: {sorted(known)}"
        )
    return params_cls(**values)
