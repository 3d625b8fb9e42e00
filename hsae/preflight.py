"""The sweep's sizes, worked out before any weights load, and the limits they must fit.

Every number comes from its source: the model's width and parameter count from its config (built on
PyTorch's meta device, so nothing is allocated), each SAE's parameters from the variant itself (also on
the meta device), the token counts from the profile, the free space from the file system.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hsae.external import WEIGHTS_FILE as EXTERNAL_WEIGHTS
from hsae.external import is_external

GiB = 1024**3
# Adam keeps two moments per parameter; with the parameter and its gradient that is 4 copies.
ADAM_COPIES = 4
# Live (batch, d_sae) float tensors of one SAE step: pre-activations, codes, their gradients, and masks.
STEP_SAE_TENSORS = 6


class PlanDoesNotFit(ValueError):
    """A size exceeds its limit; the message names the number, the limit and the option that changes it."""


@dataclass(frozen=True)
class Sizes:
    cache_bytes: int  # activation cache on disk (train + eval rows, float32)
    object_store_bytes: int  # the same arrays, put once into the object store
    model_bytes: int  # the language model's weights in its dtype
    trial_bytes: dict[str, int] = field(default_factory=dict)  # per variant: SAE + optimizer + one step
    train_tokens: int = 0  # distinct training rows harvested
    eval_tokens: int = 0
    tokens_per_trial: int = 0  # steps x batch size (rows drawn, with repeats)


def model_parameters(config: Any) -> int:
    """Parameter count of the model ``config`` describes, from a meta-device build (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def sae_parameters(variant: str, d_in: int, d_sae: int, params: dict[str, Any]) -> int:
    from hsae.config import SAEConfig
    from hsae.variants import build_sae

    with torch.device("meta"):
        sae = build_sae(SAEConfig(variant, d_in, d_sae, params))
    return sum(p.numel() for p in sae.parameters()) + sum(b.numel() for b in sae.buffers())


def trial_bytes(n_params: int, batch_size: int, d_in: int, d_sae: int) -> int:
    """SAE parameters with gradient and Adam moments (fp32), plus one step's batch-sized tensors."""
    return 4 * (ADAM_COPIES * n_params + batch_size * (2 * d_in + STEP_SAE_TENSORS * d_sae))


def dtype_bytes(dtype: str) -> int:
    return torch.empty(0, dtype=getattr(torch, dtype)).element_size()


def free_disk_bytes(path: str | Path) -> int:
    """Free bytes on the file system that holds ``path`` (its nearest existing parent)."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def size_text(n_bytes: int) -> str:
    return f"{n_bytes / GiB:.2f} GiB" if n_bytes >= GiB else f"{n_bytes / 2**20:.1f} MiB"


def check_fits(what: str, need: int, limit: int, where: str, option: str) -> None:
    if need > limit:
        raise PlanDoesNotFit(f"{what} needs {size_text(need)} but {where} has {size_text(limit)}: {option}")


def describe_sizes(sizes: Sizes) -> list[str]:
    lines = [f"activation cache   {sizes.cache_bytes / GiB:8.2f} GiB on disk ({sizes.train_tokens:,} train + "
             f"{sizes.eval_tokens:,} held-out tokens, float32)",
             f"object store       {sizes.object_store_bytes / GiB:8.2f} GiB (every shard put once)",
             f"language model     {sizes.model_bytes / GiB:8.2f} GiB of weights",
             f"tokens per trial   {sizes.tokens_per_trial:,} ({sizes.tokens_per_trial / max(sizes.train_tokens, 1):.1f}"
             f" passes over the harvest)"]
    lines += [f"trial {variant:<18} {b / GiB:8.3f} GiB (SAE + Adam + one step)"
              for variant, b in sizes.trial_bytes.items()]
    return lines


def plan_sizes(profile: Any, model: Any, model_config: Any, trials: list[Any]) -> Sizes:
    """The sizes of a sweep of ``trials`` (TrialSpecs) under ``profile`` on ``model`` (a ModelInfo)."""
    train_tokens = profile.cache_rows()
    eval_tokens = profile.harvest.n_eval_ctxs * (profile.harvest.ctx_len - 1)
    cache = 4 * model.d_model * (train_tokens + eval_tokens)
    store = cache
    if profile.activations == "stream":  # only the held-out rows go to disk; the window bounds the rest
        cache = 4 * model.d_model * eval_tokens
        window_rows = profile.stream.window_blocks * profile.stream.block_contexts * (profile.harvest.ctx_len - 1)
        store = cache + 4 * model.d_model * window_rows
    per_variant: dict[str, int] = {}
    for t in trials:
        if is_external(t.variant):  # loaded, not trained: its weights alone
            b = (Path(t.params["path"]) / EXTERNAL_WEIGHTS).stat().st_size
            per_variant[t.variant] = max(per_variant.get(t.variant, 0), b)
            continue
        n = sae_parameters(t.variant, model.d_model, profile.d_sae, t.params)
        b = trial_bytes(n, profile.train.batch_size, model.d_model, profile.d_sae)
        per_variant[t.variant] = max(per_variant.get(t.variant, 0), b)
    return Sizes(cache_bytes=cache, object_store_bytes=store,
                 model_bytes=model_parameters(model_config) * dtype_bytes(model.dtype),
                 trial_bytes=per_variant, train_tokens=train_tokens, eval_tokens=eval_tokens,
                 tokens_per_trial=profile.train.steps * profile.train.batch_size)


def check_plan(sizes: Sizes, cache_dir: Path, cache_complete: bool, concurrent: int, gpus_per_trial: float) -> None:
    """Refuse a plan that cannot fit this machine: disk for the cache, memory for the model and the trials."""
    if not cache_complete:
        check_fits("the activation cache", sizes.cache_bytes, free_disk_bytes(cache_dir), f"{cache_dir} (free)",
                   "lower --n-ctxs (or --set harvest.n_eval_ctxs=...), or point --cache at a larger disk")
    check_fits("the language model", sizes.model_bytes, host_memory_bytes(), "this machine's memory",
               "run on a machine with more memory or pick a smaller --model")
    largest = max(sizes.trial_bytes.values(), default=0)
    if gpus_per_trial > 0 and torch.cuda.is_available():
        gpu = int(torch.cuda.get_device_properties(0).total_memory * gpus_per_trial)
        check_fits("one trial", largest, gpu, f"a {gpus_per_trial} share of this GPU",
                   "raise --gpus-per-trial, lower --d-sae or --set train.batch_size=...")
    elif gpus_per_trial == 0:
        check_fits(f"{concurrent} concurrent trials", largest * concurrent, host_memory_bytes(),
                   "this machine's memory", "lower --max-concurrent, --d-sae or --set train.batch_size=...")
