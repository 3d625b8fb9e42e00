"""Edits of the layer-L residual, all with one interface so the score cannot tell them apart.

``apply(x, valid)`` takes residuals (B, T, d) and a mask of real (non-pad) positions and returns the
edited residuals and a (B,) mask of prompts it actually changed (unchanged prompts need no re-run).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class SAEClamp:
    """SAEBench's intervention: selected features, where they fire, are set to -multiplier.

    x' = x - decode(f) + decode(f_mod) = x + (f_mod - f) W_dec: the reconstruction error is kept, and
    BOS (position 0) is left alone. ``encode`` maps raw activations to features (the SAE's own encoder,
    so TopK and JumpReLU fire as they do in use); ``w_dec`` is the raw-space (folded) decoder; the
    multiplier is in the SAE's feature units (training-normalised).
    """

    encode: Callable[[torch.Tensor], torch.Tensor]
    w_dec: torch.Tensor
    features: torch.Tensor  # (N,) feature indices
    multiplier: float

    def _selected(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The selected features' activations at the positions the clamp may edit (not BOS, not padding)."""
        f = self.encode(x)[..., self.features] * valid[..., None]
        f[:, 0] = 0.0
        return f

    def apply(self, x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.features.numel() == 0:
            return x, torch.zeros(x.shape[0], dtype=torch.bool)
        f = self._selected(x, valid)
        active = f > 0
        delta = torch.where(active, -self.multiplier - f, torch.zeros_like(f))
        return x + delta @ self.w_dec[self.features], active.flatten(1).any(dim=1)

    def edit_keys(self, x: torch.Tensor, valid: torch.Tensor, rows: torch.Tensor) -> list[tuple]:
        """What determines the edit of each prompt ``rows`` of ``x``: the multiplier and the selected features
        that fire in it. Two clamps with equal keys on a prompt edit it identically (features that do not fire
        there add nothing), so its answer is computed once (``Evaluator.accuracy``'s memo)."""
        # The whole batch, as ``apply`` saw it: its features are cached (BatchFeatures keys the batch tensor), and
        # the keys then follow exactly the firing that decided the edit.
        firing = (self._selected(x, valid)[rows] > 0).any(dim=1)
        return [(self.multiplier, tuple(self.features[row].tolist())) for row in firing]


@dataclass
class ConditionalProjection:
    """Positive control: remove a direction where the residual's projection on it is unusually high.

    p = (x - center) . v; where p > threshold, x' = x - strength * p * v. With v the forget-minus-retain
    difference of means and the threshold a high percentile of retain-text projections, this removes
    forget-domain knowledge while sparing retain text; with a random v it should do nothing.
    """

    direction: torch.Tensor  # (d,) unit
    center: torch.Tensor  # (d,)
    threshold: float
    strength: float

    def apply(self, x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = (x - self.center) @ self.direction
        hit = (p > self.threshold) & valid.bool()
        hit[:, 0] = False
        edit = torch.where(hit, -self.strength * p, torch.zeros_like(p))
        return x + edit[..., None] * self.direction, hit.any(dim=1)
