"""The real shapes on one GPU: the SAE training step at Gemma-2-2B's width and the harvest to layer 19.

    PYTHONPATH=. python3 bench/gpu_real_shapes.py --out $OUT/gpu.json     # on the GPU: about a minute
    PYTHONPATH=. python3 bench/gpu_real_shapes.py --smoke --out /tmp/g.json  # tiny shapes, any CPU
    ... --profile   # also: the top ops of one step of each variant (torch.profiler), in the JSON

Needs torch, transformers, safetensors and numpy only (no Ray, no hub access). It measures, in one run:

- the device's bfloat16 matrix rate: one large square GEMM, timed alone;
- (a) the training step of relu, fixed_ortho, static_hier and contrastive_hier at 2,304 -> 16,384,
  batch 4,096, under bf16 autocast (the loss, backward, gradient clipping, AdamW and the variant's
  end-of-step hook: decoder renormalisation, regrouping), as a ratio to the five GEMMs of the step
  (x W_enc, f W_dec and the three of their backward) each timed alone in bf16. Twice: at
  initialisation (about half the latents fire) and with the encoder bias set so that about 64 fire
  per token, as in a trained SAE;
- (b) the harvest of a Gemma-2-2B-shaped model with random weights, built from its config (hidden
  2304, intermediate 9216, 26 layers, 8 heads, 4 KV heads, head_dim 256, vocab 256000), in bfloat16,
  stopped after block 19 by ``hsae.models.stopped_forward``, in tokens/s against the FLOP floor:
  2 x the parameters of blocks 0-19 per token (the embedding is a lookup, not a matmul) at the
  matrix rate measured above.

CUDA events time every part (warm-up first, the median of several repeats). It writes a JSON of the
results to ``--out`` (default ``$OUT/gpu_real_shapes.json``) and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hsae.config import SAEConfig
from hsae.models import LoadedModel, ModelInfo, stopped_forward
from hsae.variants import StepInput, build_sae

VARIANTS = ("relu", "fixed_ortho", "static_hier", "contrastive_hier")
GEMMA_2_2B = dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=256, vocab_size=256000)
FULL = dict(d=2304, n=16384, batch=4096, l0=64, gemm=8192, model=GEMMA_2_2B, layer=19,
            harvest=((128, 128), (16, 1024)), warmup=3, repeats=10)
SMOKE = dict(d=64, n=256, batch=256, l0=8, gemm=256,
             model=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=32, vocab_size=512),
             layer=2, harvest=((4, 16),), warmup=1, repeats=2)


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn`` after ``warmup`` calls: CUDA events on a GPU, the wall clock elsewhere."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def matmul_tflops(size: int, device: torch.device, shape: dict) -> float:
    """The device's bf16 rate on one square GEMM of side ``size``, in TFLOP/s."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    ms = median_ms(lambda: a @ b, device, shape["warmup"], shape["repeats"] * 2)
    return 2 * size**3 / (ms * 1e-3) / 1e12


def floor_ms(d: int, n: int, batch: int, device: torch.device, shape: dict) -> dict[str, float]:
    """The five dense GEMMs of one SAE step in bf16, each timed on its own, and their sum."""
    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, device=device, dtype=torch.bfloat16)

    x, g_out, w_enc, w_dec, f, g_pre = rand(batch, d), rand(batch, d), rand(d, n), rand(n, d), rand(batch, n), \
        rand(batch, n)
    gemms = {
        "encoder": lambda: x @ w_enc,
        "decoder": lambda: f @ w_dec,
        "grad_f": lambda: g_out @ w_dec.T,
        "grad_w_dec": lambda: f.T @ g_out,
        "grad_w_enc": lambda: x.T @ g_pre,
    }
    times = {name: median_ms(fn, device, shape["warmup"], shape["repeats"]) for name, fn in gemms.items()}
    return {**times, "total": sum(times.values())}


