"""`fixed_ortho`: fixed contiguous feature groups plus an activation-orthogonality penalty (alpha=0.1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hsae import losses
from hsae.checks import check_divides, check_finite_nonneg, check_positive_int
from hsae.variants.base import SAE, GramParams, contiguous_assignment


@dataclass(frozen=True)
class FixedOrthoParams(GramParams):
    n_groups: int = 32
    alpha: float = 0.1

    def validate(self, d_sae: int) -> None:
        super().validate(d_sae)
        check_positive_int("n_groups", self.n_groups, minimum=2)
        check_divides("n_groups", self.n_groups, d_sae)
        check_finite_nonneg("alpha", self.alpha)


class FixedOrthoSAE(SAE):
    name = "fixed_ortho"
    Params = FixedOrthoParams

    def __init__(self, cfg, generator=None) -> None:
        super().__init__(cfg, generator)
        self.register_buffer("assignment", contiguous_assignment(cfg.d_sae, self.p.n_groups))
        self.register_buffer("group_of", self.assignment.argmax(dim=1))

    def structure_terms(self, x, f, labels, step) -> dict[str, torch.Tensor]:
        return {"ortho": losses.group_orthogonality(self.gram_rows(f), self.assignment, self.p.alpha, self.group_of)}

    def group_assignment(self) -> torch.Tensor:
        return self.assignment
