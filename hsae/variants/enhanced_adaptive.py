"""`enhanced_adaptive`: adaptive_ortho with 64 groups, alpha within [0.2, 0.4], regrouping every 50 steps."""

from __future__ import annotations

from dataclasses import dataclass

from hsae.variants.adaptive_ortho import AdaptiveOrthoParams, AdaptiveOrthoSAE


@dataclass(frozen=True)
class EnhancedAdaptiveParams(AdaptiveOrthoParams):
    n_groups: int = 64
    alpha_min: float = 0.2
    alpha_max: float = 0.4
    regroup_every: int = 50


class EnhancedAdaptiveSAE(AdaptiveOrthoSAE):
    name = "enhanced_adaptive"
    Params = EnhancedAdaptiveParams
