"""How many trials at once, with how many threads each, on the cores in front of you.

    python bench/concurrency.py [--seconds 40] [--variant relu,contrastive_hier] [--precision auto]
    python bench/concurrency.py --layouts 1x2,2x1,3x1 --eval-share 0.25

Each layout ``TxH`` runs T worker processes at once, each training the main job's SAE shape (640 -> 1,280,
batch 1,024, the precision the machine chooses) with H torch threads, for ``--seconds`` after a warm-up. A
trial of the main job also waits while the activation server evaluates its SAE (``--eval-share`` of its
life, as measured in a main job's breakdown; the server then uses the cores itself), so a layout's throughput is
counted as trial-steps per second of the whole machine, and the ratio to the best layout is printed.
The sweep's default (``hsae.machine.default_layout``) follows the winner's rule; run this on a quiet machine.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

import torch

from hsae.config import SAEConfig, TrainConfig
from hsae.machine import machine_cores, resolve_precision
from hsae.synthetic import sparse_dictionary_data
from hsae.train import ArrayBatches, Trainer

D_IN, D_SAE, BATCH = 640, 1280, 1024


def worker(variant: str, threads: int, seconds: float, autocast: str, start: mp.Event, out: mp.Queue) -> None:
    torch.set_num_threads(threads)
    data = sparse_dictionary_data(n_tokens=BATCH * 4, d=D_IN, n_atoms=D_SAE, seed=0)
    cfg = SAEConfig(variant, D_IN, D_SAE)
    trainer = Trainer(cfg, TrainConfig(steps=10**6, batch_size=BATCH, lr=1e-3, autocast=autocast, log_every=10**6))
    batches = ArrayBatches(data.x, data.labels, BATCH, seed=0)
    trainer._initialise_from(batches.batch_at(0))
    for step in range(3):  # warm-up: allocator, autocast caches
        trainer._train_step(batches.batch_at(step))
    start.wait()
    t0, steps = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        trainer._train_step(batches.batch_at(steps))
        steps += 1
    out.put(steps / (time.perf_counter() - t0))


def run_layout(variant: str, trials: int, threads: int, seconds: float, autocast: str) -> float:
    """Summed steps/s of ``trials`` processes with ``threads`` threads each, started together."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(variant, threads, seconds, autocast, start, out)) for _ in range(trials)]
    for p in procs:
        p.start()
    time.sleep(8.0)  # every worker warmed up and waiting
    start.set()
    rates = [out.get(timeout=seconds + 600) for _ in procs]
    for p in procs:
        p.join()
    return sum(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", default="1x2,2x1,3x1")
    p.add_argument("--variant", default="relu,contrastive_hier")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--precision", default="auto")
    p.add_argument("--eval-share", type=float, default=0.25,
                   help="share of a trial's life spent waiting for its evaluation (the server computes then)")
    args = p.parse_args()
    choice = resolve_precision(args.precision, torch.device("cpu"), D_IN, D_SAE, threads=1)
    print(f"cores {machine_cores()}; precision {choice.reason}")
    cores = machine_cores()
    for variant in args.variant.split(","):
        rates = {}
        for layout in args.layouts.split(","):
            trials, threads = (int(v) for v in layout.split("x"))
            rates[layout] = run_layout(variant, trials, threads, args.seconds, choice.autocast)
        # While a trial waits for its evaluation its thread is idle unless more trials than cores run; with
        # T trials on C cores, the training that evaluation waits leave undone is that share of min(T, C).
        best = max(rates.values())
        for layout, rate in rates.items():
            trials, threads = (int(v) for v in layout.split("x"))
            busy = min(1.0, trials * (1 - args.eval_share) * threads / cores)
            print(f"{variant:<18} {layout:>4}: {rate:6.2f} steps/s training alone ({rate / best:.2f} of best); "
                  f"cores busy while evaluations wait ~{busy:.0%}")


if __name__ == "__main__":
    main()
