"""Evaluation metrics as pure functions of tensors (x, x_hat, f, decoder, group assignment).

Group metrics take a (n, K) assignment of features to groups. For SAEs without groups the caller uses
a contiguous partition (``reference_groups`` in ``evaluate``): features in arbitrary groups are the null
reference that grouped variants are compared to.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from hsae import losses

_EPS = 1e-12


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float((x_hat - x).pow(2).mean())


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the batch."""
    residual = (x - x_hat).pow(2).sum()
    total = (x - x.mean(dim=0, keepdim=True)).pow(2).sum()
    return float(1.0 - residual / total.clamp_min(_EPS))


def fraction_variance_unexplained(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return 1.0 - explained_variance(x, x_hat)


def l0(f: torch.Tensor) -> float:
    return float((f != 0).sum(dim=-1).double().mean())


def l1(f: torch.Tensor) -> float:
    return float(f.abs().sum(dim=-1).mean())


def dead_fraction(f: torch.Tensor) -> float:
    """Fraction of features that never fire on the batch."""
    return float((f != 0).any(dim=0).logical_not().double().mean())


def cosine_similarity(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float(F.cosine_similarity(x, x_hat, dim=-1, eps=1e-8).mean())


def l2_ratio(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Mean ||x_hat|| / ||x||: below 1 means shrinkage."""
    return float((x_hat.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-8)).mean())


def decoder_norms(w_dec: torch.Tensor) -> tuple[float, float]:
    norms = w_dec.norm(dim=1)
    return float(norms.min()), float(norms.max())


def hard_groups(assignment: torch.Tensor) -> torch.Tensor:
    return assignment.argmax(dim=1)


def group_condition_numbers(w_dec: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
    """sigma_max / sigma_min of each group's decoder rows (hard groups); inf for a rank-deficient group.

    Groups with fewer than two features have no subspace to condition and are NaN.
    """
    groups = hard_groups(assignment)
    out = torch.full((assignment.shape[1],), float("nan"), dtype=torch.float64)
    for k in range(assignment.shape[1]):
        rows = w_dec[groups == k].double()
        if rows.shape[0] < 2 or not bool(torch.isfinite(rows).all()):
            continue
        s = torch.linalg.svdvals(rows)
        out[k] = float("inf") if s[-1] <= s[0] * 1e-12 else float(s[0] / s[-1])
    return out


def group_entropy(f: torch.Tensor, assignment: torch.Tensor) -> float:
    """Entropy of the spread of activation mass over the K groups, divided by log K: 1 is uniform use,
    0 all mass in one group, comparable across group counts (NaN for a single group)."""
    k = assignment.shape[1]
    if k < 2:
        return float("nan")
    return float(losses.group_usage_entropy(f.double(), assignment.double())) / math.log(k)


def inter_group_correlation(f: torch.Tensor, assignment: torch.Tensor) -> float:
    """Mean Pearson correlation of activations between features of different groups.

    Each feature pair is weighted by the probability that the two features sit in different groups
    (1 or 0 for hard groups). Features that never fire have no correlation and are left out.
    """
    f = f.double()
    centred = f - f.mean(dim=0, keepdim=True)
    std = centred.pow(2).mean(dim=0).sqrt()
    live = std > 1e-12
    if int(live.sum()) < 2:
        return float("nan")
    z = centred[:, live] / std[live]
    corr = (z.T @ z) / z.shape[0]
    p = assignment.double()[live]
    cross = 1.0 - p @ p.T
    cross.fill_diagonal_(0.0)
    return float((corr * cross).sum() / cross.sum().clamp_min(_EPS))


def inter_group_cosine(w_dec: torch.Tensor, assignment: torch.Tensor) -> float:
    """Mean cosine between groups' centroid decoder directions, over pairs i != j."""
    unit = F.normalize(w_dec.double(), dim=1)
    weights = assignment.double()
    centroids = F.normalize((weights.T @ unit) / weights.sum(0).clamp_min(_EPS)[:, None], dim=1)
    sims = centroids @ centroids.T
    k = sims.shape[0]
    return float(sims[~torch.eye(k, dtype=torch.bool)].mean())


def info_nce_value(f: torch.Tensor, assignment: torch.Tensor, labels: torch.Tensor, temperature: float,
                   max_rows: int = 4096) -> float:
    """The InfoNCE loss of group-activity embeddings against domain labels (lower: domains separate).

    Its similarity matrix is (B, B): on more than ``max_rows`` rows it is taken on a fixed uniform sample.
    """
    idx = sample_rows(f.shape[0], max_rows, f.device)
    return float(losses.info_nce((f[idx] @ assignment).double(), labels.to(f.device)[idx], temperature))


def sample_rows(n: int, max_rows: int, device: torch.device | None = None) -> torch.Tensor:
    """Indices of a fixed uniform sample of at most ``max_rows`` of ``n`` rows, in order (all when n is smaller)."""
    if n <= max_rows:
        return torch.arange(n, device=device)
    return torch.from_numpy(np.sort(np.random.default_rng(0).choice(n, max_rows, replace=False))).to(device)


def metric_assignment(sae, reference_groups: int = 32) -> torch.Tensor:
    """The SAE's (level-1) groups, or for an ungrouped SAE the contiguous reference partition."""
    assignment = sae.group_assignment()
    if assignment is None:
        n = sae.cfg.d_sae
        k = math.gcd(reference_groups, n)
        assignment = F.one_hot(torch.arange(n, device=sae.W_dec.device) // (n // k), k).float()
    return assignment.detach()


def held_out_diagnostics(sae, f: torch.Tensor, labels: torch.Tensor | None, max_rows: int = 2048) -> dict[str, float]:
    """The mechanism measurements the curves log at every log step, on held-out features ``f``.

    At most ``max_rows`` rows (the first: the held-out batch is a uniform sample) keep a log step cheap.
    """
    f = f[:max_rows]
    labels = None if labels is None else labels[:max_rows]
    assignment = metric_assignment(sae).to(f.dtype)
    out = {"val_inter_group_correlation": inter_group_correlation(f, assignment)}
    if labels is not None and labels.unique().numel() > 1:
        out["val_nce"] = info_nce_value(f, assignment, labels.to(f.device), sae.metric_nce_temperature())
    return out


@torch.no_grad()
def evaluate(
    sae,
    x: torch.Tensor,
    labels: torch.Tensor | None = None,
    reference_groups: int = 32,
    nce_temperature: float = 0.1,
) -> dict[str, float]:
    """Every reconstruction, sparsity and structure metric of ``sae`` on the (normalised) batch ``x``."""
    was_training = sae.training
    sae.eval()
    try:
        x = x.to(sae.W_dec.dtype)
        x_hat, f = sae(x)
        assignment = metric_assignment(sae, reference_groups).to(x.dtype)
        conds = group_condition_numbers(sae.W_dec.detach(), assignment)
        finite_conds = conds[torch.isfinite(conds)]
        dmin, dmax = decoder_norms(sae.W_dec.detach())
        out = {
            "mse": mse(x, x_hat),
            "explained_variance": explained_variance(x, x_hat),
            "fvu": fraction_variance_unexplained(x, x_hat),
            "l0": l0(f),
            "l1": l1(f),
            "dead_fraction": dead_fraction(f),
            "cosine": cosine_similarity(x, x_hat),
            "l2_ratio": l2_ratio(x, x_hat),
            "decoder_norm_min": dmin,
            "decoder_norm_max": dmax,
            "condition_number": float(finite_conds.mean()) if finite_conds.numel() else float("nan"),
            "condition_number_max": float(finite_conds.max()) if finite_conds.numel() else float("nan"),
            "group_entropy": group_entropy(f, assignment),
            # (n, n) correlations over tokens: a uniform sample of 8,192 held-out rows estimates them.
            "inter_group_correlation": inter_group_correlation(f[sample_rows(len(f), 8192, f.device)], assignment),
            "inter_group_cosine": inter_group_cosine(sae.W_dec.detach(), assignment),
            "n_groups": float(assignment.shape[1]),
        }
        out["nce"] = (
            info_nce_value(f, assignment, labels.to(x.device), nce_temperature)
            if labels is not None and labels.unique().numel() > 1
            else float("nan")
        )
        return out
    finally:
        sae.train(was_training)
