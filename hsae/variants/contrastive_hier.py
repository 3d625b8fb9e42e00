"""`contrastive_hier`: dynamic_hier plus supervised InfoNCE (tau=0.1, weight 0.1) on domain labels.

A token's embedding is its activation mass per fine group (f @ assignment, 64-d); its positives are
the batch's other tokens of the same domain (forget or retain corpus), so "semantic concepts" are the
measurable domains the unlearning score asks about.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hsae import losses
from hsae.checks import check_finite_nonneg, check_positive
from hsae.variants.dynamic_hier import DynamicHierParams, DynamicHierSAE


@dataclass(frozen=True)
class ContrastiveHierParams(DynamicHierParams):
    nce_temperature: float = 0.1
    nce_weight: float = 0.1

    def validate(self, d_sae: int) -> None:
        super().validate(d_sae)
        check_positive("nce_temperature", self.nce_temperature)
        check_finite_nonneg("nce_weight", self.nce_weight)


class ContrastiveHierSAE(DynamicHierSAE):
    name = "contrastive_hier"
    Params = ContrastiveHierParams
    needs_labels = True

    def hierarchy_terms(self, f, fine, labels) -> dict[str, torch.Tensor]:
        if labels is None:
            raise ValueError("variant 'contrastive_hier' needs domain labels with every batch (forget/retain)")
        terms = super().hierarchy_terms(f, fine, labels)
        # Estimated on the same token subset as the Gram: (B, B) similarities cost B^2 x 64.
        rows = self.gram_rows(f)
        terms["nce"] = self.p.nce_weight * losses.info_nce(rows @ fine, labels[: rows.shape[0]], self.p.nce_temperature)
        return terms

    def metric_nce_temperature(self) -> float:
        return self.p.nce_temperature
