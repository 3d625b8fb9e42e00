"""The k-sparse probe's split-to-split noise on a finished sweep's SAEs, next to its seed-to-seed spread.

    python bench/sparse_probe_noise.py results [--variants relu,contrastive_hier] [--splits 10]

For each variant's seed-42 SAE (loaded from its SAELens export under ``results/saes/``), the activation server's
``sparse_probe_noise`` re-runs the metric on re-drawn select/test halves of the held-out documents; the seed
spread is the s.d. of the rows' values over the sweep's seeds. Runs on the embedded profile's cached harvest.
"""

from __future__ import annotations

import argparse
import json

import pandas as pd
import ray

from hsae.external import ExternalSource, load_external
from hsae.profiles import get_profile
from hsae.server import ActivationServer

COLUMNS = ("sparse_probe_mean_k1", "sparse_probe_forget_k1", "sparse_probe_mean_k5", "sparse_probe_forget_k5")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results")
    p.add_argument("--variants", default="relu,contrastive_hier")
    p.add_argument("--splits", type=int, default=10)
    args = p.parse_args()
    ray.init("local", num_cpus=1, include_dashboard=False)  # the server's ray.put needs a local Ray
    trials = pd.read_parquet(f"{args.results}/trials.parquet")
    trials = trials[trials["status"] == "completed"]
    profile = get_profile("embedded")
    eval_cfg, bank_cfg = profile.eval, profile.bank
    server = ActivationServer(profile.harvest, eval_cfg=eval_cfg, bank_cfg=bank_cfg)
    out = {}
    for variant in args.variants.split(","):
        rows = trials[trials["variant"] == variant]
        row = rows[rows["seed"] == 42].iloc[0]
        cfg, state = load_external(ExternalSource(f"{args.results}/{row['sae_path']}", "folder")).weights()
        noise = server.sparse_probe_noise(cfg, state, n_splits=args.splits)
        out[variant] = {c: {"split_sd": noise[c]["sd"], "seed_sd": float(rows[c].std(ddof=1))} for c in COLUMNS}
        for c in COLUMNS:
            print(f"{variant:<18} {c:<24} split-to-split s.d. {out[variant][c]['split_sd']:.3f}   "
                  f"seed-to-seed s.d. {out[variant][c]['seed_sd']:.3f}")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
