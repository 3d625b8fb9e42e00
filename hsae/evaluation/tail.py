"""Re-running only the layers after L from a cached layer-L residual, and scoring answer tokens only.

The model's own base model runs with its block list (and, for models that mix attention kinds, its
``layer_types``) temporarily cut to [an injector, the blocks after L]: the injector stands in for blocks
0..L and returns the layer-L residual whatever it is passed, so the model still builds its masks and
rotary embeddings itself, and whatever it adds to the input embeddings (GPT-2's learned positions) is
discarded. Found by ``decoder_stack``, for every family, with nothing model-specific copied.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from hsae.models import LoadedModel, decoder_stack


class _Inject(nn.Module):
    """Stands in for blocks 0..L: returns the given residual (decoder blocks return one tensor)."""

    def __init__(self, resid: torch.Tensor) -> None:
        super().__init__()
        self.resid = resid

    def forward(self, *_args: Any, **_kwargs: Any) -> torch.Tensor:
        return self.resid


@contextmanager
def _only_layers_after(loaded: LoadedModel, layer: int, resid: torch.Tensor) -> Iterator[Any]:
    owner, name = decoder_stack(loaded.model)
    config = owner.config  # the config the base model's forward reads
    all_layers = getattr(owner, name)
    layer_types = getattr(config, "layer_types", None)
    setattr(owner, name, nn.ModuleList([_Inject(resid), *list(all_layers)[layer + 1 :]]))
    if layer_types is not None:
        config.layer_types = list(layer_types)[layer:]
    try:
        yield owner
    finally:
        setattr(owner, name, all_layers)
        if layer_types is not None:
            config.layer_types = layer_types


@torch.no_grad()
def tail_hidden(loaded: LoadedModel, resid: torch.Tensor, layer: int | None = None) -> torch.Tensor:
    """Final (normed) hidden states from the layer-L residual ``resid`` (B, T, d); right padding only."""
    layer = loaded.layer if layer is None else layer
    dtype = next(loaded.model.parameters()).dtype
    resid = resid.to(loaded.device, dtype)
    with loaded.lock, _only_layers_after(loaded, layer, resid) as owner:
        out = owner(inputs_embeds=torch.zeros_like(resid), use_cache=False)
    return out.last_hidden_state


@torch.no_grad()
def final_hidden(loaded: LoadedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Final (normed) hidden states of the whole model: its base model's forward, no vocabulary logits."""
    with loaded.lock:
        return loaded.model.base_model(input_ids=input_ids.to(loaded.device), use_cache=False).last_hidden_state


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
