"""The claims' false-claim rate on a real job's own numbers: arm labels permuted within each seed.

    python bench/verdict_permutations.py results [--permutations 300] [--n-boot 300]

Under a within-seed permutation no arm differs from another (every label is exchangeable within a block), so any
claim the report words as one is false. The verdict is computed once from the results (``build_verdict``, the
report's own call); each permutation relabels the per-trial values within each seed and reruns ``arm_tests``
with the rows' declared margin and looks, and with the question resamples (the trials keep theirs, so each
comparison's variance shared by the seeds follows the labels, as in the report). Prints, per family worded as
a claim (the headline; the second witness when its gate opens) and for all of them together, the share of
permutations with any claim, and the same for the families the report shows as descriptive (what each would
claim were it worded as a claim).
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from hsae import verdict as V
from tune.report_data import ReportInputs


def permuted(per_trial: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """The arm labels shuffled within each seed (arms without a trial at a seed stay without one)."""
    out = per_trial.copy()
    for _, rows in out.groupby("seed"):
        out.loc[rows.index, "arm"] = rng.permutation(rows["arm"].to_numpy())
    return out


def claims(tests: list[V.MetricTest]) -> dict[str, bool]:
    """Per metric: whether any arm got a direction (false under the permutation; "equivalent" is true there),
    worded as a claim or, for a descriptive family, as its interval excluding 0."""
    return {t.metric: any(a.claim.startswith(("better", "worse")) for a in t.arms) for t in tests if t.claimed} | {
        f"{t.metric} (descriptive)": any(a.lo > 0 or a.hi < 0 for a in t.arms) for t in tests if not t.claimed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results")
    p.add_argument("--permutations", type=int, default=300)
    p.add_argument("--n-boot", type=int, default=300, help="question resamples behind each shared variance")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    inputs = ReportInputs.load(args.results, n_boot=args.n_boot)
    v = inputs.verdict
    if not isinstance(v, V.Verdict):
        raise SystemExit(f"no verdict: {v}")
    secondary = [t.metric for t in v.tests[1:]]
    margin = float(V.declared(inputs.main, "equivalence_margin", V.DEFAULT_MARGIN))
    looks = int(V.declared(inputs.main, "seed_looks", 1))
    rng = np.random.default_rng(args.seed)
    counts: dict[str, int] = {}
    any_claim = 0
    for _ in range(args.permutations):
        tests = V.arm_tests(permuted(v.per_trial, rng), v.headline, secondary, margin=margin, looks=looks,
                            boot=v.boot)
        said = claims(tests)
        for k, hit in said.items():
            counts[k] = counts.get(k, 0) + hit
        any_claim += any(hit for k, hit in said.items() if not k.endswith("(descriptive)"))
    n = args.permutations
    print(f"{args.results}: {len(v.per_trial)} trials, arms {v.arms()}, {n} within-seed permutations")
    for k, c in sorted(counts.items()):
        print(f"  {k:<45} any claim in {c / n:6.1%} of permutations")
    print(f"  {'every family worded as a claim, together':<45} any claim in {any_claim / n:6.1%} of permutations")


if __name__ == "__main__":
    main()