@torch.no_grad()
def set_active_latents(sae: torch.nn.Module, x: torch.Tensor, l0: float) -> None:
    """Shift each latent's encoder bias so it fires on a fraction l0 / n of the tokens of ``x``."""
    pre = sae.pre_activation(x).float()
    rank = max(1, min(len(pre), round((1.0 - l0 / pre.shape[1]) * len(pre))))
    sae.b_enc.sub_(pre.kthvalue(rank, dim=0).values)  # torch.quantile refuses inputs over 2^24 elements


def make_step(variant: str, d: int, n: int, x: torch.Tensor, labels: torch.Tensor, l0: float,
              device: torch.device) -> tuple[Callable[[], None], dict]:
    """One training step (loss under bf16 autocast, backward, clip, AdamW, end-of-step hook) and its state."""
    sae = build_sae(SAEConfig(variant, d, n), generator=torch.Generator().manual_seed(0)).to(device)
    if l0:
        set_active_latents(sae, x, l0)
    opt = torch.optim.AdamW(sae.parameters(), lr=1e-4, weight_decay=0.0)
    state = {"step": 0, "l0": torch.zeros(())}

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = sae.loss(StepInput(x, labels, state["step"]))
        opt.zero_grad(set_to_none=True)
        out.total.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        state["step"] += 1
        sae.on_step_end(state["step"], out.f.detach())
        state["l0"] = out.f.detach().ne(0).sum(-1).float().mean()

    return step, state


def training_step(variant: str, d: int, n: int, x: torch.Tensor, labels: torch.Tensor, l0: float,
                  device: torch.device, shape: dict) -> dict[str, float]:
    """Median ms of one step and its L0."""
    step, state = make_step(variant, d, n, x, labels, l0, device)
    ms = median_ms(step, device, shape["warmup"], shape["repeats"])
    return {"step_ms": ms, "l0": float(state["l0"])}


def step_profile(variant: str, d: int, n: int, x: torch.Tensor, labels: torch.Tensor, l0: float,
                 device: torch.device, top: int = 12) -> list[dict]:
    """Where one step's time goes: torch.profiler over 3 steps, the ``top`` entries by self device time
    (kernels and the ops that launch them are separate entries: do not sum them)."""
    from torch.profiler import ProfilerActivity, profile

    step, _ = make_step(variant, d, n, x, labels, l0, device)
    for _ in range(3):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    events = prof.key_averages()
    device_us = [(e.key, getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0),
                  e.self_cpu_time_total, e.count) for e in events]
    device_us.sort(key=lambda r: -(r[1] or r[2]))
    return [{"op": k, "device_ms_per_step": dev / 3e3, "cpu_ms_per_step": cpu / 3e3,
                      "calls_per_step": c / 3} for k, dev, cpu, c in device_us[:top]]


def training_table(device: torch.device, shape: dict, profiled: bool = False) -> dict:
    d, n, batch = shape["d"], shape["n"], shape["batch"]
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, d, device=device, generator=gen)
    labels = torch.randint(0, 2, (batch,), device=device, generator=gen)
    floor = floor_ms(d, n, batch, device, shape)
    rows = []
    for l0 in (0, shape["l0"]):
        for variant in VARIANTS:
            row = {"variant": variant, "state": f"L0~{l0}" if l0 else "init",
                   **training_step(variant, d, n, x, labels, l0, device, shape)}
            row["floor_x"] = row["step_ms"] / floor["total"]
            rows.append(row)
            print(f"  {variant:18s} {row['state']:8s} L0 {row['l0']:7.0f}  step {row['step_ms']:8.2f} ms  "
                  f"{row['floor_x']:5.2f}x floor", flush=True)
    for row in rows:
        relu = next(r for r in rows if r["variant"] == "relu" and r["state"] == row["state"])
        row["relu_x"] = row["step_ms"] / relu["step_ms"]
    table = {"d_in": d, "d_sae": n, "batch": batch, "autocast": "bf16", "floor_ms": floor, "rows": rows}
    if profiled:
        table["profile"] = {v: step_profile(v, d, n, x, labels, shape["l0"], device) for v in VARIANTS}
        for variant, ops in table["profile"].items():
            print(f"  profile {variant} (device ms / host ms per step):")
            for o in ops[:9]:
                print(f"    {o['op'][:70]:70s} {o['device_ms_per_step']:7.2f} {o['cpu_ms_per_step']:7.2f}")
    return table


