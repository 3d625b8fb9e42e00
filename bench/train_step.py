"""Training-step cost of every variant against the floor, a plain PyTorch SAE and SAELens.

    python bench/train_step.py [--steps 5] [--sizes 640x640,640x5120,2304x2304] [--threads 1]
    python bench/train_step.py --embedded [--autocast bf16]   # the main job's shape: 640x1280, batch 1024
    python bench/train_step.py --together [--embedded]        # each variant alone vs all of them on one stream

For each (variant, d, n) at batch 2048 (``--batch``), fp32 on the CPU (``--autocast bf16``: the Trainer's
bfloat16 autocast, and the floor's GEMMs in bfloat16), it prints the time of one training step of
our Trainer loop (loss, backward, clipping, AdamW, decoder renormalisation, regrouping) and the floor:
the same step's dense matmuls alone (encoder forward, decoder forward, and their backward: 5 GEMMs),
timed in the same run, and the step as a multiple of relu's at the same size. ``--l0 L`` first sets each
SAE's encoder bias so that about L latents fire per token, as in a trained SAE (at initialisation about
half of them fire, which no trained SAE does; costs that scale with the active latents show only then).
``--together``: the same variants trained alone and then together (``hsae.train.train_together``: each batch
fetched once for all of them), each SAE's own seconds per step from its own clock (its steps, logs and its share
of the fetch) against the floor. Then our `relu` step against an independent plain-PyTorch SAE step written
here as simply as possible, and against SAELens' own training step for its standard SAE when
`sae-lens` is installed (`pip install -e ".[bench]"`). Ratios, not absolute times, are the result:
this machine is noisy.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hsae.config import SAEConfig, TrainConfig
from hsae.synthetic import sparse_dictionary_data
from hsae.train import ArrayBatches, Trainer, train_together
from hsae.variants import VARIANTS

BATCH = 2048


def timed(fn, reps: int, warmup: int = 1) -> float:
    """Median seconds of ``fn`` over ``reps`` runs (after ``warmup``)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def floor_seconds(d: int, n: int, reps: int, batch: int = BATCH, dtype: torch.dtype = torch.float32) -> float:
    """The five dense GEMMs of one SAE step, each timed on its own."""
    x, g_out = torch.randn(batch, d, dtype=dtype), torch.randn(batch, d, dtype=dtype)
    w_enc, w_dec = torch.randn(d, n, dtype=dtype), torch.randn(n, d, dtype=dtype)
    f, g_pre = torch.randn(batch, n, dtype=dtype), torch.randn(batch, n, dtype=dtype)
    gemms = [
        lambda: x @ w_enc,  # encoder forward
        lambda: f @ w_dec,  # decoder forward
        lambda: g_out @ w_dec.T,  # decoder backward: grad wrt f
        lambda: f.T @ g_out,  # decoder backward: grad wrt W_dec
        lambda: x.T @ g_pre,  # encoder backward: grad wrt W_enc (x needs no grad)
    ]
    return sum(timed(g, reps) for g in gemms)


def bench_params(variant: str, n: int) -> dict:
    return {"topk": {"k": 64}, "matryoshka_batchtopk": {"k": 64}}.get(variant, {})


WARM = 2  # logged steps before the timed ones


def timed_trainer(variant: str, d: int, n: int, source: ArrayBatches, steps: int, batch: int, autocast: str,
                  l0: float, records: list) -> Trainer:
    """A Trainer of ``WARM + steps`` steps that logs every step into ``records`` (with ``l0``: its encoder bias
    first set so that about that many latents fire)."""
    trainer = Trainer(SAEConfig(variant, d, n, bench_params(variant, n)),
                      TrainConfig(steps=WARM + steps, batch_size=batch, log_every=1, autocast=autocast),
                      on_progress=lambda p: records.append(p.record))
    if l0:
        trainer._initialise_from(source.batch_at(0))
        trainer.set_active_latents(source.batch_at(0).x, l0)
    return trainer


def seconds_per_step(records: list, steps: int) -> float:
    """The timed steps' mean seconds from the trainer's own clock (its steps, logs and share of each fetch)."""
    return (records[-1]["wall_s"] - records[WARM - 1]["wall_s"]) / steps


def our_step_seconds(variant: str, d: int, n: int, data, steps: int, batch: int = BATCH,
                     autocast: str = "none", l0: float = 0.0) -> tuple[float, float]:
    """Seconds per step of the real Trainer loop, from its own step clock (evaluation excluded), and the
    mean L0 of the timed steps."""
    records: list = []
    source = ArrayBatches(data.x, data.labels, batch, 0)
    timed_trainer(variant, d, n, source, steps, batch, autocast, l0, records).fit(source, guard=False)
    return seconds_per_step(records, steps), statistics.mean(r["l0"] for r in records[WARM:])


