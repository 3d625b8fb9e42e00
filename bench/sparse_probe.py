"""Cost of the k-sparse probe (hsae.evaluation.sparse_probe) per SAE at the embedded profile's shape.

    python bench/sparse_probe.py [--rows 32512] [--docs 300] [--d-in 640] [--d-sae 1280] [--threads 1]
    python bench/sparse_probe.py --noise 10    # also the split-to-split s.d. on this synthetic set

The embedded profile's held-out split is 256 contexts x 127 tokens (--rows, content tokens) from about 300
Wikipedia summaries (--docs: an estimate, ~110 tokens a summary); documents get the embedded corpus's 11
topics at its proportions and one forget domain (so 12 one-vs-rest tasks), and token rows are random with a
per-topic offset. A ReLU SAE with random weights (--d-sae latents) stands in for a trained one: the probe's
cost does not depend on what the latents mean. Printed: the per-SAE parts (encode + pool, the top-k and
random-latent probes), the raw-activation ceiling (once per server, shared by every SAE), and the per-SAE
total against the per-SAE unlearning evaluation measured in docs/evaluation.md (53 s: grid 42 s + CE/KL 11 s
on one thread), as a ratio. Synthetic accuracies are not results; with --noise the spread is this synthetic
set's, a check of split_noise, not the metric's noise on a trained SAE.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from hsae.corpora import FORGET, RETAIN
from hsae.evaluation import sparse_probe as sp

# The embedded corpus's topics and article counts (issue 25); "Biology and health sciences" is the forget topic.
TOPICS = {"People": 1828, "Biology and health sciences": 1358, "Geography": 1109, "Physical sciences": 974,
          "Society and social sciences": 785, "Arts": 668, "Technology": 628, "History": 615, "Everyday life": 424,
          "Philosophy and religion": 388, "Mathematics": 256, "Uncategorized": 1000}
EVALUATION_PER_SAE_S = 53.0  # docs/evaluation.md, "Cost": the 32 + 8 setting grid 42 s, CE/KL 11 s


def synthetic_documents(rows: int, n_docs: int, d_in: int, seed: int = 0) -> sp.HeldoutDocuments:
    rng = np.random.default_rng(seed)
    names = list(TOPICS)
    weights = np.array(list(TOPICS.values()), dtype=np.float64)
    topic = rng.choice(len(names), size=n_docs, p=weights / weights.sum())
    doc_of_row = np.sort(rng.integers(0, n_docs, size=rows))
    doc_of_row[:n_docs] = np.arange(n_docs)  # every document has a row
    doc_of_row.sort()
    offsets = rng.normal(size=(len(names), d_in)) * 0.5
    x = (rng.normal(size=(rows, d_in)) + offsets[topic[doc_of_row]]).astype(np.float32)
    domain = np.where(np.array(names)[topic] == "Biology and health sciences", FORGET, RETAIN)
    return sp.HeldoutDocuments(x, doc_of_row, np.array([f"doc{i}" for i in range(n_docs)]), domain,
                               np.array(names, dtype=object)[topic], sp.redrawn_roles(domain, seed))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=256 * 127)
    ap.add_argument("--docs", type=int, default=300)
    ap.add_argument("--d-in", type=int, default=640)
    ap.add_argument("--d-sae", type=int, default=1280)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--noise", type=int, default=0, help="also run split_noise with this many re-drawn splits")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = sp.ProbeConfig()
    docs = synthetic_documents(args.rows, args.docs, args.d_in)
    torch.manual_seed(0)
    w_enc = torch.randn(args.d_in, args.d_sae) / args.d_in**0.5
    b_enc = torch.full((args.d_sae,), -0.5)

    @torch.no_grad()
    def encode(x: np.ndarray) -> np.ndarray:
        return torch.relu(torch.as_tensor(x) @ w_enc + b_enc).numpy()

    t0 = time.perf_counter()
    raw = sp.raw_probe_grid(docs, cfg)
    t_raw = time.perf_counter() - t0
    t0 = time.perf_counter()
    latents = sp.encode_pooled(encode, docs, cfg.encode_batch)
    t_encode = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = sp.sparse_probe(latents, docs, cfg, raw)
    t_probe = time.perf_counter() - t0
    per_sae = t_encode + t_probe
    tasks = result.columns["sparse_probe_tasks"]
    print(f"shape: {args.rows:,} held-out content rows, {args.docs} documents "
          f"({int((docs.role == 'select').sum())} select / {int((docs.role == 'test').sum())} test), "
          f"{args.d_in} -> {args.d_sae} latents, {tasks} tasks x k in {cfg.ks} (+ {cfg.random_draws} random draws), "
          f"{args.threads} thread(s)")
    print(f"per SAE: encode + pool {t_encode:.2f} s, probes {t_probe:.2f} s, total {per_sae:.2f} s")
    print(f"once per server: raw-activation ceiling {t_raw:.2f} s ({len(raw)} fits on {args.d_in} dimensions)")
    print(f"per-SAE probe / per-SAE unlearning evaluation ({EVALUATION_PER_SAE_S:.0f} s): "
          f"{per_sae / EVALUATION_PER_SAE_S:.3f}")
    if args.noise:
        t0 = time.perf_counter()
        noise = sp.split_noise(latents, docs, cfg, n_splits=args.noise)
        print(f"split_noise over {args.noise} re-drawn splits ({time.perf_counter() - t0:.1f} s), synthetic data:")
        for name in ("sparse_probe_forget_k1", "sparse_probe_mean_k1", "sparse_probe_mean_k5", "sparse_probe_mean_k20"):
            print(f"  {name}: mean {noise[name]['mean']:.3f}, split-to-split s.d. {noise[name]['sd']:.3f}")


if __name__ == "__main__":
    main()
