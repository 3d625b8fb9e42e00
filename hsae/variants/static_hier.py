"""`static_hier`: a fixed 8x8 two-level hierarchy of contiguous feature groups, loss of eq. (4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hsae import losses
from hsae.checks import check_divides, check_finite_nonneg, check_positive_int
from hsae.variants.base import SAE, GramParams, contiguous_assignment


@dataclass(frozen=True)
class HierParams(GramParams):
    n_groups_l1: int = 8
    n_groups_l2: int = 8
    alpha_l1: float = 0.4
    alpha_l2: float = 0.2

    def validate(self, d_sae: int) -> None:
        super().validate(d_sae)
        check_positive_int("n_groups_l1", self.n_groups_l1, minimum=2)
        check_positive_int("n_groups_l2", self.n_groups_l2, minimum=2)
        check_divides("n_groups_l1 * n_groups_l2", self.n_groups_l1 * self.n_groups_l2, d_sae)
        check_finite_nonneg("alpha_l1", self.alpha_l1)
        check_finite_nonneg("alpha_l2", self.alpha_l2)


class StaticHierSAE(SAE):
    name = "static_hier"
    Params = HierParams

    def __init__(self, cfg, generator=None) -> None:
        super().__init__(cfg, generator)
        k_all = self.p.n_groups_l1 * self.p.n_groups_l2
        self.register_buffer("assignment_l2", contiguous_assignment(cfg.d_sae, k_all))

    def fine_groups(self) -> torch.Tensor | None:
        """Hard fine-group index per feature (lets the loss take the token-space path); None if soft."""
        return self.assignment_l2.argmax(dim=1)

    def fine_assignment(self) -> torch.Tensor:
        return self.assignment_l2

    def coarse(self, fine: torch.Tensor) -> torch.Tensor:
        """Level-1 groups: the sum of each coarse group's sub-group columns."""
        return fine.reshape(fine.shape[0], self.p.n_groups_l1, self.p.n_groups_l2).sum(-1)

    def structure_terms(self, x, f, labels, step) -> dict[str, torch.Tensor]:
        # The assignment is computed once per step and shared by every term.
        return self.hierarchy_terms(f, self.fine_assignment(), labels)

    def hierarchy_terms(self, f, fine, labels) -> dict[str, torch.Tensor]:
        p = self.p
        return {"ortho": losses.hierarchical_orthogonality(self.gram_rows(f), fine, p.n_groups_l1, p.alpha_l1,
                                                           p.alpha_l2, self.fine_groups())}

    def group_assignment(self) -> torch.Tensor:
        return self.coarse(self.fine_assignment())

    @torch.no_grad()
    def mechanism_metrics(self, f: torch.Tensor) -> dict[str, float]:
        """RMS activation cosine across coarse groups and across sibling sub-groups: features that stay with
        their parent keep the first (penalised by alpha_L1) below the second (alpha_L2)."""
        k1 = self.p.n_groups_l1
        rms_l1, rms_l2, siblings = losses.hierarchy_block_rms(f, self.fine_assignment().to(f.dtype), k1)
        return {**super().mechanism_metrics(f),
                "val_cross_parent_rms": float(losses.pairwise_penalty(rms_l1, losses.off_diagonal(k1, f.device))),
                "val_sibling_rms": float(losses.pairwise_penalty(rms_l2, siblings))}
