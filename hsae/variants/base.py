"""The SAE every variant extends: E(x) = ReLU((x - b_dec) W_enc + b_enc), D(f) = f W_dec + b_dec (paper, sec. 3.1).

The encoder sees x with the decoder bias subtracted (Bricken et al. 2023; SAELens's ``apply_b_dec_to_input``):
b_dec, initialised at the data's geometric median, carries the residual stream's large constant part, so the
encoder's features measure deviations from it.

The contract between a variant and the trainer lives here, explicitly (no attribute probing):

- each training step the trainer calls ``loss(StepInput)`` and gets a ``LossOutput`` whose ``terms``
  are the loss terms by name;
- after each optimizer step it calls ``on_step_end(step, f)``;
- ``needs_labels`` says whether every batch must carry domain labels;
- ``metric_nce_temperature()`` is the temperature the InfoNCE metric is reported at;
- ``mechanism_metrics(f)`` measures the variant's own mechanism on held-out features ``f`` (hierarchy
  correlations, assignment entropy, regroup changes), logged in the curves at every log step;
- ``Params`` (the variant's parameters) derives from ``VariantParams``: ``validate(d_sae)`` and
  ``gram_sample_size()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from hsae import losses
from hsae.checks import check_finite_nonneg, check_positive_int

if TYPE_CHECKING:
    from hsae.config import SAEConfig


@dataclass(frozen=True)
class VariantParams:
    """Base of every variant's parameter dataclass (``SAE.Params``).

    Every variant carries Gao et al. (2024)'s auxiliary dead-latent loss: latents that have not fired for
    ``dead_tokens`` training tokens reconstruct the main reconstruction's residual with their ``aux_k``
    (0: d_in / 2) largest pre-activations, weighted by ``aux_coeff`` (Gao et al.: 1/32). While no latent
    is dead it is exactly 0. L1 variants take it on the softplus of the pre-activations (``L1Params``).
    """

    aux_coeff: float = 1 / 32
    aux_k: int = 0
    dead_tokens: int = 100_000
    # The L0 (active latents per token) to train to; None: whatever the variant's own sparsity gives.
    # L1 variants: the trainer calibrates the shared sparsity coefficient to it (docs/training.md);
    # TopK variants: k = target_l0.
    target_l0: int | None = None

    def validate(self, d_sae: int) -> None:
        """Raise ``ValueError`` naming the field for any bad value, given the dictionary size ``d_sae``."""
        check_finite_nonneg("aux_coeff", self.aux_coeff)
        check_positive_int("aux_k", self.aux_k, minimum=0)
        check_positive_int("dead_tokens", self.dead_tokens)
        if self.target_l0 is not None:
            check_positive_int("target_l0", self.target_l0)
            if self.target_l0 > d_sae:
                raise ValueError(f"target_l0={self.target_l0} must be <= d_sae={d_sae} (or null: no target)")

    @classmethod
    def resolve_given(cls, given: dict[str, Any]) -> dict[str, Any]:
        """The given parameter values with those a ``target_l0`` fixes filled in (none here; TopK: ``k``)."""
        return given

    def gram_sample_size(self) -> int:
        """How many rows of each batch estimate the orthogonality Gram; 0 = the whole batch.

        The trainer puts each batch's rows in a random order, so the first rows are a uniform sample.
        """
        return 0


@dataclass(frozen=True)
class L1Params(VariantParams):
    """Parameters shared by the L1-penalised variants."""

    # Multiplies mean_b sum_k |f_bk| / sqrt(d_in): with E||x||^2 = d_in that makes one coefficient give
    # similar sparsity at any width (a feature pays off when its activation exceeds ~ l1_coeff * sqrt(d_in)).
    l1_coeff: float = 0.1
    # The auxiliary loss of an L1 variant reads softplus(pre-activation), not its ReLU: a latent whose
    # pre-activations are all negative (what the hierarchies' penalties leave behind) still gets a gradient
    # toward the residual it could explain, so it fires again. Weight and dead window chosen by measurement
    # (docs/training.md, "Dead latents": the hierarchies' held-out dead fraction 1.3-1.9% -> 0-0.3%, EV within 0.002).
    aux_coeff: float = 1.0
    dead_tokens: int = 10_000

    def validate(self, d_sae: int) -> None:
        super().validate(d_sae)
        check_finite_nonneg("l1_coeff", self.l1_coeff)


@dataclass(frozen=True)
class GramParams(L1Params):
    """Shared by the orthogonality variants: how many tokens of each batch estimate the activation Gram.

    The (n, n) Gram costs as much as the encoder and decoder together at n = 2d; its cosines are
    averages over tokens, so a uniform random subset of the batch estimates them (the trainer shuffles
    each batch's rows, so the first rows are one). 0 uses the whole batch.
    """

    gram_tokens: int = 512

    def validate(self, d_sae: int) -> None:
        super().validate(d_sae)
        check_positive_int("gram_tokens", self.gram_tokens, minimum=0)

    def gram_sample_size(self) -> int:
        return self.gram_tokens


@dataclass(frozen=True)
class StepInput:
    """What a variant gets each training step; schedule values are computed by the trainer."""
    x: torch.Tensor                 # (B, d_in) normalised activations
    labels: torch.Tensor | None     # (B,) domain labels (0 retain, 1 forget) or None
    step: int                       # steps completed before this one
    sparsity_scale: float = 1.0     # the trainer's L1 warm-up factor x the calibrated L0 multiplier


@dataclass
class LossOutput:
    """What ``SAE.loss`` returns: the total, its terms by name, the reconstruction and the features."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]
    x_hat: torch.Tensor
    f: torch.Tensor


class SAE(nn.Module):
    """Plain ReLU SAE with unit-norm decoder rows. Subclasses add loss terms and grouping."""

    name: ClassVar[str] = "relu"
    Params: ClassVar[type[VariantParams]] = L1Params
    # SAELens architecture name used on export.
    saelens_architecture: ClassVar[str] = "standard"
    # True when every batch must carry domain labels (StepInput.labels is then never None).
    needs_labels: ClassVar[bool] = False
    # Buffers that only training reads: a state without them (an export, weights from elsewhere) still loads.
    training_buffers: ClassVar[tuple[str, ...]] = ("tokens_since_fired",)

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
        self.register_buffer("tokens_since_fired", torch.zeros(n))

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """``load_state_dict`` that keeps the current value of any training-only buffer ``state`` lacks."""
        self.load_state_dict({**{name: getattr(self, name) for name in self.training_buffers}, **state})

    # -- forward -------------------------------------------------------------------------------
    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.pre_activation(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encode(x)
        return self.decode(f), f

    # -- training ------------------------------------------------------------------------------
    def loss(self, inp: StepInput) -> LossOutput:
        """The training loss of one step: reconstruction, sparsity and the variant's structure terms."""
        x = inp.x
        x_hat, f = self(x)
        terms = {"mse": losses.reconstruction_mse(x, x_hat)}
        terms.update(self.sparsity_terms(f, inp.sparsity_scale))
        terms.update(self.structure_terms(x, f, inp.labels, inp.step))
        return self.with_aux(x, LossOutput(total=sum(terms.values()), terms=terms, x_hat=x_hat, f=f))

    def with_aux(self, x: torch.Tensor, out: LossOutput) -> LossOutput:
        """``out`` with the auxiliary dead-latent term added (see ``VariantParams``)."""
        aux = self.aux_loss(x, out.x_hat)
        return LossOutput(total=out.total + aux, terms={**out.terms, "aux": aux}, x_hat=out.x_hat, f=out.f)

    def aux_loss(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        dead = (self.tokens_since_fired >= self.p.dead_tokens).nonzero().squeeze(1)
        if dead.numel() == 0 or self.p.aux_coeff == 0:
            return x.new_zeros(())
        pre = self.aux_activation((x - self.b_dec) @ self.W_enc[:, dead] + self.b_enc[dead])
        values, top = pre.topk(min(self.p.aux_k or self.cfg.d_in // 2, dead.numel()), dim=-1)
        recon = torch.zeros_like(pre).scatter(-1, top, values) @ self.W_dec[dead]
        return self.p.aux_coeff * losses.residual_fit((x - x_hat).detach(), recon)

    def aux_activation(self, pre: torch.Tensor) -> torch.Tensor:
        """What the auxiliary loss reconstructs with: softplus where an L1 penalty can leave every
        pre-activation of a latent negative (ReLU would pass it no gradient), the ReLU otherwise (TopK: Gao et al.)."""
        return F.softplus(pre) if self.sparsity_coeff() is not None else F.relu(pre)

    def sparsity_terms(self, f: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
        return {"l1": self.p.l1_coeff * scale * losses.l1_sparsity(f) / self.cfg.d_in**0.5}

    def sparsity_coeff(self) -> float | None:
        """The shared sparsity coefficient ``sparsity_scale`` multiplies (the L1 coefficient); None when the
        variant's sparsity is not a penalty (TopK: k fixes it), so there is nothing to calibrate or revive."""
        return self.p.l1_coeff if isinstance(self.p, L1Params) else None

    def structure_terms(
        self, x: torch.Tensor, f: torch.Tensor, labels: torch.Tensor | None, step: int
    ) -> dict[str, torch.Tensor]:
        """Variant-specific terms (orthogonality, entropy, InfoNCE); none for the plain SAE."""
        return {}

    @torch.no_grad()
    def on_step_end(self, step: int, f: torch.Tensor) -> None:
        """Hook the trainer calls after each optimizer step, with the completed step count and detached features.

        The base renormalises decoder rows to unit norm; variants extend it (calling ``super()`` first)
        to regroup, refresh assignments or update thresholds.
        """
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))
        fired = (f > 0).any(dim=0)
        self.tokens_since_fired.copy_(torch.where(fired, 0.0, self.tokens_since_fired + f.shape[0]))

    def gram_rows(self, f: torch.Tensor) -> torch.Tensor:
        """The rows of ``f`` the orthogonality Gram is estimated on (see GramParams)."""
        k = self.p.gram_sample_size()
        return f[:k] if k and k < f.shape[0] else f

    def mechanism_metrics(self, f: torch.Tensor) -> dict[str, float]:
        """The variant's mechanism measured on held-out features ``f`` and its own state: here the latents
        the auxiliary loss treats as dead."""
        return {"train_dead_fraction": float((self.tokens_since_fired >= self.p.dead_tokens).float().mean())}

    def metric_nce_temperature(self) -> float:
        """Temperature of the InfoNCE *metric*; variants trained with InfoNCE report it at their own temperature."""
        return 0.1

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
