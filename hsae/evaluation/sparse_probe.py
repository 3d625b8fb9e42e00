"""k-sparse probing of held-out topics: the second witness of "does this SAE separate knowledge?".

Every held-out document is one example: its content-token activations (BOS and EOS never count) are
mean-pooled, once as raw activations and once as SAE latents (encode first, then pool). For each task
(the forget domain against the rest, and each labelled topic against the rest) the probe

1. picks the k latents with the largest |class-mean difference| on the **select** documents,
2. fits an L2-regularised logistic regression on those k (standardised on the select documents,
   class-balanced weights),
3. reports **balanced accuracy** (mean of the two classes' recalls) on the **test** documents.

References on the same documents and tasks: the same probe on all d_in raw dimensions (the ceiling) and
on k random live latents of the same SAE (the floor, averaged over draws). A test document is never read
before step 3 (``tests/test_sparse_probe.py`` changes test documents and checks that nothing fitted
moves). ``split_noise`` re-draws the select/test halves to measure the metric's own spread.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hsae.corpora import FORGET, RETAIN

KS = (1, 2, 5, 20)
FORGET_TASK = "forget"
# Topics that are not a topic (the embedded corpus files unlabelled articles under "Uncategorized").
UNLABELLED_TOPICS = ("", "Uncategorized")
ROLES = ("select", "test")
# Summary columns of a trial row (hsae/schema.py declares each).
SAE_COLUMNS = tuple(f"sparse_probe_{what}_k{k}" for what in ("forget", "mean", "random_mean") for k in KS)
REFERENCE_COLUMNS = ("sparse_probe_raw_forget", "sparse_probe_raw_mean")
COUNT_COLUMNS = ("sparse_probe_tasks", "sparse_probe_test_docs")
ROW_COLUMNS = (*SAE_COLUMNS, *REFERENCE_COLUMNS, *COUNT_COLUMNS, "sparse_probe_s")


@dataclass(frozen=True)
class ProbeConfig:
    ks: tuple[int, ...] = KS
    l2: float = 1e-2  # on the mean class-balanced log-loss: about sklearn's C = 1 at 100 documents
    random_draws: int = 5  # draws of k random live latents per task and k (the floor is their mean)
    min_docs: int = 2  # per class, in select and in test: a task with fewer is not scored
    newton_steps: int = 50
    encode_batch: int = 8192
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.ks or any(not isinstance(k, int) or k < 1 for k in self.ks):
            raise ValueError(f"ks must be positive integers, got {self.ks!r}")
        if not isinstance(self.l2, (int, float)) or self.l2 <= 0:
            raise ValueError(f"l2 must be a number > 0, got {self.l2!r}")
        for name in ("random_draws", "min_docs", "newton_steps", "encode_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class HeldoutDocuments:
    """Held-out documents and their content-token activation rows (raw activations, as harvested)."""

    rows: np.ndarray  # (n_rows, d_in) activations of content tokens
    doc_of_row: np.ndarray  # (n_rows,) index of each row's document
    doc_ids: np.ndarray  # (n_docs,) document ids (split.parquet's doc_id)
    domain: np.ndarray  # (n_docs,) RETAIN / FORGET
    topic: np.ndarray  # (n_docs,) topic label; "" where the corpus has none
    role: np.ndarray  # (n_docs,) "select" / "test"
    raw: np.ndarray = field(init=False, repr=False)  # (n_docs, d_in) mean-pooled raw activations

    def __post_init__(self) -> None:
        n_docs = len(self.doc_ids)
        for name in ("domain", "topic", "role"):
            if len(getattr(self, name)) != n_docs:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {n_docs} documents")
        if self.rows.ndim != 2 or len(self.rows) != len(self.doc_of_row):
            raise ValueError(f"rows {self.rows.shape} and doc_of_row {self.doc_of_row.shape} do not line up")
        if len(self.doc_of_row) and (self.doc_of_row.min() < 0 or self.doc_of_row.max() >= n_docs):
            raise ValueError(f"doc_of_row must index the {n_docs} documents")
        bad = sorted(set(self.role) - set(ROLES))
        if bad:
            raise ValueError(f"role must be one of {ROLES}, got {bad}")
        if np.bincount(self.doc_of_row, minlength=n_docs).min(initial=1) == 0:
            raise ValueError("every document needs at least one content row")
        object.__setattr__(self, "raw", pool(self.rows, self.doc_of_row, n_docs))

    @property
    def n_docs(self) -> int:
        return len(self.doc_ids)

    def with_roles(self, role: np.ndarray) -> HeldoutDocuments:
        """The same documents under another select/test assignment."""
        return HeldoutDocuments(self.rows, self.doc_of_row, self.doc_ids, self.domain, self.topic, np.asarray(role))


def pool(values: np.ndarray, doc_of_row: np.ndarray, n_docs: int) -> np.ndarray:
    """Mean of ``values`` rows per document (float64)."""
    sums = torch.zeros((n_docs, values.shape[1]), dtype=torch.float64)
    _add_rows(sums, doc_of_row, values)
    counts = np.bincount(doc_of_row, minlength=n_docs).astype(np.float64)
    return sums.numpy() / np.maximum(counts, 1.0)[:, None]


def _add_rows(sums: torch.Tensor, doc_of_row: np.ndarray, values: np.ndarray) -> None:
    """sums[doc_of_row[i]] += values[i] (np.add.at is ~50x slower)."""
    sums.index_add_(0, torch.from_numpy(np.asarray(doc_of_row, dtype=np.int64)),
                    torch.from_numpy(np.asarray(values, dtype=np.float64)))


def encode_pooled(encode: Callable[[np.ndarray], np.ndarray], docs: HeldoutDocuments, batch: int) -> np.ndarray:
    """Mean-pooled latents per document: every content row encoded, then pooled (not encode(pool(x)))."""
    sums: torch.Tensor | None = None
    for start in range(0, len(docs.rows), batch):
        f = np.asarray(encode(docs.rows[start : start + batch]))
        if sums is None:
            sums = torch.zeros((docs.n_docs, f.shape[1]), dtype=torch.float64)
        _add_rows(sums, docs.doc_of_row[start : start + batch], f)
    if sums is None:
        raise ValueError("no held-out content rows to encode")
    counts = np.bincount(docs.doc_of_row, minlength=docs.n_docs).astype(np.float64)
    return sums.numpy() / counts[:, None]


def probe_tasks(docs: HeldoutDocuments, min_docs: int) -> dict[str, np.ndarray]:
    """One-vs-rest tasks with at least ``min_docs`` documents of each class in select and in test: the
    forget domain, then every labelled topic (sorted)."""
    candidates = {FORGET_TASK: docs.domain == FORGET}
    for topic in sorted(set(docs.topic) - set(UNLABELLED_TOPICS)):
        candidates[str(topic)] = docs.topic == topic
    return {name: y for name, y in candidates.items() if _scorable(y, docs.role, min_docs)}


def _scorable(y: np.ndarray, role: np.ndarray, min_docs: int) -> bool:
    return all(((role == r) & (y == cls)).sum() >= min_docs for r in ROLES for cls in (True, False))


def top_k_by_mean_difference(features: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k features with the largest |mean(positive) - mean(negative)| (ties: lower index)."""
    diff = np.abs(features[y].mean(axis=0) - features[~y].mean(axis=0))
    return np.argsort(-diff, kind="stable")[: min(k, features.shape[1])]


