"""Activation-service benchmark on the embedded default. Prints ratios measured in one run.

1. tokens/s of the forward stopped at layer L vs the full forward (lm_head included);
2. time for K trials to obtain the same N contexts of activations through one shared server
   (harvest once, put once, K zero-copy fetches) vs K trials each loading and running the model.

    python bench/activations.py [--k 4] [--contexts 32] [--model embedded]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hsae.activations import HarvestConfig, Harvester  # noqa: E402
from hsae.corpora import CorpusSpec  # noqa: E402
from hsae.models import ModelSpec, load_model, stopped_forward, with_layer  # noqa: E402


def forward_rates(spec: ModelSpec, batch: int = 8, ctx_len: int = 128, reps: int = 3) -> tuple[float, float]:
    loaded = load_model(spec)
    ids = torch.randint(10, 1000, (batch, ctx_len))
    ids[:, 0] = loaded.bos_id

    def rate(fn) -> float:
        fn()  # warm-up
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return reps * ids.numel() / (time.perf_counter() - t0)

    with torch.no_grad():
        stopped = rate(lambda: stopped_forward(loaded, ids))
        full = rate(lambda: loaded.model(input_ids=ids, use_cache=False))
    return stopped, full


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--k", type=int, default=4, help="trials")
    ap.add_argument("--contexts", type=int, default=32, help="contexts of 128 tokens each trial needs")
    args = ap.parse_args()
    torch.set_num_threads(1)
    spec = with_layer(ModelSpec(args.model))
    corpus = CorpusSpec("embedded" if args.model == "embedded" else "toy")

    stopped, full = forward_rates(spec)
    print(f"forward tokens/s: stopped at layer {spec.layer} = {stopped:.0f}, full = {full:.0f}, "
          f"ratio = {stopped / full:.2f}x")

    import ray

    ray.init("local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    cfg = HarvestConfig(model=spec, corpus=corpus, n_ctxs=args.contexts, n_eval_ctxs=8, shard_ctxs=16)

    @ray.remote(num_cpus=1)
    def own_model_trial(cfg: HarvestConfig, root: str) -> float:
        torch.set_num_threads(1)
        h = Harvester(cfg, __import__("pathlib").Path(root), progress=None).run()
        return float(sum(s.x.sum() for s in h.shards["train"]))

    @ray.remote(num_cpus=1)
    def shared_trial(info: dict) -> float:
        from hsae.server import fetch

        served = fetch(info)
        return float(sum(p.sum() for p in served.x.parts))

    from hsae.server import create_activation_server

    with tempfile.TemporaryDirectory() as shared_root:
        t0 = time.perf_counter()
        server = create_activation_server(cfg, name="bench-acts", cache_root=shared_root, num_cpus=1)
        info = ray.get(server.prepare.remote())
        shared_sums = ray.get([shared_trial.remote(info) for _ in range(args.k)])
        shared_s = time.perf_counter() - t0
        ray.kill(server)
    roots = [tempfile.mkdtemp() for _ in range(args.k)]
    t0 = time.perf_counter()
    own_sums = ray.get([own_model_trial.remote(cfg, r) for r in roots])
    own_s = time.perf_counter() - t0
    assert np.allclose(shared_sums, own_sums, rtol=1e-5), (shared_sums, own_sums)
    print(f"K={args.k} trials x {args.contexts * 128} tokens: shared server {shared_s:.1f}s, "
          f"independent model runs {own_s:.1f}s, ratio = {own_s / shared_s:.2f}x faster shared")
    ray.shutdown()


if __name__ == "__main__":
    main()
