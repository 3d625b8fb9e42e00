"""Configuration dataclasses, validated once at construction.

Every bad value raises ``ValueError`` naming the field, the value and what would be valid, before any
compute starts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hsae.checks import build_params, check_finite_nonneg, check_positive, check_positive_int
from hsae.variants import VARIANTS


@dataclass(frozen=True)
class SAEConfig:
    """What SAE to build: the variant's name, its sizes and its own parameters.

    ``params`` holds the variant's parameters (see ``docs/variants.md``); missing ones take the
    paper's defaults. After construction ``resolved`` is the variant's validated parameter dataclass.
    """

    variant: str = "relu"
    d_in: int = 640
    d_sae: int = 2048
    # Compared through ``resolved``: {} and the explicit defaults are the same configuration.
    params: Mapping[str, Any] = field(default_factory=dict, compare=False)
    resolved: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; valid variants: {sorted(VARIANTS)}")
        check_positive_int("d_in", self.d_in)
        check_positive_int("d_sae", self.d_sae)
        if not isinstance(self.params, Mapping):
            raise ValueError(f"params must be a mapping of parameter names to values, got {self.params!r}")
        cls = VARIANTS[self.variant]
        resolved = build_params(cls.Params, cls.Params.resolve_given(dict(self.params)), f"variant {self.variant!r}")
        resolved.validate(self.d_sae)
        object.__setattr__(self, "params", dict(self.params))
        object.__setattr__(self, "resolved", resolved)

    def flat(self) -> dict[str, Any]:
        """Every value as one flat, typed mapping (the ``cfg_*`` columns of the results)."""
        out: dict[str, Any] = {"variant": self.variant, "d_in": self.d_in, "d_sae": self.d_sae}
        for f in dataclasses.fields(self.resolved):
            value = getattr(self.resolved, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "params": {
                f.name: (list(v) if isinstance(v := getattr(self.resolved, f.name), tuple) else v)
                for f in dataclasses.fields(self.resolved)
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SAEConfig:
        return cls(variant=data["variant"], d_in=data["d_in"], d_sae=data["d_sae"],
                   params=dict(data.get("params", {})))


@dataclass(frozen=True)
class TrainConfig:
    """How to train: the paper's protocol by default (AdamW, lr 3e-4, wd 0.01, batch 2048, seed 42)."""

    steps: int = 1000
    batch_size: int = 2048
    lr: float = 3e-4
    weight_decay: float = 0.01
    seed: int = 42
    grad_clip: float = 1.0
    # Scale inputs so that E||x - mean||^2 = d_in; the scale is folded back into the weights on export.
    normalize_activations: bool = True
    # Sparsity coefficients ramp linearly from 0 over these steps (0: no warm-up).
    l1_warmup_steps: int = 0
    # Learning rate: linear warm-up from 0 over these steps, then constant, then a linear decay to 0
    # over the last ``lr_decay_fraction`` of the steps (docs/training.md, "The embedded profile's budget").
    lr_warmup_steps: int = 0
    lr_decay_fraction: float = 0.0
    # b_dec starts at the geometric median of the first batch (robust to the residual stream's outliers)
    # instead of its mean.
    geometric_median_init: bool = True
    log_every: int = 10
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    device: str = "cpu"
    # Mixed precision for the forward pass and loss: "bf16" or "none" (fp32 everywhere); "auto" = bfloat16 on
    # CUDA, else fp32. A sweep sets it from the precision it measured on the machine (hsae.machine), never from a
    # profile: it is a run setting, not part of what a trial is.
    autocast: str = "auto"
    # torch.compile the variant's loss: a 10-40 s compile per process for a few per cent per step
    # (docs/performance.md), so it pays only on long runs.
    compile: bool = False
    # The calibration phase (docs/training.md, "Target L0"): during the first ``calibration_fraction`` of the
    # steps the trainer may change the objective (the L0 controller scales the shared sparsity coefficient of an
    # SAE with a ``target_l0``) and the dictionary (dead latents resampled); after it both are frozen, and the
    # convergence rule judges the held-out MSE on the constant-rate steps that follow.
    calibration_fraction: float = 0.6
    # The controller: log(multiplier) += gain * log(L0 EMA / target) each step after the L1 warm-up.
    l0_control_gain: float = 0.02
    # Smoothing of the training-batch L0 the controller reads (EMA weight of the past).
    l0_ema_decay: float = 0.9
    # Resample latents dead for ``dead_tokens`` (the variant's parameter) every this many steps of the
    # calibration phase, in variants with an L1 penalty (0: never; docs/training.md, "Dead latents").
    resample_every: int = 0
    # Train until converged (docs/training.md, "Extensions"): while the convergence rule fails at the last step,
    # train ``steps_per_extension()`` more, at most ``max_extensions`` times. The calibration phase keeps its
    # fraction of the longer run, so the controller acts again and the last 20% are again one fixed objective.
    # An extension's size is ``extension_steps``, or where that is 0 ``extension_fraction`` of ``steps`` (so a
    # profile's budget and its extensions scale together: --steps N trains N to N x (1 + max x fraction)).
    extension_steps: int = 0
    max_extensions: int = 0
    extension_fraction: float = 0.0

    def __post_init__(self) -> None:
        check_positive_int("steps", self.steps)
        if self.autocast not in ("auto", "bf16", "none"):
            raise ValueError(f"autocast must be one of 'auto', 'bf16', 'none', got {self.autocast!r}")
        check_positive_int("batch_size", self.batch_size)
        check_positive("lr", self.lr)
        check_finite_nonneg("weight_decay", self.weight_decay)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        check_positive("grad_clip", self.grad_clip)
        check_positive_int("l1_warmup_steps", self.l1_warmup_steps, minimum=0)
        check_positive_int("lr_warmup_steps", self.lr_warmup_steps, minimum=0)
        if not isinstance(self.lr_decay_fraction, (int, float)) or not 0.0 <= self.lr_decay_fraction < 1.0:
            raise ValueError(f"lr_decay_fraction must be in [0, 1), got {self.lr_decay_fraction!r}")
        # A warm-up longer than the run only keeps it below full rate; overlapping the decay is a mistake.
        if self.lr_decay_fraction and self.lr_warmup_steps + self.lr_decay_fraction * self.steps > self.steps:
            raise ValueError(f"lr_warmup_steps={self.lr_warmup_steps} plus the decay "
                             f"({self.lr_decay_fraction} x {self.steps} steps) exceed steps={self.steps}")
        check_positive_int("log_every", self.log_every)
        check_positive_int("checkpoint_every", self.checkpoint_every, minimum=0)
        check_positive_int("keep_checkpoints", self.keep_checkpoints)
        if self.device not in ("cpu", "cuda", "auto") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be one of 'cpu', 'cuda', 'cuda:N', 'auto', got {self.device!r}")
        for name in ("calibration_fraction", "l0_ema_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
        check_positive("l0_control_gain", self.l0_control_gain)
        check_positive_int("resample_every", self.resample_every, minimum=0)
        check_positive_int("extension_steps", self.extension_steps, minimum=0)
        check_positive_int("max_extensions", self.max_extensions, minimum=0)
        fraction = self.extension_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < math.inf:
            raise ValueError(f"extension_fraction must be a number >= 0 (the share of the steps each extension "
                             f"adds), got {fraction!r}")
        if self.max_extensions and not self.steps_per_extension():
            raise ValueError(f"max_extensions={self.max_extensions} needs extension_steps > 0 or extension_fraction "
                             f"> 0 (the steps each extension adds), got {self.extension_steps} and {fraction}; "
                             f"max_extensions=0 turns extensions off")
        if self.max_extensions and self.lr_decay_fraction:
            raise ValueError(f"max_extensions={self.max_extensions} continues a run at its constant rate: it needs "
                             f"lr_decay_fraction=0, got {self.lr_decay_fraction} (with a decay, set max_extensions=0)")

    def steps_per_extension(self) -> int:
        """The steps one extension adds: ``extension_steps``, else ``extension_fraction`` of ``steps``, rounded, at
        least 1 (0: none). The embedded profile's 1/3 of 4,500 is 1,500."""
        if self.extension_steps or not self.extension_fraction:
            return self.extension_steps
        return max(1, round(self.extension_fraction * self.steps))

    def resolved_extensions(self) -> TrainConfig:
        """This schedule with its extension size in steps (``extension_fraction`` spent): what a trial is given, and
        what its row records."""
        return dataclasses.replace(self, extension_steps=self.steps_per_extension(), extension_fraction=0.0)

    def extended(self, times: int) -> TrainConfig:
        """This schedule ``times`` extensions longer (docs/training.md, "Extensions")."""
        size = self.steps_per_extension()
        return dataclasses.replace(self, steps=self.steps + times * size, extension_steps=size, extension_fraction=0.0)

    def max_steps(self) -> int:
        """The most steps a run may train: its budget and every extension."""
        return self.extended(self.max_extensions).steps

    def calibration_end(self) -> int:
        """The first step after the calibration phase: from here the objective and the dictionary's
        interventions are fixed."""
        return round(self.calibration_fraction * self.steps)

    def decay_start(self) -> int:
        """The first step of the linear learning-rate decay (``steps`` when there is none)."""
        return self.steps - round(self.lr_decay_fraction * self.steps)

    def lr_at(self, step: int) -> float:
        """The learning rate of the step that follows ``step`` completed steps."""
        factor = 1.0
        if self.lr_warmup_steps and step < self.lr_warmup_steps:
            factor = (step + 1) / self.lr_warmup_steps
        decay_steps = round(self.lr_decay_fraction * self.steps)
        if decay_steps and step >= self.steps - decay_steps:
            factor = min(factor, (self.steps - step) / decay_steps)
        return self.lr * factor

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