@dataclass(frozen=True)
class LogisticProbe:
    """A fitted probe: standardisation (from the fitting documents) and weights."""

    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    bias: float

    def predict(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.scale) @ self.weights + self.bias > 0


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float, steps: int = 50) -> LogisticProbe:
    """L2-regularised logistic regression with class-balanced weights, by damped Newton steps (float64)."""
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    design = np.hstack([(x - mean) / scale, np.ones((len(x), 1))])
    target = y.astype(np.float64)
    weight = np.where(y, 0.5 / y.sum(), 0.5 / (~y).sum())
    reg = np.full(design.shape[1], l2)
    reg[-1] = 1e-9  # the bias is not shrunk

    def loss(theta: np.ndarray) -> float:
        z = design @ theta
        return float(weight @ (np.logaddexp(0.0, z) - target * z) + 0.5 * reg @ theta**2)

    theta = np.zeros(design.shape[1])
    current = loss(theta)
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(design @ theta)))
        grad = design.T @ (weight * (p - target)) + reg * theta
        hess = (design.T * (weight * p * (1 - p))) @ design + np.diag(reg)
        # torch's solver, under the process's torch thread count (numpy's BLAS oversubscribes a shared CPU:
        # 1 s against 10 ms for a 641-wide system here)
        step = torch.linalg.solve(torch.from_numpy(hess), torch.from_numpy(grad)).numpy()
        t = 1.0
        while t > 1e-4 and loss(theta - t * step) > current:
            t *= 0.5
        theta -= t * step
        new = loss(theta)
        if current - new < 1e-12:
            break
        current = new
    return LogisticProbe(mean, scale, theta[:-1], float(theta[-1]))