def together_step_seconds(variants: list[str], d: int, n: int, data, steps: int, batch: int = BATCH,
                          autocast: str = "none", l0: float = 0.0) -> dict[str, float]:
    """Per variant, seconds per step of its own work when every variant trains together on one source
    (``train_together``), as ``our_step_seconds`` times one alone."""
    records: dict[str, list] = {v: [] for v in variants}
    source = ArrayBatches(data.x, data.labels, batch, 0)
    trainers = [timed_trainer(v, d, n, source, steps, batch, autocast, l0, records[v]) for v in variants]
    train_together(trainers, source, guard=False)
    return {v: seconds_per_step(r, steps) for v, r in records.items()}


def together_table(sizes: list[tuple[int, int]], variants: list[str], args: argparse.Namespace) -> None:
    """Each variant's step alone and trained together with the others, both against the five-GEMM floor."""
    dtype = torch.bfloat16 if args.autocast == "bf16" else torch.float32
    print(f"alone vs together ({len(variants)} SAEs on one stream); batch {args.batch}, autocast {args.autocast}, "
          f"{args.threads} thread(s), mean of {args.steps} steps")
    print(f"{'variant':22s} {'d':>5s} {'n':>5s} {'alone_ms':>8s} {'togeth_ms':>9s} {'floor_ms':>8s} "
          f"{'alone_x':>7s} {'togeth_x':>8s} {'ratio':>6s}")
    for d, n in sizes:
        data = sparse_dictionary_data(args.batch * 4, d=d, n_atoms=4 * d, seed=0)
        floor = floor_seconds(d, n, args.steps, args.batch, dtype)
        alone = {v: our_step_seconds(v, d, n, data, args.steps, args.batch, args.autocast, args.l0)[0]
                 for v in variants}
        together = together_step_seconds(variants, d, n, data, args.steps, args.batch, args.autocast, args.l0)
        rows = [(v, alone[v], together[v], floor) for v in variants]
        rows.append(("(all, summed)", sum(alone.values()), sum(together.values()), floor * len(variants)))
        for label, a, t, f in rows:
            print(f"{label:22s} {d:5d} {n:5d} {a * 1e3:8.1f} {t * 1e3:9.1f} {f * 1e3:8.1f} {a / f:7.2f} "
                  f"{t / f:8.2f} {t / a:6.2f}", flush=True)


def plain_step_seconds(d: int, n: int, data, steps: int) -> float:
    """The simplest SAE step: ReLU encoder, linear decoder, MSE + L1, AdamW."""
    x = torch.as_tensor(data.x[:BATCH])
    w_enc = torch.nn.Parameter(torch.randn(d, n) * 0.01)
    b_enc = torch.nn.Parameter(torch.zeros(n))
    w_dec = torch.nn.Parameter(torch.randn(n, d) * 0.01)
    b_dec = torch.nn.Parameter(torch.zeros(d))
    opt = torch.optim.AdamW([w_enc, b_enc, w_dec, b_dec], lr=3e-4, weight_decay=0.01)

    def step() -> None:
        f = torch.relu(x @ w_enc + b_enc)
        loss = (f @ w_dec + b_dec - x).pow(2).mean() + 1e-3 * f.abs().sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return timed(step, steps, warmup=2)


def saelens_step_seconds(d: int, n: int, data, steps: int) -> float | None:
    """SAELens' training step for its standard SAE, as its SAETrainer._train_step runs it: the SAE's own
    training_forward_pass, the firing statistics, backward, grad clipping 1.0, Adam, zero_grad."""
    try:
        from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig
        from sae_lens.saes.sae import TrainStepInput
    except ImportError:
        return None
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d, d_sae=n, l1_coefficient=1e-3, device="cpu"))
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4)
    x = torch.as_tensor(data.x[:BATCH])
    since_fired = torch.zeros(n)
    act_freq = torch.zeros(n)

    def step() -> None:
        sae.train()
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={"l1": 1e-3}, dead_neuron_mask=None,
                                                       n_training_steps=0, is_logging_step=False))
        with torch.no_grad():
            firing = out.feature_acts.bool().float()
            did_fire = firing.sum(-2).bool()
            since_fired.add_(1)
            since_fired[did_fire] = 0
            act_freq.add_(firing.sum(0))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    return timed(step, steps, warmup=2)


