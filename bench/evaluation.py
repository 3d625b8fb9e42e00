"""Evaluation cost of the activation server, three ways on the same SAEs: every setting re-running its prompts
(one evaluator, ``EvalConfig.share_answers=False``), answers shared between settings that edit a prompt alike (one
evaluator), and that on ``--evaluators`` evaluators at once (threads of one server, each with its model copy).

    python bench/evaluation.py results [--variants relu,static_hier] [--evaluators 2] [--threads 1]

Loads each variant's seed-42 SAE from a finished sweep's ``results/saes/`` and runs the server's ``evaluate``
on the embedded profile's cached harvest (the server's one-off work is done first and not timed). Prints
seconds per SAE in each mode, their ratios, and whether the numbers agree with the first
mode's (they must: same grids, same per-question outcomes, same CE).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from dataclasses import replace

import pandas as pd
import ray

from hsae.external import ExternalSource, load_external
from hsae.profiles import get_profile
from hsae.server import ActivationServer


def evaluate_all(server: ActivationServer, saes: list, at_once: int) -> tuple[float, list]:
    """Seconds to evaluate every SAE with ``at_once`` threads calling ``evaluate``; the results in order."""
    out: list = [None] * len(saes)
    todo = list(range(len(saes)))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            out[i] = server.evaluate(*saes[i])

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(at_once)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, out


def comparable(result: dict) -> str:
    """Everything an evaluation reports but its timings."""
    unlearning = {k: v for k, v in result["unlearning"].items() if k != "eval_s"}
    return json.dumps({"unlearning": unlearning, "ce": result["ce"]}, sort_keys=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results")
    p.add_argument("--variants", default="relu,static_hier")
    p.add_argument("--evaluators", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server (a sweep's: 1 on a CPU)")
    args = p.parse_args()
    ray.init("local", num_cpus=1, include_dashboard=False)  # the server's ray.put needs a local Ray
    trials = pd.read_parquet(f"{args.results}/trials.parquet")
    profile = get_profile("embedded")
    eval_cfg, bank_cfg = profile.eval, profile.bank
    saes = []
    for variant in args.variants.split(","):
        done = trials[(trials["status"] == "completed") & (trials["seed"] == 42)]
        row = done[done["variant"] == variant].iloc[0]
        saes.append(load_external(ExternalSource(f"{args.results}/{row['sae_path']}", "folder")).weights())
    modes = [("every setting re-runs its prompts, 1 evaluator", False, 1),
             ("answers shared between alike edits, 1 evaluator", True, 1),
             (f"answers shared between alike edits, {args.evaluators} evaluators", True, args.evaluators)]
    first = None
    for name, share, n in modes:
        server = ActivationServer(profile.harvest, eval_cfg=replace(eval_cfg, share_answers=share),
                                  bank_cfg=bank_cfg, evaluators=n, threads=args.threads)
        server.controls()  # the one-off work (bank, residuals, controls, evaluator copies): not timed
        seconds, answers = evaluate_all(server, saes, n)
        numbers = [comparable(a) for a in answers]
        first = first or (seconds, numbers)
        print(f"{name:<52} {seconds:7.1f} s for {len(saes)} SAEs ({seconds / len(saes):5.1f} s each, "
              f"{first[0] / seconds:4.2f}x the first), numbers identical to the first: {numbers == first[1]}",
              flush=True)


if __name__ == "__main__":
    main()
