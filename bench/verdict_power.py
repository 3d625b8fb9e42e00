"""The verdict's test by simulation: false-claim rates (robust paired test vs the pooled block test it
replaced), minimal detectable differences, and power curves for "better" and "equivalent".

    python bench/verdict_power.py [--sims 4000] [--seed-sd 0.07] [--margin 0.05]

Prints tables (docs/evaluation.md, "The seed-level test", quotes them). Everything goes through
``hsae.stats``, the functions the verdict calls; the sweeps are simulated as in tests/test_calibration.py:
7 arms, a shared seed effect, each arm's own seed noise.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from hsae import stats

ARMS, BLOCK_SD, ALPHA = 7, 0.05, 0.05


def sweeps(rng: np.random.Generator, n_sims: int, n_seeds: int, sd: np.ndarray, effect: float = 0.0) -> np.ndarray:
    y = 0.5 + rng.normal(0, BLOCK_SD, (n_sims, 1, n_seeds)) + sd[None, :, None] * rng.normal(0, 1, (n_sims, ARMS,
                                                                                                     n_seeds))
    y[:, 1] += effect
    return y


def false_claim_rates(rng: np.random.Generator, n_sims: int, seed_sd: float, margin: float) -> list[str]:
    wide = 3 * seed_sd
    scenarios = {"equal spread": [seed_sd] * ARMS, "relu 3x wider": [wide] + [seed_sd] * (ARMS - 1),
                 "one arm 3x wider": [seed_sd, wide] + [seed_sd] * (ARMS - 2)}
    lines = ["| scenario (null) | seeds | robust paired test | pooled block test |", "|---|---|---|---|"]
    for name, sd in scenarios.items():
        for n in (3, 5):
            y = sweeps(rng, n_sims, n, np.asarray(sd))
            robust = stats.decisions(stats.paired_many_to_one(y, ALPHA), margin)
            robust_rate = float(np.isin(robust, (stats.BETTER_UP, stats.BETTER_DOWN)).any(axis=-1).mean())
            pooled = stats.many_to_one(y, ALPHA)
            pooled_rate = float(((pooled.lo > 0) | (pooled.hi < 0)).any(axis=-1).mean())
            lines.append(f"| {name} | {n} | {robust_rate:.1%} | {pooled_rate:.1%} |")
    return lines


def mde_table(seed_sd: float) -> list[str]:
    pair = math.sqrt(2) * seed_sd
    lines = ["| seeds | robust MDE | pooled MDE | ratio |", "|---|---|---|---|"]
    for n in (3, 5, 10, 20):
        robust, pooled = stats.paired_mdd(pair, n, ARMS - 1), stats.min_detectable_difference(seed_sd, ARMS, n)
        lines.append(f"| {n} | {robust:.3f} | {pooled:.3f} | {robust / pooled:.2f}x |")
    return lines


def power_curves(rng: np.random.Generator, n_sims: int, seed_sd: float, margin: float) -> list[str]:
    """P(better) and P(equivalent) for one arm at true differences 0 .. 3 margins, by seeds."""
    truths = [0.0, 0.5 * margin, margin, 2 * margin, 3 * margin]
    lines = ["| seeds | " + " | ".join(f"Δ = {t:.3g}: better / equivalent" for t in truths) + " |",
             "|---|" + "---|" * len(truths)]
    for n in (3, 5, 10, 20, 40):
        cells = []
        for t in truths:
            codes = stats.decisions(stats.paired_many_to_one(sweeps(rng, n_sims, n, np.full(ARMS, seed_sd), t),
                                                             ALPHA), margin)[:, 0]
            cells.append(f"{(codes == stats.BETTER_UP).mean():.0%} / {(codes == stats.EQUIVALENT).mean():.0%}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sims", type=int, default=4000)
    p.add_argument("--seed-sd", type=float, default=0.07, help="each arm's seed-to-seed s.d. (the main job's)")
    p.add_argument("--margin", type=float, default=0.05, help="the equivalence margin")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    print(f"Family-wise rate of any better/worse claim, {ARMS} arms, seed s.d. {args.seed_sd}, {args.sims} sweeps:")
    print("\n".join(false_claim_rates(rng, args.sims, args.seed_sd, args.margin)))
    print(f"\nMinimal detectable difference (power 0.8, family-wise 0.05, {ARMS - 1} comparisons):")
    print("\n".join(mde_table(args.seed_sd)))
    print(f"\nOne arm's chance of 'better' / 'equivalent' (margin ±{args.margin}) by its true difference:")
    print("\n".join(power_curves(rng, args.sims // 2, args.seed_sd, args.margin)))


if __name__ == "__main__":
    main()
