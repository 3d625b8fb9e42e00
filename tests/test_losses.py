import itertools
import math

import torch
import torch.nn.functional as F

from hsae import losses


def _reference_block_rms(f, groups, k):
    f = f.double()
    n = f.shape[1]
    cos = torch.zeros(n, n, dtype=torch.float64)
    for a in range(n):
        for b in range(n):
            na, nb = f[:, a].norm(), f[:, b].norm()
            cos[a, b] = (f[:, a] @ f[:, b]) / math.sqrt((na**2 + 1e-8) * (nb**2 + 1e-8))
    out = torch.zeros(k, k, dtype=torch.float64)
    for i, j in itertools.product(range(k), range(k)):
        block = cos[groups == i][:, groups == j]
        out[i, j] = math.sqrt(block.pow(2).sum() / block.numel())
    return out


def test_group_block_rms_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    f = torch.relu(torch.randn(50, 12, generator=g, dtype=torch.float64))
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    fast = losses.group_block_rms(f, F.one_hot(groups, 4).double())
    torch.testing.assert_close(fast, _reference_block_rms(f, groups, 4), atol=1e-6, rtol=1e-6)


def test_token_space_blocks_equal_feature_space_blocks_and_gradients():
    # More features than tokens with hard equal-size groups: the (B, B) per-group path is taken.
    g = torch.Generator().manual_seed(3)
    f = torch.relu(torch.randn(16, 48, generator=g, dtype=torch.float64) - 0.3).requires_grad_(True)
    groups = torch.randperm(48, generator=g) % 6
    onehot = F.one_hot(groups, 6).double()
    token = losses.block_cosine_sq(f, onehot, groups)
    feature = losses.block_cosine_sq(f, onehot, None)
    torch.testing.assert_close(token, feature, rtol=1e-10, atol=1e-10)
    w = torch.rand(6, 6, generator=g, dtype=torch.float64)
    (grad_token,) = torch.autograd.grad((token * w).sum(), f)
    (grad_feature,) = torch.autograd.grad((feature * w).sum(), f)
    torch.testing.assert_close(grad_token, grad_feature, rtol=1e-9, atol=1e-10)
    hier_token = losses.hierarchical_orthogonality(f, onehot, 2, 0.4, 0.2, groups)
    hier_feature = losses.hierarchical_orthogonality(f, onehot, 2, 0.4, 0.2, None)
    torch.testing.assert_close(hier_token, hier_feature, rtol=1e-10, atol=1e-10)


