"""Question noise of the accuracy and the continuous frontier area, fold A and both folds averaged, by side.

    python bench/headline_noise.py RESULTS [--n-boot 400] [--max-trials 3]
    python bench/headline_noise.py RESULTS --bank max_retain=1600,candidates_per_domain=2000   # another bank

For each completed trial of a finished sweep: its grid rows from ``RESULTS/grid.parquet`` when they record the
probability of the correct option (and the trial's baseline row) and fold B's own grid (a cross-fitted evaluation),
else its exported SAE (``saes/<trial_id>``) re-evaluated now on the embedded profile's evaluator (unlearning grid
only; the question bank and harvest from the cache). Then the question bootstrap (``hsae.scoring``): the s.d. over
resamples of ``frontier_area`` and ``frontier_area_p``, fold A alone and both folds averaged (fold B on its own
grid: the reported value), resampling the forget questions only, the retain questions only, and both. It measures
the question noise of one trial's number; the seed spread is the verdict's business.
``--bank`` re-evaluates every trial on the embedded profile with those ``BankConfig`` fields changed (a bank of its
own, built once and cached like any bank) and prints the seconds each evaluation took.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch

from hsae import schema
from hsae import scoring as SC
from hsae.results import grid_rows, typed_frame


def trial_grids(results: str, max_trials: int, bank: dict[str, int]) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """Each trial's grid rows with probabilities (re-evaluated where the grid lacks them, or on another ``bank``),
    and the questions."""
    trials = pd.read_parquet(f"{results}/trials.parquet")
    done = trials[(trials["status"] == "completed") & trials["sae_path"].notna()].head(max_trials)
    grid = pd.read_parquet(f"{results}/grid.parquet")
    questions = pd.read_parquet(f"{results}/questions.parquet")
    out, server = {}, None
    for tid, path in zip(done["trial_id"], done["sae_path"], strict=True):
        rows = grid[grid["trial_id"] == tid]
        crossfitted = SC.fold_b_rows(rows).any()
        if not bank and crossfitted and "forget_p_correct" in rows \
                and (rows["control"] == SC.BASELINE_CONTROL).any() and rows["forget_p_correct"].notna().all():
            out[tid] = rows
            continue
        if server is None:
            server = evaluation_server(bank)
            questions = pd.DataFrame(server.questions())
        from hsae.external import ExternalSource, load_external

        cfg, state = load_external(ExternalSource(f"{results}/{path}", "folder")).weights()
        t0 = time.perf_counter()
        answer = server.evaluator().unlearning(cfg, state)
        print(f"[bench] re-evaluated {tid} in {time.perf_counter() - t0:.0f} s", flush=True)
        out[tid] = typed_frame(grid_rows(tid, {"unlearning": answer}), schema.GRID_COLUMNS)
        bank_key = str(out[tid]["bank"].dropna().iloc[0])
        if "bank" in questions and bank_key not in set(questions["bank"].astype(str)):
            raise SystemExit(f"the re-evaluation's bank {bank_key[:8]} is not RESULTS' (another bank configuration): "
                             "compare like with like")
    return out, questions


def evaluation_server(bank: dict[str, int]):
    import os
    from dataclasses import replace

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throw-away local cluster, as the tests start theirs
    import ray

    from hsae.profiles import get_profile
    from hsae.server import ActivationServer

    ray.init("local", num_cpus=1, include_dashboard=False)  # the server's ray.put needs a local Ray
    profile = get_profile("embedded")
    bank_cfg = replace(profile.bank, **bank)
    server = ActivationServer(profile.harvest, eval_cfg=profile.eval, bank_cfg=bank_cfg, evaluators=1, threads=1)
    ev = server.evaluator()
    print(f"[bench] bank {bank or 'of the profile'}: {ev.n_forget} forget, {ev.n_retain} retain questions", flush=True)
    return server


def side_counts(roles: SC.Roles, sides: tuple[str, ...], n_boot: int, rng: np.random.Generator) -> dict:
    """Resample counts per part: the ``sides`` (forget, retain) resampled, the others fixed at one draw each."""
    counts = {}
    for name, test in (("forget", roles.forget_test), ("retain", roles.retain_test)):
        n = len(test)  # all questions of the side: what the SAEBench score reads
        counts[f"{name}_all"] = SC.resample_counts(n, n_boot, rng) if name in sides else np.ones((n_boot, n))
        for part in ("select", "test"):
            n = int((test if part == "test" else ~test).sum())
            counts[f"{name}_{part}"] = SC.resample_counts(n, n_boot, rng) if name in sides else np.ones((n_boot, n))
    return counts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results")
    ap.add_argument("--n-boot", type=int, default=400)
    ap.add_argument("--max-trials", type=int, default=3)
    ap.add_argument("--bank", default="", help="BankConfig fields to change, e.g. max_retain=1600,max_forget=1000")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    bank = {k: int(v) for k, v in (kv.split("=") for kv in args.bank.split(",") if kv)}
    grids, questions = trial_grids(args.results, args.max_trials, bank)
    print("| trial | metric | value | side resampled | s.d. fold A | s.d. cross-fitted |")
    print("|---|---|---|---|---|---|")
    for tid, rows in grids.items():
        outcomes, excluded = SC.outcomes_by_trial(rows, [tid])
        if excluded:
            print(f"| {tid[:8]} | excluded: {excluded[tid]} |")
            continue
        o = outcomes[tid]
        roles = SC.question_roles(questions, o.forget.shape[1], o.retain.shape[1], bank=str(rows["bank"].iloc[0]))
        point = SC.trial_metrics(o, roles, None, SC.reported_folds(o.crossfit is not None))[0]
        rng = np.random.default_rng(0)
        for sides in (("forget",), ("retain",), ("forget", "retain")):
            counts = side_counts(roles, sides, args.n_boot, rng)
            folds = SC.trial_metrics(o, roles, counts, SC.reported_folds(o.crossfit is not None))[1]
            for metric in ("frontier_area", "frontier_area_p"):
                a, b = folds["A"][metric], folds["B"][metric]
                print(f"| {tid[:8]} | {metric} | {point[metric]:.3f} | {' + '.join(sides)} | {np.std(a):.4f} | "
                      f"{np.std((a + b) / 2):.4f} |", flush=True)


if __name__ == "__main__":
    main()
