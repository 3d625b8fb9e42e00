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