def _two_features_firing(n, a, b, tokens=32):
    f = torch.zeros(tokens, n)
    f[: tokens // 2, a] = 1.0
    f[: tokens // 2, b] = 2.0
    return f


def test_hierarchy_terms_act_on_the_right_blocks():
    # 2 coarse x 2 fine groups over 8 features: fine group = feature // 2, coarse = feature // 4.
    assignment = F.one_hot(torch.arange(8) // 2, 4).float()

    def terms(f):
        l1_only = losses.hierarchical_orthogonality(f, assignment, 2, 1.0, 0.0)
        l2_only = losses.hierarchical_orthogonality(f, assignment, 2, 0.0, 1.0)
        return float(l1_only), float(l2_only)

    # Same fine group: neither term sees the pair.
    l1, l2 = terms(_two_features_firing(8, 0, 1))
    assert l1 < 1e-3 and l2 < 1e-3
    # Sibling fine groups (same coarse group): only the level-2 term.
    l1, l2 = terms(_two_features_firing(8, 0, 2))
    assert l1 < 1e-3 and l2 > 0.1
    # Different coarse groups: only the level-1 term.
    l1, l2 = terms(_two_features_firing(8, 0, 4))
    assert l1 > 0.1 and l2 < 1e-3


def test_group_orthogonality_gradient_targets_cross_group_cofiring():
    assignment = F.one_hot(torch.arange(8) // 4, 2).float()
    f = torch.zeros(16, 8)
    f[0:8, 0] = 1.0  # group 0
    f[4:12, 5] = 1.0  # group 1, co-fires with feature 0 on tokens 4..7
    f[12:, 1] = 1.0  # group 0, fires alone
    f.requires_grad_(True)
    losses.group_orthogonality(f, assignment, 1.0).backward()
    grad = f.grad
    # Lowering either activation where the two co-fire lowers the penalty (positive gradient) ...
    assert grad[4:8, 0].min() > 0 and grad[4:8, 5].min() > 0
    # ... raising them where they fire apart lowers it too; the lone feature is not pushed at all.
    assert grad[0:4, 0].max() < 0 and grad[8:12, 5].max() < 0
    assert grad[12:, 1].abs().max() < 1e-9


def _reference_info_nce(z, labels, t):
    z = F.normalize(z.double(), dim=-1)
    total, count = 0.0, 0
    for b in range(len(z)):
        others = [a for a in range(len(z)) if a != b]
        pos = [a for a in others if labels[a] == labels[b]]
        if not pos:
            continue
        num = sum(math.exp(float(z[b] @ z[a]) / t) for a in pos)
        den = sum(math.exp(float(z[b] @ z[a]) / t) for a in others)
        total += -math.log(num / den)
        count += 1
    return total / count


def test_info_nce_matches_reference_and_rewards_separation():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(20, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 2, (20,), generator=g)
    assert math.isclose(float(losses.info_nce(z, labels, 0.5)), _reference_info_nce(z, labels, 0.5), rel_tol=1e-9)
    separated = F.one_hot(labels, 6).double() + 0.01 * z
    assert float(losses.info_nce(separated, labels, 0.1)) < float(losses.info_nce(z, labels, 0.1))
    # One label only: every other token is a positive, the loss is exactly zero.
    assert float(losses.info_nce(z, torch.zeros(20, dtype=torch.long), 0.1)) == 0.0


def test_usage_entropy_bounds():
    f = torch.rand(30, 8) + 0.1
    uniform = F.one_hot(torch.arange(8) // 2, 4).float()
    one_group = torch.zeros(8, 4)
    one_group[:, 0] = 1.0
    assert abs(float(losses.group_usage_entropy(f, one_group))) < 1e-6
    assert float(losses.group_usage_entropy(torch.ones(30, 8), uniform)) > math.log(4) - 1e-4


def test_info_nce_gradient_is_finite_when_a_label_occurs_once():
    z = torch.randn(6, 4, requires_grad=True)
    labels = torch.tensor([0, 0, 0, 0, 0, 1])  # token 5 has no positive
    losses.info_nce(z, labels, 0.1).backward()
    assert torch.isfinite(z.grad).all()
    assert z.grad[5].abs().sum() > 0  # still a negative for the others


def _sparse_features(tokens, n, active, generator):
    """Non-negative features with about ``active`` of ``n`` latents firing per token, unevenly."""
    pre = torch.randn(tokens, n, generator=generator, dtype=torch.float64)
    cut = torch.quantile(pre, 1 - active / n, dim=0)
    return torch.relu(pre - cut)


def test_sparse_gram_equals_the_dense_gram_in_any_order():
    g = torch.Generator().manual_seed(5)
    f = _sparse_features(40, 30, 4, g)
    f[7] = 0.0  # a token where nothing fires
    f[:, 11] = 0.0  # a latent that never fires
    dense = f.T @ f / torch.outer(f.pow(2).sum(0), f.pow(2).sum(0)).add(1e-8).sqrt()
    torch.testing.assert_close(losses.sparse_cosine_gram(f).double(), dense, rtol=1e-6, atol=1e-7)
    order = torch.randperm(30, generator=g)
    torch.testing.assert_close(losses.sparse_cosine_gram(f, order).double(), dense[order][:, order],
                               rtol=1e-6, atol=1e-7)


def _blocks_and_gradients(pre, assignment, groups, weights):
    """The blocks of relu(pre) and their weighted sum's gradient wrt pre (through the ReLU, as in an SAE)."""
    pre = pre.clone().requires_grad_(True)
    blocks = losses.block_cosine_sq(torch.relu(pre), assignment, groups)
    (grad,) = torch.autograd.grad((blocks * weights).sum(), pre)
    return blocks.detach().double(), grad.double()


def test_block_sums_and_gradients_agree_on_every_path(monkeypatch):
    # Hard groups (regrouped, so not contiguous) and soft assignments; sparse features, the dense path
    # forced by an enormous cost per scattered product, the sparse one by a zero cost.
    g = torch.Generator().manual_seed(7)
    pre = torch.randn(64, 48, generator=g)
    pre = pre - torch.quantile(pre, 1 - 5 / 48, dim=0)  # ~5 of 48 latents fire per token
    groups = torch.randperm(48, generator=g) % 6
    hard = F.one_hot(groups, 6).float()
    soft = torch.softmax(torch.randn(48, 6, generator=g), dim=1)
    weights = torch.rand(6, 6, generator=g)
    # The straightforward formula, in float64: A^T (C o C) A.
    f64 = torch.relu(pre.double())
    for assignment, group_of in ((hard, groups), (hard, None), (soft, None)):
        monkeypatch.setattr(losses, "SPARSE_PRODUCT_COST", 10**12)
        dense_blocks, dense_grad = _blocks_and_gradients(pre, assignment, group_of, weights)
        monkeypatch.setattr(losses, "SPARSE_PRODUCT_COST", 0)
        sparse_blocks, sparse_grad = _blocks_and_gradients(pre, assignment, group_of, weights)
        a = assignment.double()
        reference = a.T @ losses.activation_cosine_gram(f64).pow(2) @ a
        torch.testing.assert_close(sparse_blocks, reference, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dense_blocks, reference, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sparse_grad, dense_grad, rtol=1e-4, atol=1e-6)


def test_sparse_gram_passes_no_gradient_to_inactive_latents():
    g = torch.Generator().manual_seed(8)
    f = _sparse_features(32, 20, 3, g).requires_grad_(True)
    losses.sparse_cosine_gram(f).pow(2).sum().backward()
    assert f.grad[f == 0].abs().max() == 0
    assert f.grad[f != 0].abs().min() > 0


def test_the_cost_rule_takes_the_sparse_gram_only_for_sparse_features(monkeypatch):
    calls = []
    real = losses.sparse_cosine_gram
    monkeypatch.setattr(losses, "sparse_cosine_gram", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(9)
    assignment = F.one_hot(torch.arange(1280) // 40, 32).float()
    losses.block_cosine_sq(_sparse_features(512, 1280, 50, g).float(), assignment)  # the main job's L0
    assert calls == [1]
    losses.block_cosine_sq(_sparse_features(512, 1280, 400, g).float(), assignment)  # dense-ish: GEMMs
    assert calls == [1]
