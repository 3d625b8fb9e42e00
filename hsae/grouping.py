"""Group (re)assignment used by the adaptive variants. Pure functions, no module state."""

from __future__ import annotations

import numpy as np
import torch

# Ties (dead features have zero affinity everywhere) keep their current group.
_STAY_BONUS = 1e-6


def balanced_regroup(gram: torch.Tensor, group_of: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Reassign features to ``n_groups`` equal-size groups so that features that fire together share one.

    A feature's affinity to a group is its mean activation cosine with the group's current members.
    Pairs (feature, group) are taken greedily by decreasing affinity while the group has room, which
    keeps every group at n / n_groups features. Deterministic: ties resolve by index.
    """
    n = gram.shape[0]
    size = n // n_groups
    g = gram.detach().double().clone()
    g.fill_diagonal_(0.0)
    onehot = torch.nn.functional.one_hot(group_of.long(), n_groups).double()
    counts = onehot.sum(0)
    # Exclude the feature itself from its own group's mean.
    denom = counts[None, :] - onehot
    affinity = (g @ onehot) / denom.clamp_min(1.0)
    affinity = affinity + _STAY_BONUS * onehot
    order = np.argsort(-affinity.cpu().numpy().ravel(), kind="stable")
    new_group = np.full(n, -1, dtype=np.int64)
    room = np.full(n_groups, size, dtype=np.int64)
    left = n
    for flat in order:
        i, k = divmod(int(flat), n_groups)
        if new_group[i] < 0 and room[k] > 0:
            new_group[i] = k
            room[k] -= 1
            left -= 1
            if left == 0:
                break
    return torch.from_numpy(new_group).to(group_of.device)


def rank_scaled_alpha(block_rms: torch.Tensor, alpha_min: float, alpha_max: float) -> torch.Tensor:
    """Per-pair coefficients in [alpha_min, alpha_max], linear in the rank of each pair's entanglement.

    Diagonal (within-group) entries are 0; the most correlated off-diagonal pair gets alpha_max.
    """
    k = block_rms.shape[0]
    off = ~torch.eye(k, dtype=torch.bool, device=block_rms.device)
    values = block_rms[off]
    ranks = torch.empty_like(values)
    ranks[torch.argsort(values, stable=True)] = torch.arange(values.numel(), dtype=values.dtype, device=values.device)
    scaled = alpha_min + (alpha_max - alpha_min) * ranks / max(values.numel() - 1, 1)
    out = torch.zeros_like(block_rms)
    out[off] = scaled
    return out
