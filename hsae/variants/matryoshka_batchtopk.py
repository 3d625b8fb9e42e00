"""`matryoshka_batchtopk`: BatchTopK features whose nested dictionary prefixes each reconstruct x.

Training keeps the k * B largest activations of the whole batch (BatchTopK). The loss adds, to the full
reconstruction, the reconstruction error of every strict prefix of the dictionary (sizes from
``prefix_fractions``), so early features learn coarse, general directions and later ones refine them.
Dead latents get the auxiliary loss every variant carries (``VariantParams``).
At inference a single threshold (EMA of the smallest kept activation during training) replaces the
batch-level top-k, which makes the encoder per-token; it exports as a SAELens JumpReLU SAE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hsae import losses
from hsae.checks import check_positive
from hsae.variants.base import SAE, LossOutput, StepInput
from hsae.variants.topk import TopKParams


@dataclass(frozen=True)
class MatryoshkaParams(TopKParams):
    prefix_fractions: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0)
    # Short runs (hundreds of steps) need a fast EMA; 0.99 lags the shrinking activations.
    threshold_momentum: float = 0.9

    def validate(self, d_sae: int) -> None:
        super().validate(d_sae)
        fr = list(self.prefix_fractions)
        if not fr or any(not isinstance(v, (int, float)) for v in fr):
            raise ValueError(f"prefix_fractions must be a non-empty list of numbers, got {self.prefix_fractions!r}")
        for v in fr:
            check_positive("prefix_fractions", v)
        if fr != sorted(set(fr)) or fr[-1] != 1.0:
            raise ValueError(f"prefix_fractions must increase strictly and end at 1.0, got {fr}")
        sizes = [round(v * d_sae) for v in fr]
        if len(set(sizes)) != len(sizes) or sizes[0] < 1:
            raise ValueError(f"prefix_fractions {fr} give empty or repeated prefixes for d_sae={d_sae}")
        if not 0.0 <= self.threshold_momentum < 1.0:
            raise ValueError(f"threshold_momentum must be in [0, 1), got {self.threshold_momentum!r}")

    def prefix_sizes(self, d_sae: int) -> list[int]:
        return [round(v * d_sae) for v in self.prefix_fractions]


class MatryoshkaBatchTopKSAE(SAE):
    name = "matryoshka_batchtopk"
    Params = MatryoshkaParams
    saelens_architecture = "jumprelu"

    def __init__(self, cfg, generator=None) -> None:
        super().__init__(cfg, generator)
        self.sizes = self.p.prefix_sizes(cfg.d_sae)
        self.register_buffer("threshold", torch.tensor(-1.0))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.pre_activation(x))
        if not self.training and self.threshold >= 0:
            return pre * (pre > self.threshold)
        flat = pre.flatten()
        keep = min(self.p.k * pre.shape[0], flat.numel())
        # The k*B-th largest value by selection (linear time) instead of a k*B-element top-k sort;
        # ties at the threshold may keep a few more.
        threshold = flat.detach().kthvalue(flat.numel() - keep + 1).values
        return pre * (pre >= threshold).to(pre.dtype)

    def loss(self, inp: StepInput) -> LossOutput:
        """The full reconstruction's MSE plus the summed MSE of every strict prefix (k fixes sparsity: no L1)."""
        x = inp.x
        f = self.encode(x)
        partial = self.b_dec.expand_as(x)
        prefix_errors = []
        start = 0
        for end in self.sizes:
            partial = partial + f[:, start:end] @ self.W_dec[start:end]
            prefix_errors.append(losses.reconstruction_mse(x, partial))
            start = end
        terms = {"mse": prefix_errors[-1]}
        if len(prefix_errors) > 1:
            terms["matryoshka"] = sum(prefix_errors[:-1])
        return self.with_aux(x, LossOutput(total=sum(terms.values()), terms=terms, x_hat=partial, f=f))

    @torch.no_grad()
    def on_step_end(self, step: int, f: torch.Tensor) -> None:
        super().on_step_end(step, f)
        kept = f[f > 0]
        if kept.numel():
            smallest = kept.min()
            m = self.p.threshold_momentum
            new = smallest if self.threshold < 0 else m * self.threshold + (1 - m) * smallest
            self.threshold.copy_(new)

    def group_assignment(self) -> torch.Tensor:
        """The nested chunks [m_{i-1}, m_i) as groups: coarse (early) to fine (late) features."""
        bounds = torch.tensor(self.sizes, device=self.W_dec.device)
        chunk = torch.bucketize(torch.arange(self.cfg.d_sae, device=self.W_dec.device), bounds, right=True)
        return F.one_hot(chunk, len(self.sizes)).to(self.W_dec.dtype)

    def saelens_extra_cfg(self) -> dict:
        return {"prefix_sizes": self.sizes}

    def extra_export_tensors(self) -> dict[str, torch.Tensor]:
        return {"threshold": self.threshold.clamp_min(0).expand(self.cfg.d_sae).clone()}
