"""`dynamic_hier`: the 8x8 hierarchy with attention-based soft group assignment (eq. 2).

p(g^1_i | feature k) = softmax_i(q^1_i . key_k / tau), p(g^2_ij | k) = p(g^1_i | k) softmax_j(q^2_ij . key_k / tau),
with key_k = W_key^T (unit decoder row k, detached) and a learnable temperature tau (init 1.0). The
assignment's value is refreshed every ``refresh_every`` steps and held in between; its gradient
(straight-through) reaches the queries, keys and temperature every step. An entropy bonus on how the
activation mass spreads over coarse groups (weight 0.01) keeps assignments from collapsing into one group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hsae import losses
from hsae.checks import check_finite_nonneg, check_positive, check_positive_int
from hsae.variants.static_hier import HierParams, StaticHierSAE

# Keeps tau away from 0 where the softmax would turn into a non-differentiable argmax.
_MIN_TEMPERATURE = 1e-2


@dataclass(frozen=True)
class DynamicHierParams(HierParams):
    temperature_init: float = 1.0
    entropy_coeff: float = 0.01
    refresh_every: int = 50
    key_dim: int = 64

    def validate(self, d_sae: int) -> None:
        super().validate(d_sae)
        check_positive("temperature_init", self.temperature_init)
        check_finite_nonneg("entropy_coeff", self.entropy_coeff)
        check_positive_int("refresh_every", self.refresh_every)
        check_positive_int("key_dim", self.key_dim)


class DynamicHierSAE(StaticHierSAE):
    name = "dynamic_hier"
    Params = DynamicHierParams

    def __init__(self, cfg, generator=None) -> None:
        super().__init__(cfg, generator)
        p = self.p
        scale = cfg.d_in ** -0.5
        self.W_key = nn.Parameter(torch.randn(cfg.d_in, p.key_dim, generator=generator) * scale)
        self.query_l1 = nn.Parameter(torch.randn(p.n_groups_l1, p.key_dim, generator=generator))
        self.query_l2 = nn.Parameter(torch.randn(p.n_groups_l1, p.n_groups_l2, p.key_dim, generator=generator))
        self.log_temperature = nn.Parameter(torch.tensor(float(p.temperature_init)).log())
        # Value of the assignment held between refreshes (replaces the static buffer's role).
        self.assignment_l2.copy_(self.attention_assignment().detach())

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp().clamp_min(_MIN_TEMPERATURE)

    def attention_levels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Live p(g^1_i | k), (n, K1), and p(g^2_ij | g^1_i, k), (n, K1, K2)."""
        keys = F.normalize(self.W_dec.detach(), dim=1) @ self.W_key
        tau = self.temperature
        p1 = torch.softmax(keys @ self.query_l1.T / tau, dim=-1)
        p2 = torch.softmax(torch.einsum("nd,ijd->nij", keys, self.query_l2) / tau, dim=-1)
        return p1, p2

    def attention_assignment(self) -> torch.Tensor:
        """Live soft assignment of every feature to the K1*K2 fine groups (parent-major), (n, K1*K2)."""
        p1, p2 = self.attention_levels()
        return (p1[:, :, None] * p2).reshape(p1.shape[0], -1)

    @torch.no_grad()
    def mechanism_metrics(self, f: torch.Tensor) -> dict[str, float]:
        """Adds how decided the live coarse assignment is: mean entropy of p(g^1 | k) over log K1
        (1 = uniform, 0 = every feature in one group) and the temperature."""
        p1, _ = self.attention_levels()
        entropy = -(p1 * p1.clamp_min(1e-12).log()).sum(dim=1).mean() / math.log(self.p.n_groups_l1)
        return {**super().mechanism_metrics(f), "assignment_entropy": float(entropy),
                "temperature": float(self.temperature)}

    def fine_groups(self) -> None:
        return None  # soft assignments: the feature-space Gram

    def fine_assignment(self) -> torch.Tensor:
        live = self.attention_assignment()
        # Straight-through: the value of the last refresh, the gradient of the live attention.
        return self.assignment_l2 + (live - live.detach())

    def hierarchy_terms(self, f, fine, labels) -> dict[str, torch.Tensor]:
        terms = super().hierarchy_terms(f, fine, labels)
        terms["entropy"] = -self.p.entropy_coeff * losses.group_usage_entropy(f, self.coarse(fine))
        return terms

    @torch.no_grad()
    def on_step_end(self, step: int, f: torch.Tensor) -> None:
        super().on_step_end(step, f)
        if step % self.p.refresh_every == 0:
            self.assignment_l2.copy_(self.attention_assignment())
