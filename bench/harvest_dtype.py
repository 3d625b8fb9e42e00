"""Would a bf16 harvest give the same SAEs? Speed of the harvest's forward, and the SAEs trained on each.

1. tokens/s of the forward stopped at layer L in float32 and in bfloat16 on this machine (one run, a ratio);
2. with two results directories, the same arm trained on an fp32 harvest (the main job) and on a bf16 harvest
   (``--set harvest_dtype=bfloat16``), paired by seed (same initialisation, same rows, same order): EV, L0 and the
   declared headline (recomputed from each grid, chosen on select questions), each seed's difference, their mean,
   and the seed noise the verdict's test carries (the fp32 run's two-way residual s.d., ``hsae.budget.seed_noise``).

    python bench/harvest_dtype.py [--contexts 16]                          # 1.
    python bench/harvest_dtype.py --compare RESULTS_FP32 RESULTS_BF16 [--arm relu]   # 2.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from hsae.budget import recipe_difference, seed_noise  # noqa: E402
from hsae.models import ModelSpec, load_model, stopped_forward  # noqa: E402

METRICS = ["explained_variance", "l0"]


def forward_rate(dtype: str, contexts: int, ctx_len: int = 128, reps: int = 3) -> float:
    """Tokens/s of the embedded model's forward to its layer, best of ``reps``, on the threads torch has."""
    loaded = load_model(ModelSpec("embedded", dtype=dtype))
    ids = torch.randint(10, loaded.tokenizer.vocab_size - 10, (contexts, ctx_len),
                        generator=torch.Generator().manual_seed(0))
    stopped_forward(loaded, ids[:2])  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        stopped_forward(loaded, ids)
        best = min(best, time.perf_counter() - t0)
    return contexts * ctx_len / best


def paired(fp32_dir: str, bf16_dir: str, arm: str) -> pd.DataFrame:
    """Per seed of ``arm``: each metric on both harvests; ``attrs``: the fp32 run's seed noise per metric."""
    from tune.report_data import ReportInputs, budget_points

    main, other = ReportInputs.load(fp32_dir, n_boot=1), ReportInputs.load(bf16_dir, n_boot=1)
    headline = main.headline
    metrics = [*METRICS, headline]
    points = budget_points(main, metrics)
    noise = {m: seed_noise(points, m) for m in metrics}
    theirs = budget_points(other, metrics)
    if theirs.attrs["bank"] != points.attrs["bank"]:
        raise SystemExit("the two runs scored different question banks: their headlines are not comparable")
    mine, theirs = (p[p["arm"] == arm] for p in (points, theirs))
    pairs = theirs.merge(mine, on="seed", suffixes=("_bf16", ""))
    recipe = ["steps", *(c for c in mine if c.startswith("cfg_") and f"{c}_bf16" in pairs)]
    differ = {recipe_difference(r, recipe, "_bf16") for r in pairs.to_dict("records")} - {None}
    if differ:  # a pair must differ in the harvest alone
        raise SystemExit(f"the two runs trained {arm} with different recipes ({', '.join(sorted(differ))}): re-run "
                         "the bf16 harvest with the same --steps and --set values")
    table = pairs.set_index("seed")[[*metrics, *(f"{m}_bf16" for m in metrics)]].rename(
        columns={m: f"{m}_fp32" for m in metrics})
    for m in metrics:
        table[f"{m}_diff"] = table[f"{m}_bf16"] - table[f"{m}_fp32"]
    table.attrs["noise"], table.attrs["metrics"] = noise, metrics
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, default=16)
    p.add_argument("--compare", nargs=2, metavar=("RESULTS_FP32", "RESULTS_BF16"))
    p.add_argument("--arm", default="relu")
    args = p.parse_args()
    if not args.compare:
        rates = {d: forward_rate(d, args.contexts) for d in ("float32", "bfloat16")}
        print(f"harvest forward on {torch.get_num_threads()} threads: float32 {rates['float32']:,.0f} tokens/s, "
              f"bfloat16 {rates['bfloat16']:,.0f} tokens/s: bf16 {rates['bfloat16'] / rates['float32']:.2f}x")
        return
    table = paired(*args.compare, args.arm)
    print(f"\n{args.arm}, fp32 harvest ({args.compare[0]}) vs bf16 harvest ({args.compare[1]}), paired by seed:")
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    for m in table.attrs["metrics"]:
        mean, noise = float(table[f"{m}_diff"].mean()), table.attrs["noise"][m]
        verdict = "within" if abs(mean) < noise else "beyond"
        print(f"{m}: mean difference {mean:+.4f} over {len(table)} seeds; seed noise (residual s.d. of the fp32 "
              f"run) {noise:.4f}: {verdict} the noise")


if __name__ == "__main__":
    main()