def random_gemma(model_sizes: dict, device: torch.device) -> torch.nn.Module:
    """A Gemma-2 causal LM with these sizes and random weights, built in bfloat16 on ``device``."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(**model_sizes)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Gemma2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype=torch.bfloat16).eval().requires_grad_(False)


def harvest_table(device: torch.device, shape: dict, tflops: float) -> dict:
    model_sizes, layer = shape["model"], shape["layer"]
    t0 = time.perf_counter()
    model = random_gemma(model_sizes, device)
    build_s = time.perf_counter() - t0
    blocks = model.model.layers[: layer + 1]
    block_params = sum(p.numel() for p in blocks.parameters())
    info = ModelInfo(source="random Gemma-2-2B config", family="gemma2", layer=layer,
                     d_model=model_sizes["hidden_size"], n_layers=model_sizes["num_hidden_layers"],
                     bos_id=2, eos_id=1, dtype="bfloat16", identity={})
    loaded = LoadedModel(model, None, info, device)
    floor_tokens_per_s = tflops * 1e12 / (2 * block_params)
    rows = []
    for contexts, length in shape["harvest"]:
        ids = torch.randint(3, model_sizes["vocab_size"], (contexts, length), device=device)
        ms = median_ms(lambda ids=ids: stopped_forward(loaded, ids), device, shape["warmup"], shape["repeats"])
        tokens_per_s = contexts * length / (ms * 1e-3)
        rows.append({"contexts": contexts, "length": length, "forward_ms": ms, "tokens_per_s": tokens_per_s,
                     "fraction_of_floor": tokens_per_s / floor_tokens_per_s})
        print(f"  {contexts:4d} x {length:5d} tokens: {ms:8.1f} ms, {tokens_per_s:12,.0f} tokens/s = "
              f"{rows[-1]['fraction_of_floor']:.2f} of the floor", flush=True)
    attention = getattr(model.config, "_attn_implementation", None)
    return {"config": model_sizes, "layer": layer, "block_params_0_to_layer": block_params,
            "total_params": sum(p.numel() for p in model.parameters()), "build_s": build_s,
            "attention": attention, "floor_tokens_per_s": floor_tokens_per_s, "rows": rows}


def default_out() -> Path:
    return Path(os.environ.get("OUT", ".")) / "gpu_real_shapes.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default $OUT/gpu_real_shapes.json)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script on any CPU")
    ap.add_argument("--profile", action="store_true", help="also profile one step of each variant (top ops)")
    args = ap.parse_args()
    shape = SMOKE if args.smoke else FULL
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    started = time.perf_counter()
    result: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
                    "torch": torch.__version__, "smoke": args.smoke}
    tflops = matmul_tflops(shape["gemm"], device, shape)
    result["bf16_matmul_tflops"] = tflops
    print(f"device {result['device']}, torch {torch.__version__}: bf16 GEMM {shape['gemm']}^3 at {tflops:.0f} TFLOP/s")
    print(f"(a) training step {shape['d']} -> {shape['n']}, batch {shape['batch']}, bf16 autocast:", flush=True)
    result["training"] = training_table(device, shape, args.profile)
    torch.cuda.empty_cache() if device.type == "cuda" else None
    print(f"(b) harvest to layer {shape['layer']}, bf16, random weights:", flush=True)
    result["harvest"] = harvest_table(device, shape, tflops)
    result["wall_s"] = time.perf_counter() - started
    out = args.out or default_out()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
