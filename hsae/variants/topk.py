"""`topk`: keep each token's k largest pre-activations (ReLU'd); sparsity comes from k, no L1 term.

TopK has no L1 pressure that could revive a latent once it stops firing; the auxiliary dead-latent loss
every variant carries (``VariantParams``, Gao et al. 2024) is what does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hsae.checks import check_positive_int
from hsae.variants.base import SAE, VariantParams


@dataclass(frozen=True)
class TopKParams(VariantParams):
    k: int = 32

    def validate(self, d_sae: int) -> None:
        super().validate(d_sae)
        check_positive_int("k", self.k)
        if self.k > d_sae:
            raise ValueError(f"k={self.k} must be <= d_sae={d_sae}")

    @classmethod
    def resolve_given(cls, given: dict) -> dict:
        """A ``target_l0`` sets k; giving both with different values is refused."""
        target = given.get("target_l0")
        if target is None:
            return given
        if "k" in given and given["k"] != target:
            raise ValueError(f"k={given['k']} and target_l0={target} disagree: a TopK SAE's L0 is k; give one")
        return {**given, "k": target}


class TopKSAE(SAE):
    name = "topk"
    Params = TopKParams
    saelens_architecture = "topk"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.pre_activation(x))
        values, indices = pre.topk(self.p.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, values)

    def sparsity_terms(self, f, scale) -> dict[str, torch.Tensor]:
        return {}

    def saelens_extra_cfg(self) -> dict:
        return {"activation_fn_kwargs": {"k": self.p.k}}
