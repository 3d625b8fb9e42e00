"""Saving SAEs: our own format (exact round trip) and the SAELens layout other tools load.

Both fold the training normalisation back into the weights, so a saved SAE takes raw activations:
with x_n = s x, f = ReLU((s x - b_dec) W_enc + b_enc) and x_hat = (f W_dec + b_dec) / s, the folded weights are
W_enc' = s W_enc, W_dec' = W_dec / s, b_dec' = b_dec / s. Feature activations keep the training unit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from hsae.atomic import atomic_dir
from hsae.config import SAEConfig
from hsae.keys import content_key
from hsae.variants import SAE, build_sae

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "hsae_config.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_CONFIG = "cfg.json"


def folded_state(sae: SAE, scale: float) -> dict[str, torch.Tensor]:
    """The SAE's full state with the normalisation scale folded into the raw-activation weights."""
    state = {k: v.detach().cpu().contiguous().clone() for k, v in sae.state_dict().items()}
    state["W_enc"] = state["W_enc"] * scale
    state["W_dec"] = state["W_dec"] / scale
    state["b_dec"] = state["b_dec"] / scale
    return state


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """Content hash of a state dict (names, dtypes, shapes and bytes): the key for any cache of results."""
    return content_key({}, arrays=state, length=None)


def save_sae(sae: SAE, path: str | Path, scale: float = 1.0, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``hsae_config.json`` + ``sae.safetensors`` (folded weights) to the directory ``path``."""
    path = Path(path)
    state = folded_state(sae, scale)
    doc = {"sae_config": sae.cfg.to_dict(), "folded_scale": scale, "digest": weights_digest(state),
           "metadata": metadata or {}}
    with atomic_dir(path) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(doc, indent=2))
    return path


def load_sae(path: str | Path, device: str = "cpu") -> SAE:
    """Load an SAE saved by ``save_sae``; it takes raw (unnormalised) activations."""
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} holds no {CONFIG_FILE}: not an SAE saved by hsae.export.save_sae")
    doc = json.loads(cfg_file.read_text())
    sae = build_sae(SAEConfig.from_dict(doc["sae_config"]))
    sae.load_weights(load_file(str(path / WEIGHTS_FILE), device=device))
    return sae.to(device)


def export_saelens(
    sae: SAE,
    path: str | Path,
    scale: float = 1.0,
    model_name: str = "",
    hook_layer: int = 0,
    dataset_path: str = "",
    context_size: int = 128,
) -> Path:
    """Write ``cfg.json`` + ``sae_weights.safetensors`` in the layout SAELens loads from disk.

    Grouped variants are plain ReLU SAEs at inference (their groups only shape training), so they
    export as ``standard``; TopK as ``topk``; Matryoshka BatchTopK as ``jumprelu`` with its threshold.
    """
    path = Path(path)
    state = folded_state(sae, scale)
    tensors = {name: state[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    tensors.update({k: v.detach().cpu().contiguous() for k, v in sae.extra_export_tensors().items()})
    cfg = {
        "architecture": sae.saelens_architecture,
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "model_name": model_name,
        "hook_name": f"blocks.{hook_layer}.hook_resid_post",
        "hook_layer": hook_layer,
        "hook_head_index": None,
        "activation_fn_str": "topk" if sae.saelens_architecture == "topk" else "relu",
        "activation_fn_kwargs": {},
        "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False,
        "normalize_activations": "none",
        "context_size": context_size,
        "dataset_path": dataset_path,
        "prepend_bos": True,
        "sae_lens_training_version": None,
        "neuronpedia_id": None,
        "metadata": {"hsae_variant": sae.cfg.variant, "hsae_config": sae.cfg.to_dict(), "folded_scale": scale},
    }
    cfg.update(sae.saelens_extra_cfg())
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / SAELENS_WEIGHTS))
        (tmp / SAELENS_CONFIG).write_text(json.dumps(cfg, indent=2))
    return path