def balanced_accuracy(y: np.ndarray, predicted: np.ndarray) -> float:
    """Mean of the recall on positives and the recall on negatives (0.5 = chance whatever the balance)."""
    return 0.5 * float(predicted[y].mean() + (~predicted[~y]).mean())


def probe_accuracy(features: np.ndarray, y: np.ndarray, role: np.ndarray, l2: float, steps: int) -> float:
    """Fit on select documents, balanced accuracy on test documents."""
    fit, test = role == "select", role == "test"
    probe = fit_logistic(features[fit], y[fit], l2, steps)
    return balanced_accuracy(y[test], probe.predict(features[test]))


@dataclass
class ProbeResult:
    grid: list[dict[str, Any]]  # one row per (task, features, k): probe.parquet
    columns: dict[str, Any]  # the trial row's sparse_probe_* columns


def sparse_probe(latents: np.ndarray, docs: HeldoutDocuments, cfg: ProbeConfig,
                 raw_grid: list[dict[str, Any]] | None = None) -> ProbeResult:
    """Every task x k on the SAE's pooled ``latents`` (n_docs, d_sae), its random floor and the raw ceiling
    (``raw_grid``: the raw rows computed earlier on the same documents and roles; None computes them)."""
    if latents.shape[0] != docs.n_docs:
        raise ValueError(f"latents has {latents.shape[0]} rows for {docs.n_docs} documents")
    t0 = time.perf_counter()
    tasks = probe_tasks(docs, cfg.min_docs)
    fit = docs.role == "select"
    live = np.flatnonzero(np.abs(latents[fit]).sum(axis=0) > 0)
    rng = np.random.default_rng(cfg.seed)
    grid = []
    for name, y in tasks.items():
        counts = _counts(y, docs.role)
        for k in cfg.ks:
            chosen = top_k_by_mean_difference(latents[fit], y[fit], k)
            acc = probe_accuracy(latents[:, chosen], y, docs.role, cfg.l2, cfg.newton_steps)
            grid.append({"task": name, "features": "sae", "k": k, "accuracy": acc,
                         "latents": json.dumps(chosen.tolist()), **counts})
            draws = [rng.choice(live, size=min(k, len(live)), replace=False) for _ in range(cfg.random_draws)]
            floor = [probe_accuracy(latents[:, d], y, docs.role, cfg.l2, cfg.newton_steps) for d in draws if len(d)]
            grid.append({"task": name, "features": "random", "k": k,
                         "accuracy": float(np.mean(floor)) if floor else None, "latents": None, **counts})
    grid += raw_probe_grid(docs, cfg) if raw_grid is None else raw_grid
    columns = summary_columns(grid, cfg.ks)
    columns["sparse_probe_test_docs"] = int((docs.role == "test").sum())
    columns["sparse_probe_s"] = time.perf_counter() - t0
    return ProbeResult(grid, columns)


def raw_probe_grid(docs: HeldoutDocuments, cfg: ProbeConfig) -> list[dict[str, Any]]:
    """The ceiling: the probe on all d_in pooled raw dimensions, per task (independent of any SAE)."""
    return [{"task": name, "features": "raw", "k": docs.raw.shape[1], "latents": None, **_counts(y, docs.role),
             "accuracy": probe_accuracy(docs.raw, y, docs.role, cfg.l2, cfg.newton_steps)}
            for name, y in probe_tasks(docs, cfg.min_docs).items()]


def _counts(y: np.ndarray, role: np.ndarray) -> dict[str, int]:
    return {f"n_{r}_{cls}": int(((role == r) & (y == (cls == "pos"))).sum()) for r in ROLES for cls in ("pos", "neg")}


def summary_columns(grid: list[dict[str, Any]], ks: tuple[int, ...] = KS) -> dict[str, Any]:
    """The row's columns from the grid: the forget task, the mean over scored tasks, the references
    (null where no task was scorable)."""

    def accuracies(features: str, k: int | None = None, task: str | None = None) -> list[float]:
        return [g["accuracy"] for g in grid if g["features"] == features and g["accuracy"] is not None
                and (k is None or g["k"] == k) and (task is None or g["task"] == task)]

    def mean(values: list[float]) -> float | None:
        return float(np.mean(values)) if values else None

    out: dict[str, Any] = {}
    for k in ks:
        out[f"sparse_probe_forget_k{k}"] = mean(accuracies("sae", k, FORGET_TASK))
        out[f"sparse_probe_mean_k{k}"] = mean(accuracies("sae", k))
        out[f"sparse_probe_random_mean_k{k}"] = mean(accuracies("random", k))
    out["sparse_probe_raw_forget"] = mean(accuracies("raw", task=FORGET_TASK))
    out["sparse_probe_raw_mean"] = mean(accuracies("raw"))
    out["sparse_probe_tasks"] = len({g["task"] for g in grid})
    return out


