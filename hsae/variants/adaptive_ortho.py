"""`adaptive_ortho`: 32 groups regrouped every 100 steps, per-pair alpha adapted within [0.05, 0.15].

Regrouping puts features that fire together into the same group (balanced greedy assignment on the
step's activation-cosine Gram). The coefficient of each group pair moves within [alpha_min, alpha_max]
by the rank of that pair's measured cross-group cosine: the most entangled pairs get alpha_max.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hsae import losses
from hsae.checks import check_divides, check_finite_nonneg, check_positive_int
from hsae.grouping import balanced_regroup, rank_scaled_alpha
from hsae.variants.base import SAE, GramParams, assignment_from_labels


@dataclass(frozen=True)
class AdaptiveOrthoParams(GramParams):
    n_groups: int = 32
    alpha_min: float = 0.05
    alpha_max: float = 0.15
    regroup_every: int = 100

    def validate(self, d_sae: int) -> None:
        super().validate(d_sae)
        check_positive_int("n_groups", self.n_groups, minimum=2)
        check_divides("n_groups", self.n_groups, d_sae)
        check_finite_nonneg("alpha_min", self.alpha_min)
        check_finite_nonneg("alpha_max", self.alpha_max)
        if self.alpha_min > self.alpha_max:
            raise ValueError(f"alpha_min={self.alpha_min} must be <= alpha_max={self.alpha_max}")
        check_positive_int("regroup_every", self.regroup_every)


class AdaptiveOrthoSAE(SAE):
    name = "adaptive_ortho"
    Params = AdaptiveOrthoParams

    def __init__(self, cfg, generator=None) -> None:
        super().__init__(cfg, generator)
        n, k = cfg.d_sae, self.p.n_groups
        self.register_buffer("group_of", torch.arange(n) // (n // k))
        mid = 0.5 * (self.p.alpha_min + self.p.alpha_max)
        self.register_buffer("pair_alpha", torch.full((k, k), mid) * losses.off_diagonal(k))
        # At the last regroup: the fraction of features that moved, and the mean cross-group RMS cosine of
        # the regroup's sample after / before it (below 1: the new groups lower the penalty). NaN before.
        self.register_buffer("last_regroup", torch.full((2,), float("nan")))

    def structure_terms(self, x, f, labels, step) -> dict[str, torch.Tensor]:
        rms = losses.group_block_rms(self.gram_rows(f), self.group_assignment(), self.group_of)
        return {"ortho": losses.pairwise_penalty(rms, self.pair_alpha)}

    @torch.no_grad()
    def on_step_end(self, step: int, f: torch.Tensor) -> None:
        super().on_step_end(step, f)
        # `step` counts completed steps: regroup after steps R, 2R, ...
        if step % self.p.regroup_every == 0:
            gram = losses.activation_cosine_gram(self.gram_rows(f))
            before_groups, before_rms = self.group_of.clone(), self._block_rms(gram)
            self.group_of.copy_(balanced_regroup(gram, self.group_of, self.p.n_groups))
            rms = self._block_rms(gram)
            self.pair_alpha.copy_(rank_scaled_alpha(rms, self.p.alpha_min, self.p.alpha_max))
            moved = (self.group_of != before_groups).float().mean()
            cross = losses.off_diagonal(self.p.n_groups, gram.device)
            ratio = losses.pairwise_penalty(rms, cross) / losses.pairwise_penalty(before_rms, cross).clamp_min(1e-12)
            self.last_regroup.copy_(torch.stack([moved, ratio]))

    def _block_rms(self, gram: torch.Tensor) -> torch.Tensor:
        """RMS activation cosine of every (group, group) block under the current groups."""
        a = self.group_assignment()
        return losses.block_rms(a.T @ gram.pow(2) @ a, a)

    def mechanism_metrics(self, f: torch.Tensor) -> dict[str, float]:
        moved, ratio = (float(v) for v in self.last_regroup)
        return {**super().mechanism_metrics(f), "regroup_moved": moved, "regroup_penalty_ratio": ratio}

    def group_assignment(self) -> torch.Tensor:
        return assignment_from_labels(self.group_of, self.p.n_groups).to(self.W_dec.dtype)
