"""Re-running only the layers after L from a cached layer-L residual, and scoring answer tokens only.

The model's own forward runs with its block list (and, for models that mix attention kinds, its
``layer_types``) temporarily cut to the blocks after L and the residual passed as ``inputs_embeds``:
the model still builds its masks and rotary embeddings itself, so nothing model-specific is copied.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from hsae.models import LoadedModel, decoder_layers


@contextmanager
def _only_layers_after(loaded: LoadedModel, layer: int) -> Iterator[Any]:
    inner = loaded.model.model
    config = inner.config
    all_layers = decoder_layers(loaded.model)
    layer_types = getattr(config, "layer_types", None)
    inner.layers = nn.ModuleList(list(all_layers)[layer + 1 :])
    if layer_types is not None:
        config.layer_types = list(layer_types)[layer + 1 :]
    try:
        yield inner
    finally:
        inner.layers = all_layers
        if layer_types is not None:
            config.layer_types = layer_types


@torch.no_grad()
def tail_hidden(loaded: LoadedModel, resid: torch.Tensor, layer: int | None = None) -> torch.Tensor:
    """Final (normed) hidden states from the layer-L residual ``resid`` (B, T, d); right padding only."""
    layer = loaded.layer if layer is None else layer
    dtype = next(loaded.model.parameters()).dtype
    with _only_layers_after(loaded, layer) as inner:
        out = inner(inputs_embeds=resid.to(loaded.device, dtype), use_cache=False)
    return out.last_hidden_state


def unembedding(loaded: LoadedModel) -> torch.Tensor:
    return loaded.model.get_output_embeddings().weight


@torch.no_grad()
def token_logits(loaded: LoadedModel, hidden: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Logits of chosen tokens only: hidden (N, d) x token_ids (N, K) -> (N, K).

    Softcapping (Gemma-2) is monotone, so comparing options needs no full-vocabulary logits.
    """
    w = unembedding(loaded)[token_ids.to(loaded.device)]  # (N, K, d)
    logits = torch.einsum("nd,nkd->nk", hidden.to(w.dtype), w).float()
    cap = getattr(loaded.model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@torch.no_grad()
def full_log_probs(loaded: LoadedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the whole vocabulary for hidden states (N, d) (CE and KL need the normaliser)."""
    logits = (hidden.to(unembedding(loaded).dtype) @ unembedding(loaded).T).float()
    cap = getattr(loaded.model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.log_softmax(logits, dim=-1)