def redrawn_roles(domain: np.ndarray, seed: int) -> np.ndarray:
    """Another select/test assignment of the same documents: half of each domain's documents select
    (rounded up), drawn with ``seed`` (the rule of ``hsae.corpora.heldout_roles``)."""
    role = np.empty(len(domain), dtype=object)
    for d in (RETAIN, FORGET):
        idx = np.flatnonzero(domain == d)
        perm = np.random.default_rng([seed, d]).permutation(len(idx))
        half = (len(idx) + 1) // 2
        role[idx[perm[:half]]] = "select"
        role[idx[perm[half:]]] = "test"
    return role


def split_noise(latents: np.ndarray, docs: HeldoutDocuments, cfg: ProbeConfig, n_splits: int = 10,
                seed: int = 1) -> dict[str, dict[str, float | None]]:
    """The metric re-run on ``n_splits`` re-drawn select/test halves of the same documents (one SAE):
    per summary column, its mean and split-to-split standard deviation (ddof 1)."""
    if n_splits < 2:
        raise ValueError(f"n_splits must be >= 2 to measure a spread, got {n_splits!r}")
    runs = [sparse_probe(latents, docs.with_roles(redrawn_roles(docs.domain, seed + i)), cfg).columns
            for i in range(n_splits)]
    out: dict[str, dict[str, float | None]] = {}
    for name in (*SAE_COLUMNS, *REFERENCE_COLUMNS):
        values = [r[name] for r in runs if r[name] is not None]
        out[name] = {"mean": float(np.mean(values)) if values else None,
                     "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None, "splits": len(values)}
    return out


# -- from the harvest: which document every held-out content row belongs to ---------------------------
def row_positions(position_tokens: np.ndarray, row_tokens: np.ndarray) -> np.ndarray:
    """Where each kept row sits among a shard's token positions. Exact when the harvest dropped no position
    (each shard's sidecar counts its attention-sink rows; usually none); otherwise the rows are a
    subsequence and each is matched to the leftmost position with its token, in order, so a row next to a
    dropped position holding the same token may be placed one occurrence early."""
    if len(row_tokens) == len(position_tokens):
        return np.arange(len(row_tokens))
    out = np.empty(len(row_tokens), dtype=np.int64)
    j = 0
    for i, token in enumerate(row_tokens.tolist()):
        while j < len(position_tokens) and position_tokens[j] != token:
            j += 1
        if j == len(position_tokens):
            raise ValueError("the shard's rows are not a subsequence of its token positions: cache and contexts "
                             "disagree")
        out[i] = j
        j += 1
    return out


@dataclass(frozen=True)
class CorpusDocuments:
    """What the probe needs to know of the corpus documents the held-out contexts were packed from."""

    doc_ids: np.ndarray  # (n,) doc_id of each document row
    domain: np.ndarray  # (n,) RETAIN / FORGET
    topic: np.ndarray  # (n,) topic label, "" where the corpus has none
    role: np.ndarray  # (n,) "select" / "test" (hsae.corpora.heldout_roles)


def documents_from_harvest(shards: list[tuple[np.ndarray, np.ndarray]], contexts: np.ndarray,
                           doc_rows: np.ndarray, shard_ctxs: int, special_ids: list[int],
                           corpus: CorpusDocuments) -> HeldoutDocuments:
    """The held-out documents of a harvest: each shard's (x, token ids) rows placed back at their
    positions (position 0 is never stored), content tokens only (``special_ids`` BOS / EOS dropped), each
    row tagged with its document; a document cut across contexts is pooled as one."""
    xs, docs_of = [], []
    for i, (x, row_tokens) in enumerate(shards):
        block = slice(i * shard_ctxs, (i + 1) * shard_ctxs)
        position_docs = doc_rows[block, 1:].reshape(-1)
        at = row_positions(contexts[block, 1:].reshape(-1), np.asarray(row_tokens))
        doc = position_docs[at]
        keep = (doc >= 0) & ~np.isin(row_tokens, special_ids)
        xs.append(np.asarray(x)[keep])
        docs_of.append(doc[keep])
    rows, doc = np.concatenate(xs), np.concatenate(docs_of)
    used, doc_of_row = np.unique(doc, return_inverse=True)
    return HeldoutDocuments(rows, doc_of_row, corpus.doc_ids[used], corpus.domain[used], corpus.topic[used],
                            corpus.role[used])
