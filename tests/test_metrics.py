import math

import numpy as np
import torch
import torch.nn.functional as F

from hsae import metrics as M


def _data(seed=0, b=64, d=6, n=12):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    x_hat = x + 0.3 * torch.randn(b, d, generator=g, dtype=torch.float64)
    f = torch.relu(torch.randn(b, n, generator=g, dtype=torch.float64) - 0.5)
    f[:, 3] = 0.0  # a dead feature
    w_dec = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, x_hat, f, w_dec


def test_reconstruction_metrics_match_numpy_reference():
    x, x_hat, f, _ = _data()
    xn, hn, fn = x.numpy(), x_hat.numpy(), f.numpy()
    assert math.isclose(M.mse(x, x_hat), float(((hn - xn) ** 2).mean()), rel_tol=1e-12)
    ev = 1 - ((xn - hn) ** 2).sum() / ((xn - xn.mean(0)) ** 2).sum()
    assert math.isclose(M.explained_variance(x, x_hat), ev, rel_tol=1e-12)
    assert math.isclose(M.fraction_variance_unexplained(x, x_hat), 1 - ev, rel_tol=1e-9)
    assert math.isclose(M.l0(f), float((fn > 0).sum(1).mean()), rel_tol=1e-12)
    assert math.isclose(M.l1(f), float(np.abs(fn).sum(1).mean()), rel_tol=1e-12)
    assert math.isclose(M.dead_fraction(f), 1 / 12)
    cos = [float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) for a, b in zip(xn, hn, strict=True)]
    assert math.isclose(M.cosine_similarity(x, x_hat), float(np.mean(cos)), rel_tol=1e-9)
    ratio = np.mean(np.linalg.norm(hn, axis=1) / np.linalg.norm(xn, axis=1))
    assert math.isclose(M.l2_ratio(x, x_hat), float(ratio), rel_tol=1e-9)


def test_group_metrics_match_loop_references():
    x, x_hat, f, w_dec = _data(1)
    groups = torch.arange(12) // 3
    a = F.one_hot(groups, 4).double()
    fn = f.numpy()
    # Condition numbers per group.
    conds = M.group_condition_numbers(w_dec, a)
    for k in range(4):
        s = np.linalg.svd(w_dec[groups == k].numpy(), compute_uv=False)
        assert math.isclose(float(conds[k]), s[0] / s[-1], rel_tol=1e-9)
    # Inter-group correlation: mean Pearson over live cross-group feature pairs.
    live = [i for i in range(12) if fn[:, i].std() > 0]
    vals = [np.corrcoef(fn[:, i], fn[:, j])[0, 1] for i in live for j in live
            if i != j and groups[i] != groups[j]]
    assert math.isclose(M.inter_group_correlation(f, a), float(np.mean(vals)), rel_tol=1e-9)
    # Group entropy of activation mass.
    mass = np.array([fn[:, groups.numpy() == k].sum() for k in range(4)])
    p = mass / mass.sum()
    assert math.isclose(M.group_entropy(f, a), float(-(p * np.log(p)).sum()) / math.log(4), rel_tol=1e-6)
    # Inter-group cosine of centroid directions.
    unit = w_dec.numpy() / np.linalg.norm(w_dec.numpy(), axis=1, keepdims=True)
    cents = np.stack([unit[groups.numpy() == k].mean(0) for k in range(4)])
    cents /= np.linalg.norm(cents, axis=1, keepdims=True)
    sims = [cents[i] @ cents[j] for i in range(4) for j in range(4) if i != j]
    assert math.isclose(M.inter_group_cosine(w_dec, a), float(np.mean(sims)), rel_tol=1e-9)


def test_decoder_norms_and_nce_value():
    _, _, f, w_dec = _data(2)
    lo, hi = M.decoder_norms(w_dec)
    norms = np.linalg.norm(w_dec.numpy(), axis=1)
    assert math.isclose(lo, norms.min()) and math.isclose(hi, norms.max())
    labels = torch.arange(64) % 2
    a = F.one_hot(torch.arange(12) // 3, 4).double()
    assert M.info_nce_value(f, a, labels, 0.1) > 0
