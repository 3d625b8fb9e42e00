"""Reviving dead latents by resampling (Bricken et al. 2023; dictionary_learning's ``resample_neurons``).

A latent is dead when it has not fired for the variant's ``dead_tokens`` training tokens. Resampling
points it at what the SAE reconstructs worst: rows of the current batch are drawn with probability
proportional to their squared reconstruction loss; each dead latent's decoder row becomes the
normalised residual (x - x_hat) of one drawn row, its encoder column the same direction scaled to 0.2 x
the mean encoder-column norm of the live latents, its encoder bias 0, and its AdamW moments are reset.
The draw is a function of (seed, step), so a resumed run resamples exactly as the uninterrupted one.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from hsae.variants import SAE

# Bricken et al.: new encoder columns at 0.2 x the live latents' mean encoder norm.
ENCODER_SCALE = 0.2


def dead_latents(sae: SAE) -> torch.Tensor:
    """Indices of the latents that have not fired for ``dead_tokens`` training tokens."""
    return (sae.tokens_since_fired >= sae.p.dead_tokens).nonzero().squeeze(1)


@torch.no_grad()
def resample_dead(sae: SAE, x: torch.Tensor, optimizer: torch.optim.Optimizer, seed: int, step: int) -> int:
    """Re-initialise every dead latent of ``sae`` toward high-loss rows of ``x`` (normalised); how many."""
    dead = dead_latents(sae)
    n_dead = dead.numel()
    if n_dead == 0 or n_dead == sae.cfg.d_sae:
        return 0
    x_hat, _ = sae(x)
    residual = (x - x_hat).float()
    loss = residual.pow(2).sum(dim=1).double().cpu().numpy()
    weights = loss**2
    if not np.isfinite(weights).all() or weights.sum() <= 0:
        return 0
    rng = np.random.default_rng([seed, step, 0x5EED])
    rows = rng.choice(len(weights), size=n_dead, replace=n_dead > len(weights), p=weights / weights.sum())
    directions = F.normalize(residual[torch.from_numpy(rows).to(x.device)], dim=1)
    live = torch.ones(sae.cfg.d_sae, dtype=torch.bool, device=x.device)
    live[dead] = False
    enc_norm = sae.W_enc[:, live].norm(dim=0).mean()
    sae.W_dec[dead] = directions.to(sae.W_dec.dtype)
    sae.W_enc[:, dead] = (directions.T * enc_norm * ENCODER_SCALE).to(sae.W_enc.dtype)
    sae.b_enc[dead] = 0.0
    sae.tokens_since_fired[dead] = 0.0
    reset_adam_moments(optimizer, sae, dead)
    return n_dead


def reset_adam_moments(optimizer: torch.optim.Optimizer, sae: SAE, latents: torch.Tensor) -> None:
    """Zero the Adam moments of ``latents``' encoder columns, encoder biases and decoder rows."""
    for param, index in ((sae.W_enc, (slice(None), latents)), (sae.b_enc, (latents,)), (sae.W_dec, (latents,))):
        state = optimizer.state.get(param, {})
        for name in ("exp_avg", "exp_avg_sq"):
            if name in state:
                state[name][index] = 0.0
