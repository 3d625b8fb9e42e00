"""Loss terms as pure functions of tensors. Variants compose them; nothing here holds state.

Shapes: ``x`` (B, d), ``f`` feature activations (B, n), ``assignment`` a (soft or one-hot) map from
features to groups (n, K) whose rows sum to 1.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

_EPS = 1e-8


def reconstruction_mse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean squared error per element (inputs are normalised, so 1.0 ~ predicting zero)."""
    return (x_hat - x).pow(2).mean()


def residual_fit(residual: torch.Tensor, fit: torch.Tensor) -> torch.Tensor:
    """||residual - fit||^2 relative to the residual's own variance: the auxiliary dead-latent loss's scale."""
    centred = residual - residual.mean(dim=0, keepdim=True)
    return (residual - fit).pow(2).sum(-1).mean() / centred.pow(2).sum(-1).mean().clamp_min(_EPS)


def l1_sparsity(f: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the L1 norm of the (ReLU, so non-negative) features; decoder rows are unit-norm.

    Non-negative features' L1 is their sum: one pass less over the (B, n) activations than abs().
    """
    return f.sum(dim=-1).mean()


def normalised_columns(f: torch.Tensor) -> torch.Tensor:
    """Each feature's activation vector over the batch scaled to unit norm (dead features stay 0)."""
    return f / f.pow(2).sum(dim=0).add(_EPS).sqrt()


class _SymmetricGram(torch.autograd.Function):
    """``a.T @ a`` with a one-product backward: ``a @ (g + g.T)`` where autograd's generic matmul backward
    runs two (one per operand). The backward product runs in the dtype the forward's came out in (bf16 under
    autocast, as autocast's own backward would), so gradients are the generic path's to the bit."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a)
        return a.T @ a

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (a,) = ctx.saved_tensors
        return (a.to(g.dtype) @ (g + g.T)).to(a.dtype)


def activation_cosine_gram(f: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between features' activation vectors over the batch (n, n).

    Scale-free, so the orthogonality coefficients mean the same at any activation scale.
    """
    return _SymmetricGram.apply(normalised_columns(f))


# One scattered product of the sparse Gram (forward and backward) costs about as much time as this many
# multiply-adds of a dense GEMM (this CPU, 512 tokens, n = 1280: 150-200); it sets where the sparse path
# starts to win: L0 ~ 50 of 1280 (2x faster than the dense Gram), not L0 ~ 200 (7x slower).
SPARSE_PRODUCT_COST = 150
TOKEN_GEMM_COST = 3


def max_active(f: torch.Tensor) -> int:
    """The most latents active on any one token (one host sync)."""
    return int((f.detach() != 0).sum(dim=1).max()) if f.numel() else 0


def sparse_cosine_gram(f: torch.Tensor, order: torch.Tensor | None = None, width: int | None = None) -> torch.Tensor:
    """``activation_cosine_gram(f)`` built from each token's active latents only: B * L^2 scattered
    products (L = ``width``, at least the most latents active on one token) instead of n^2 B
    multiply-adds. In float32 whatever ``f``'s dtype. ``order`` (a permutation of the n latents) lays
    the result out as ``gram[order][:, order]``. Its gradient is the dense Gram's on every active entry
    of ``f`` and zero on the inactive ones, where a ReLU or top-k encoder passes no gradient anyway.
    """
    n = f.shape[1]
    width = max_active(f) if width is None else width
    fn = normalised_columns(f.float())
    # Each token's `width` largest activations: all its active latents, padded with zeros.
    top = f.detach().topk(width, dim=1)
    # Padding slots are masked out of the gradient too, not only of the value.
    values = fn.gather(1, top.indices) * (top.values != 0)
    index = top.indices
    if order is not None:
        index = torch.argsort(order)[index]  # each latent's position in ``order``
    keys = (index.unsqueeze(2) * n + index.unsqueeze(1)).flatten()
    with torch.autocast(f.device.type, enabled=False):  # float32 sums, also inside a bf16 autocast region
        products = torch.bmm(values.unsqueeze(2), values.unsqueeze(1)).flatten()
    return fn.new_zeros(n * n).index_add(0, keys, products).view(n, n)


def block_cosine_sq(f: torch.Tensor, assignment: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of squared activation cosines inside each (group, group) block, (K, K).

    Three exact ways, the cheapest taken by an operation count:
    - feature space: C = Fn^T Fn (n x n), then A^T (C o C) A, or for hard equal groups the sums of the
      group-ordered C's (n/K, n/K) tiles; costs ~ n^2 B;
    - token space, for hard groups of equal size (``groups`` = each feature's group):
      sum_{k in i, l in j} C_kl^2 = <Fn_i Fn_i^T, Fn_j Fn_j^T> over the (B, B) per-group Grams; costs
      ~ B^2 (n + K^2), so it wins when the dictionary is much larger than the batch the Gram is
      estimated on (n = 5120, B = 512: 6x fewer operations) and loses for small n or many groups;
    - sparse: C from each token's active latents only (``sparse_cosine_gram``), B * max_b(L0_b)^2
      scattered products plus a few passes over n^2; wins once features are sparse (L0 ~ 50 of
      n = 1280 on 512 tokens: ~3M products against 0.9G multiply-adds for the feature-space Gram).
    """
    b, n = f.shape
    k = assignment.shape[1]
    hard = groups is not None and n % k == 0
    feature_cost = n * n * (b + k)  # Fn^T Fn, then A^T (C o C) A
    # K per-group (B, B) Grams and their inner products; thin (n/K-deep) batched GEMMs run at about a third
    # of a square GEMM's rate (640x1280, 32 groups: 118 vs 61 ms at 0.7x the operations).
    token_cost = TOKEN_GEMM_COST * b * b * (n + k * k) if hard else feature_cost
    dense_cost = min(feature_cost, token_cost)
    if SPARSE_PRODUCT_COST * (n * n + b) < dense_cost:  # else no L0 can make the sparse path pay
        width = max_active(f)
        if SPARSE_PRODUCT_COST * (b * width * width + n * n) < dense_cost:
            return _sparse_block_cosine_sq(f, assignment, groups if hard else None, width)
    if hard and token_cost >= feature_cost:  # the Gram laid out by group: its (n/K, n/K) tiles summed
        order = torch.argsort(groups, stable=True)
        squared = activation_cosine_gram(f.index_select(1, order)).pow(2)
        return squared.view(k, n // k, k, n // k).sum(dim=(1, 3)).to(assignment.dtype)
    if hard:
        fn = normalised_columns(f)
        order = torch.argsort(groups, stable=True)
        # index_select, not fn[:, order]: its backward is an index_add, where advanced indexing's is a
        # sorting scatter (2.1 ms of an 11 ms step at 2304 x 16384 on an H200).
        per_group = fn.index_select(1, order).reshape(b, k, n // k).permute(1, 0, 2)  # (K, B, n/K)
        token_grams = torch.bmm(per_group, per_group.transpose(1, 2)).reshape(k, b * b)
        return token_grams @ token_grams.T
    return assignment.T @ activation_cosine_gram(f).pow(2) @ assignment


def _sparse_block_cosine_sq(
    f: torch.Tensor, assignment: torch.Tensor, groups: torch.Tensor | None, width: int | None = None
) -> torch.Tensor:
    """The blocks from ``sparse_cosine_gram``: hard equal groups sum (n/K, n/K) tiles of the group-ordered
    Gram; soft ones take A^T (C o C) A. Returned in ``assignment``'s dtype."""
    n, k = assignment.shape
    if groups is None:
        squared = sparse_cosine_gram(f, width=width).pow(2)
        return (assignment.T.float() @ squared @ assignment.float()).to(assignment.dtype)
    squared = sparse_cosine_gram(f, torch.argsort(groups, stable=True), width).pow(2)
    return squared.view(k, n // k, k, n // k).sum(dim=(1, 3)).to(assignment.dtype)


def block_rms(block_sq: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
    """RMS cosine per block: ||C[g_i, g_j]||_F / sqrt(|g_i||g_j|) (soft sizes for soft assignments)."""
    sizes = assignment.sum(dim=0)
    return (block_sq / (sizes[:, None] * sizes[None, :]).clamp_min(_EPS) + _EPS).sqrt()


def group_block_rms(f: torch.Tensor, assignment: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    """RMS of the activation cosines inside each (group, group) block, (K, K)."""
    return block_rms(block_cosine_sq(f, assignment, groups), assignment)


def pairwise_penalty(block_rms: torch.Tensor, pair_weight: torch.Tensor) -> torch.Tensor:
    """Weighted mean of the block RMS over the pairs ``pair_weight`` selects (zero weight: ignored)."""
    return (block_rms * pair_weight).sum() / pair_weight.gt(0).sum().clamp_min(1)


def off_diagonal(k: int, device: torch.device | None = None) -> torch.Tensor:
    return 1.0 - torch.eye(k, device=device)


def group_orthogonality(
    f: torch.Tensor, assignment: torch.Tensor, alpha: torch.Tensor | float, groups: torch.Tensor | None = None
) -> torch.Tensor:
    """alpha * mean over pairs i != j of the RMS cross-group activation cosine.

    ``alpha`` is a scalar or a (K, K) matrix of per-pair coefficients (adaptive variants).
    """
    k = assignment.shape[1]
    return pairwise_penalty(group_block_rms(f, assignment, groups), off_diagonal(k, f.device) * alpha)


def hierarchy_block_rms(
    f: torch.Tensor, assignment_l2: torch.Tensor, n_groups_l1: int, groups_l2: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block RMS cosines of both levels: (coarse (K1, K1), fine (K, K), sibling mask over fine pairs).

    ``assignment_l2`` maps features to the K1*K2 fine groups, ordered parent-major (fine group
    i*K2 + j is sub-group j of coarse group i). The fine blocks' sums serve both levels.
    """
    k_all = assignment_l2.shape[1]
    k2 = k_all // n_groups_l1
    block_sq_l2 = block_cosine_sq(f, assignment_l2, groups_l2)
    parent = torch.arange(k_all, device=f.device) // k2
    parent_map = F.one_hot(parent, n_groups_l1).to(f.dtype)
    rms_l1 = block_rms(parent_map.T @ block_sq_l2 @ parent_map, assignment_l2 @ parent_map)
    rms_l2 = block_rms(block_sq_l2, assignment_l2)
    siblings = (parent[:, None] == parent[None, :]).to(f.dtype) * off_diagonal(k_all, f.device)
    return rms_l1, rms_l2, siblings


def hierarchical_orthogonality(
    f: torch.Tensor,
    assignment_l2: torch.Tensor,
    n_groups_l1: int,
    alpha_l1: float,
    alpha_l2: float,
    groups_l2: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. (4): alpha_L1 over pairs of coarse groups + alpha_L2 over sibling sub-groups."""
    rms_l1, rms_l2, siblings = hierarchy_block_rms(f, assignment_l2, n_groups_l1, groups_l2)
    return alpha_l1 * pairwise_penalty(rms_l1, off_diagonal(n_groups_l1, f.device)) + alpha_l2 * pairwise_penalty(
        rms_l2, siblings
    )


def group_usage_entropy(f: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of how the batch's activation mass is spread over groups.

    0 when every activation falls in one group, log K when groups are used equally.
    """
    mass = (f.abs() @ assignment).sum(dim=0)
    p = mass / mass.sum().clamp_min(_EPS)
    return -(p * (p + _EPS).log()).sum()


def info_nce(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised InfoNCE: each token's positives are the other tokens with its label.

    loss_b = -log( sum_{p in pos(b)} exp(s_bp / t) / sum_{a != b} exp(s_ba / t) ), averaged over
    tokens that have at least one positive; ``z`` is L2-normalised inside. Zero when every token of the
    batch shares one label (all others are positives).
    """
    z = F.normalize(z, dim=-1, eps=_EPS)
    logits = (z @ z.T) / temperature
    n = z.shape[0]
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    has_pos = positives.any(dim=1)
    log_all = torch.logsumexp(logits, dim=1)
    # A finite fill: a row with no positives must give a zero gradient, and logsumexp over all -inf
    # would back-propagate NaN (0 * exp(-inf + inf)).
    log_pos = torch.logsumexp(logits.masked_fill(~positives, -1e9), dim=1)
    # Masked mean without a data-dependent branch (torch.compile traces it whole); 0 with no positives.
    per_token = torch.where(has_pos, log_all - log_pos, torch.zeros_like(log_all))
    return per_token.sum() / has_pos.sum().clamp_min(1)