def compile_ratio(variant: str, d: int, n: int, data, steps: int) -> tuple[float, float, float]:
    """Eager vs torch.compile'd loss in the Trainer's step (compile time reported separately)."""
    from hsae.variants import StepInput, build_sae

    x = torch.as_tensor(data.x[:BATCH])
    labels = torch.as_tensor(data.labels[:BATCH])

    def make(compiled: bool):
        sae = build_sae(SAEConfig(variant, d, n, bench_params(variant, n)))
        opt = torch.optim.AdamW(sae.parameters(), lr=3e-4, weight_decay=0.01)
        loss_fn = torch.compile(sae.loss) if compiled else sae.loss

        def step() -> None:
            out = loss_fn(StepInput(x, labels, 1))
            opt.zero_grad(set_to_none=True)
            out.total.backward()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
            opt.step()
            sae.on_step_end(1, out.f.detach())

        return step

    eager = timed(make(False), steps, warmup=2)
    compiled_step = make(True)
    t0 = time.perf_counter()
    compiled_step()
    compile_s = time.perf_counter() - t0
    return eager, timed(compiled_step, steps, warmup=1), compile_s


def step_table(sizes: list[tuple[int, int]], variants: list[str], args: argparse.Namespace) -> None:
    """Each variant's step against the five-GEMM floor and against relu's step at the same size."""
    dtype = torch.bfloat16 if args.autocast == "bf16" else torch.float32
    print(f"batch {args.batch}, autocast {args.autocast}, CPU, {args.threads} thread(s), median/mean of "
          f"{args.steps} steps" + (f", encoder bias set for L0 ~ {args.l0:g}" if args.l0 else ""))
    print(f"{'variant':22s} {'d':>5s} {'n':>5s} {'L0':>6s} {'step_ms':>8s} {'floor_ms':>8s} {'floor_x':>7s} "
          f"{'relu_x':>6s}")
    for d, n in sizes:
        data = sparse_dictionary_data(args.batch * 4, d=d, n_atoms=4 * d, seed=0)
        floor = floor_seconds(d, n, args.steps, args.batch, dtype)
        relu = None
        for variant in (["relu"] if "relu" not in variants else []) + variants:
            ours, l0 = our_step_seconds(variant, d, n, data, args.steps, args.batch, args.autocast, args.l0)
            relu = ours if variant == "relu" else relu
            print(f"{variant:22s} {d:5d} {n:5d} {l0:6.0f} {ours * 1e3:8.1f} {floor * 1e3:8.1f} {ours / floor:7.2f} "
                  f"{ours / relu:6.2f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--sizes", default="640x640,640x5120,2304x2304")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--autocast", choices=("none", "bf16"), default="none")
    ap.add_argument("--l0", type=float, default=0.0, help="set each SAE's encoder bias for about this L0 first")
    ap.add_argument("--embedded", action="store_true",
                    help="the main job's shape only (640x1280, batch 1024, L0 ~ 50); no comparison to other SAEs")
    ap.add_argument("--compile", action="store_true", help="only measure torch.compile of the loss vs eager")
    ap.add_argument("--together", action="store_true", help="each variant alone vs all of them on one stream")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.embedded:
        args.sizes, args.batch, args.l0 = "640x1280", 1024, args.l0 or 50.0
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    if args.compile:
        print(f"{'variant':22s} {'d':>5s} {'n':>5s} {'eager_ms':>8s} {'compiled':>8s} {'ratio':>6s} {'compile_s':>9s}")
        for d, n in sizes:
            data = sparse_dictionary_data(BATCH * 4, d=d, n_atoms=4 * d, seed=0)
            for variant in args.variants.split(","):
                eager, comp, compile_s = compile_ratio(variant, d, n, data, args.steps)
                print(f"{variant:22s} {d:5d} {n:5d} {eager * 1e3:8.1f} {comp * 1e3:8.1f} {comp / eager:6.2f} "
                      f"{compile_s:9.1f}", flush=True)
        return
    if args.together:
        together_table(sizes, args.variants.split(","), args)
        return
    step_table(sizes, args.variants.split(","), args)
    if args.embedded:
        return
    print()
    print(f"{'relu vs':22s} {'d':>5s} {'n':>5s} {'ours_ms':>8s} {'other_ms':>8s} {'ratio':>6s}")
    for d, n in sizes:
        data = sparse_dictionary_data(BATCH * 4, d=d, n_atoms=4 * d, seed=0)
        ours, _ = our_step_seconds("relu", d, n, data, args.steps)
        plain = plain_step_seconds(d, n, data, args.steps)
        print(f"{'plain PyTorch SAE':22s} {d:5d} {n:5d} {ours * 1e3:8.1f} {plain * 1e3:8.1f} {ours / plain:6.2f}")
        lens = saelens_step_seconds(d, n, data, args.steps)
        if lens is None:
            print(f"{'SAELens':22s} {d:5d} {n:5d}  (not installed: pip install -e '.[bench]')")
        else:
            print(f"{'SAELens standard':22s} {d:5d} {n:5d} {ours * 1e3:8.1f} {lens * 1e3:8.1f} {ours / lens:6.2f}")


if __name__ == "__main__":
    main()
