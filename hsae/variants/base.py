"""The SAE every variant extends: E(x) = ReLU(x W_enc + b_enc), D(f) = f W_dec + b_dec (paper, sec. 3.1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from hsae import losses
from hsae.config import check_finite_nonneg, check_positive_int

if TYPE_CHECKING:
    from hsae.config import SAEConfig


@dataclass(frozen=True)
class L1Params:
    """Parameters shared by the L1-penalised variants."""

    # Multiplies mean_b sum_k |f_bk| / sqrt(d_in): with E||x||^2 = d_in that makes one coefficient give
    # similar sparsity at any width (a feature pays off when its activation exceeds ~ l1_coeff * sqrt(d_in)).
    l1_coeff: float = 0.1

    def validate(self, d_sae: int) -> None:
        check_finite_nonneg("l1_coeff", self.l1_coeff)


@dataclass(frozen=True)
class GramParams(L1Params):
    """Shared by the orthogonality variants: how many tokens of each batch estimate the activation Gram.

    The (n, n) Gram costs as much as the encoder and decoder together at n = 2d; its cosines are
    averages over tokens, so a random subset of the batch (batches are shuffled: the first rows)
    estimates them. 0 uses the whole batch.
    """

    gram_tokens: int = 512

    def validate(self, d_sae: int) -> None:
        super().validate(d_sae)
        check_positive_int("gram_tokens", self.gram_tokens, minimum=0)


@dataclass
class LossOutput:
    total: torch.Tensor
    terms: dict[str, torch.Tensor]
    x_hat: torch.Tensor
    f: torch.Tensor


class SAE(nn.Module):
    """Plain ReLU SAE with unit-norm decoder rows. Subclasses add loss terms and grouping."""

    name: ClassVar[str] = "relu"
    Params: ClassVar[type] = L1Params
    # SAELens architecture name used on export.
    saelens_architecture: ClassVar[str] = "standard"
    needs_labels: ClassVar[bool] = False

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.p: Any = cfg.resolved
        d, n = cfg.d_in, cfg.d_sae
        w_dec = torch.randn(n, d, generator=generator)
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        # Tied init, scaled so the first reconstruction is about x (about half of n random directions
        # fire, each adding ~1/d of x): an overshooting start costs hundreds of steps on short runs.
        self.W_enc = nn.Parameter(w_dec.T.clone() * min(1.0, 2.0 * d / n))
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.b_dec = nn.Parameter(torch.zeros(d))

    # -- forward -------------------------------------------------------------------------------
    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.pre_activation(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encode(x)
        return self.decode(f), f

    # -- training ------------------------------------------------------------------------------
    def loss(self, x: torch.Tensor, labels: torch.Tensor | None, step: int, sparsity_scale: float = 1.0) -> LossOutput:
        x_hat, f = self(x)
        terms = {"mse": losses.reconstruction_mse(x, x_hat)}
        terms.update(self.sparsity_terms(f, sparsity_scale))
        terms.update(self.structure_terms(x, f, labels, step))
        total = sum(terms.values())
        return LossOutput(total=total, terms=terms, x_hat=x_hat, f=f)

    def sparsity_terms(self, f: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
        return {"l1": self.p.l1_coeff * scale * losses.l1_sparsity(f) / self.cfg.d_in**0.5}

    def structure_terms(
        self, x: torch.Tensor, f: torch.Tensor, labels: torch.Tensor | None, step: int
    ) -> dict[str, torch.Tensor]:
        """Variant-specific terms (orthogonality, entropy, InfoNCE); none for the plain SAE."""
        return {}

    @torch.no_grad()
    def after_step(self, step: int, f: torch.Tensor) -> None:
        """Called after each optimizer step with the step's (detached) features: keep decoder rows unit-norm."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    def gram_rows(self, f: torch.Tensor) -> torch.Tensor:
        """The rows of ``f`` the orthogonality Gram is estimated on (see GramParams)."""
        k = getattr(self.p, "gram_tokens", 0)
        return f[:k] if k and k < f.shape[0] else f

    # -- structure exposed to metrics ----------------------------------------------------------
    def group_assignment(self) -> torch.Tensor | None:
        """(n, K) map of features to (level-1) groups, rows summing to 1; None for ungrouped SAEs."""
        return None

    def saelens_extra_cfg(self) -> dict[str, Any]:
        return {}

    def extra_export_tensors(self) -> dict[str, torch.Tensor]:
        return {}


def contiguous_assignment(n: int, k: int, device: torch.device | None = None) -> torch.Tensor:
    """One-hot (n, k): feature i belongs to group i // (n / k)."""
    return F.one_hot(torch.arange(n, device=device) // (n // k), k).float()


def assignment_from_labels(group_of: torch.Tensor, k: int) -> torch.Tensor:
    return F.one_hot(group_of.long(), k).to(torch.float32)
