"""Sweep-level costs through Ray Tune, on the tiny model. Prints ratios measured in one run.

    python bench/sweep.py [--k 8] [--steps 40]

1. K trials that fetch activations from the shared activation server vs K trials that each load the
   model and harvest the same activations themselves (same steps, same Tune settings);
2. Ray Tune's fixed overhead per trial: a K-trial experiment of trials that report once and return.

3. with --embedded: trials per hour of `python tune/ablate.py --space variants` on the embedded
   default (a real sweep with evaluation: 4-6 minutes more; a warm cache makes it the warm number).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
import torch  # noqa: E402
from ray import tune  # noqa: E402

from hsae.activations import Harvester  # noqa: E402
from hsae.config import SAEConfig  # noqa: E402
from hsae.profiles import PROFILES, Profile, override  # noqa: E402
from hsae.server import create_activation_server, fetch  # noqa: E402
from hsae.train import ArrayBatches, Trainer  # noqa: E402


def train_on(x, labels, d: int, profile: Profile, seed: int) -> None:
    cfg = SAEConfig("relu", d, profile.d_sae)
    trainer = Trainer(cfg, profile.train_config(seed),
                      on_progress=lambda p: tune.report({"step": p.step, "loss": p.record["loss"]}))
    trainer.fit(ArrayBatches(x, labels, profile.train.batch_size, seed), guard=False)


def shared_trial(config: dict) -> None:
    torch.set_num_threads(1)
    served = fetch(ray.get(ray.get_actor(config["server"]).prepare.remote()))
    train_on(served.x, served.labels, served.model.d_model, Profile.from_dict(config["profile"]), config["seed"])


def own_model_trial(config: dict) -> None:
    torch.set_num_threads(1)
    profile = Profile.from_dict(config["profile"])
    root = Path(tempfile.mkdtemp(prefix="hsae-bench-"))  # a private cache: nothing shared
    harvest = Harvester(profile.harvest, root, progress=None).run()
    x, labels = harvest.arrays("train")
    train_on(x, labels, x.shape[1], profile, config["seed"])


def noop_trial(config: dict) -> None:
    tune.report({"step": 1})


def run(trainable, k: int, param_space: dict, storage: str, name: str) -> float:
    t0 = time.perf_counter()
    tuner = tune.Tuner(tune.with_resources(trainable, {"cpu": 1}),
                       param_space={**param_space, "seed": tune.grid_search(list(range(42, 42 + k)))},
                       run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0))
    grid = tuner.fit()
    assert grid.num_errors == 0, [r.error for r in grid if r.error]
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--embedded", action="store_true", help="also time --space variants on the embedded default")
    args = ap.parse_args()
    profile = replace(override(PROFILES["tiny"], {"train.steps": args.steps}), evaluate=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    storage = tempfile.mkdtemp(prefix="hsae-bench-tune-")
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        server = create_activation_server(profile.harvest, name="bench-sweep", cache_root=cache, num_cpus=0)
        ray.get(server.prepare.remote())
        run(shared_trial, args.k, {"server": "bench-sweep", "profile": asdict(profile)}, storage, "shared")
        shared = time.perf_counter() - t0  # the one harvest included
    own = run(own_model_trial, args.k, {"profile": asdict(profile)}, storage, "own")
    noop = run(noop_trial, args.k, {}, storage, "noop")
    print(f"K={args.k} tiny-model trials, {args.steps} steps each, 2 CPUs:")
    print(f"  shared activation server   {shared:6.1f} s")
    print(f"  each trial runs the model  {own:6.1f} s   ratio {own / shared:.2f}x")
    print(f"  Tune fixed overhead        {noop:6.1f} s for {args.k} no-op trials = {noop / args.k:.2f} s/trial")
    ray.shutdown()
    if args.embedded:
        import pandas as pd

        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, str(Path(__file__).resolve().parent.parent / "tune" / "ablate.py"),
                            "--space", "variants", "--out", out], check=True, capture_output=True)
            wall = time.perf_counter() - t0
            n = len(pd.read_parquet(Path(out) / "trials.parquet"))
        print(f"  --space variants, embedded: {n} trials in {wall:.0f} s = {3600 * n / wall:.0f} trials/hour")


if __name__ == "__main__":
    main()
