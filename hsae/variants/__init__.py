"""The variant registry: ``VARIANTS`` maps each name to its SAE class. One module per variant."""

from __future__ import annotations

from hsae.variants.adaptive_ortho import AdaptiveOrthoSAE
from hsae.variants.base import SAE, LossOutput, StepInput, VariantParams
from hsae.variants.contrastive_hier import ContrastiveHierSAE
from hsae.variants.dynamic_hier import DynamicHierSAE
from hsae.variants.enhanced_adaptive import EnhancedAdaptiveSAE
from hsae.variants.fixed_ortho import FixedOrthoSAE
from hsae.variants.matryoshka_batchtopk import MatryoshkaBatchTopKSAE
from hsae.variants.relu import ReluSAE
from hsae.variants.static_hier import StaticHierSAE
from hsae.variants.topk import TopKSAE

VARIANTS: dict[str, type[SAE]] = {
    cls.name: cls
    for cls in (
        ReluSAE,
        FixedOrthoSAE,
        AdaptiveOrthoSAE,
        EnhancedAdaptiveSAE,
        StaticHierSAE,
        DynamicHierSAE,
        ContrastiveHierSAE,
        TopKSAE,
        MatryoshkaBatchTopKSAE,
    )
}

# The six variants of the paper's study, in its order (relu is the baseline of section 3.1).
PAPER_VARIANTS = (
    "fixed_ortho",
    "adaptive_ortho",
    "enhanced_adaptive",
    "static_hier",
    "dynamic_hier",
    "contrastive_hier",
)


def build_sae(cfg, generator=None) -> SAE:
    """Instantiate the SAE that ``cfg`` (an already validated SAEConfig) describes."""
    return VARIANTS[cfg.variant](cfg, generator=generator)


__all__ = ["VARIANTS", "PAPER_VARIANTS", "SAE", "LossOutput", "StepInput", "VariantParams", "build_sae"]
