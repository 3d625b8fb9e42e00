"""External arms: SAEs trained elsewhere, in SAELens's layout, judged by the sweep's own evaluation.

An external arm names SAELens-layout folders (``cfg.json`` + ``sae_weights.safetensors``) directly, or
entries of a ``pretrained_saes.yaml`` registry resolved to folders of a local copy. Each folder is one seed
of the arm: the i-th folder is paired with seed 42 + i (the seed of the trained arms' i-th SAE: its metrics
are taken in the unit that seed's trained SAE uses, and the verdict pairs them by seed). SAELens's own
loader (``SAE.load_from_disk``) builds the SAE, so every architecture SAELens 6 saves for inference loads:
``standard``, ``topk``, ``jumprelu`` (also what SAELens saves a ``batchtopk`` SAE as) and ``gated``.

Activation normalisation is read from the config and applied as SAELens applies it: ``none``; or
``expected_average_only_in`` with the registry entry's ``norm_scaling_factor`` folded into the weights
(``fold_activation_norm_scaling_factor``, as ``SAE.from_pretrained`` does). Per-token normalisations
(``constant_norm_rescale``, ``layer_norm``) and whitening are refused: the unlearning clamp edits raw
activations along the raw-space decoder, which a per-token rescaling makes token-dependent.

The space block, the row columns and the verdict's handling are in docs/sweeps.md ("External arms").
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

VARIANT_PREFIX = "external:"
FIRST_SEED = 42  # the i-th folder of an arm is seed FIRST_SEED + i
ARCHITECTURES = ("standard", "topk", "jumprelu", "gated")
NORMALISATIONS = ("none", "expected_average_only_in")
SOURCES = ("folder", "registry")
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
STRUCTURE_FILE = "hsae_structure.safetensors"  # hsae's export: the groups its group metrics use
BLOCK_KEYS = ("name", "paths", "saes", "release", "registry", "local")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HOOK = re.compile(r"blocks\.(\d+)\.(hook_resid_post|hook_resid_pre)")


class ExternalSAEError(ValueError):
    """A bad external arm (block, folder, config or mismatch with the sweep); the message names both values."""


def is_external(variant: str) -> bool:
    return variant.startswith(VARIANT_PREFIX)


# -- the space block ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExternalSource:
    """One SAE of an external arm: its folder and where it was named (a folder, or a registry entry)."""

    path: str  # absolute folder holding cfg.json + sae_weights.safetensors
    source: str  # "folder" or "registry"
    release: str | None = None
    sae_id: str | None = None
    norm_scaling_factor: float | None = None

    def params(self) -> dict[str, Any]:
        """What the trial's spec carries (part of its key): the folder and, from a registry, the entry."""
        out: dict[str, Any] = {"source": self.source, "path": self.path}
        if self.source == "registry":
            out.update(release=self.release, sae_id=self.sae_id, norm_scaling_factor=self.norm_scaling_factor)
        return out

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> ExternalSource:
        return cls(str(params["path"]), str(params["source"]), params.get("release"), params.get("sae_id"),
                   params.get("norm_scaling_factor"))


@dataclass(frozen=True)
class ExternalArm:
    """A space block's external arm: its name and its SAEs, one per seed (42, 43, ... in order)."""

    name: str
    sources: tuple[ExternalSource, ...]

    @property
    def variant(self) -> str:
        return f"{VARIANT_PREFIX}{self.name}"

    def seeded(self) -> list[tuple[int, ExternalSource]]:
        return [(FIRST_SEED + i, s) for i, s in enumerate(self.sources)]


def parse_block(raw: Any, where: str, base_dir: Path) -> ExternalArm:
    """``{name, paths: [...]}`` or ``{name, saes: [...], release, registry?, local?}``; relative paths are
    relative to ``base_dir`` (the space file's folder). Raises ExternalSAEError naming the field."""
    if not isinstance(raw, dict):
        raise ExternalSAEError(f"{where}: 'external' must be a mapping with keys {list(BLOCK_KEYS)}, got {raw!r}")
    unknown = sorted(set(raw) - set(BLOCK_KEYS))
    if unknown:
        raise ExternalSAEError(f"{where}: unknown key(s) {unknown} in 'external'; valid: {list(BLOCK_KEYS)}")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ExternalSAEError(f"{where}: external.name must be letters, digits, '.', '_' or '-', got {name!r}")
    if ("paths" in raw) == ("saes" in raw):
        raise ExternalSAEError(f"{where}: external needs exactly one of 'paths' (SAELens folders) or 'saes' "
                               "(ids of a registry release)")
    key = "paths" if "paths" in raw else "saes"
    items = raw[key]
    if not isinstance(items, list) or not items or not all(isinstance(p, str) and p for p in items):
        raise ExternalSAEError(f"{where}: external.{key} must be a non-empty list of strings, got {items!r}")
    if len(set(items)) != len(items):
        raise ExternalSAEError(f"{where}: external.{key} names the same SAE twice: {items}")
    if key == "paths":
        extra = sorted(set(raw) & {"release", "registry", "local"})
        if extra:
            raise ExternalSAEError(f"{where}: external.{extra} only go with 'saes' (a registry release)")
        sources = [ExternalSource(str(_resolve(p, base_dir)), "folder") for p in items]
    else:
        sources = registry_sources(raw, items, where, base_dir)
    for s in sources:
        check_folder(Path(s.path), where)
    return ExternalArm(name, tuple(sources))


def _resolve(path: str, base_dir: Path) -> Path:
    p = Path(path).expanduser()
    return (p if p.is_absolute() else base_dir / p).resolve()


def registry_sources(raw: dict[str, Any], ids: list[str], where: str, base_dir: Path) -> list[ExternalSource]:
    """Registry ids resolved to folders: ``registry`` (a pretrained_saes.yaml; default SAELens's packaged one)
    gives each id's ``path`` in the release's repository, found under ``local`` (a local copy of that repository;
    default the registry file's folder, as in a hub folder hsae-export writes)."""
    release = raw.get("release")
    if not isinstance(release, str) or not release:
        raise ExternalSAEError(f"{where}: external.saes needs 'release', the registry release the ids belong to")
    if "registry" in raw:
        registry = _resolve(str(raw["registry"]), base_dir)
        if not registry.is_file():
            raise ExternalSAEError(f"{where}: external.registry {str(registry)!r} does not exist")
        doc = yaml.safe_load(registry.read_text()) or {}
        default_local: Path | None = registry.parent
    else:
        doc, default_local = packaged_registry(), None
    if release not in doc:
        raise ExternalSAEError(f"{where}: release {release!r} is not in the registry; it has {sorted(doc)[:20]}")
    entry = doc[release]
    if entry.get("conversion_func"):
        raise ExternalSAEError(f"{where}: release {release!r} has conversion_func {entry['conversion_func']!r}: "
                               "only releases in SAELens's own layout (conversion_func null) load from a local copy")
    local = _resolve(str(raw["local"]), base_dir) if "local" in raw else default_local
    if local is None:
        raise ExternalSAEError(f"{where}: external.local must name the local copy of {entry.get('repo_id')!r} "
                               "(huggingface-cli download REPO --local-dir DIR)")
    by_id = {str(s["id"]): s for s in entry.get("saes", [])}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise ExternalSAEError(f"{where}: id(s) {missing} are not in release {release!r}; valid: {sorted(by_id)}")
    return [ExternalSource(str((local / str(by_id[i]["path"])).resolve()), "registry", release, i,
                           by_id[i].get("norm_scaling_factor")) for i in ids]


def packaged_registry() -> dict[str, Any]:
    """SAELens's packaged pretrained_saes.yaml as a plain mapping."""
    from importlib.resources import files

    return yaml.safe_load(files("sae_lens").joinpath("pretrained_saes.yaml").read_text()) or {}


def check_folder(path: Path, where: str) -> None:
    missing = [n for n in (CFG_FILE, WEIGHTS_FILE) if not (path / n).is_file()]
    if missing:
        raise ExternalSAEError(f"{where}: {path} is not an SAE in SAELens's layout: it lacks {', '.join(missing)}")


# -- the config and its match with the sweep ----------------------------------------------------------
def read_cfg(path: str | Path) -> dict[str, Any]:
    """cfg.json with SAELens's own defaulting (pre-6 configs renamed), metadata flattened in for reading."""
    from sae_lens.loading.pretrained_sae_loaders import handle_config_defaulting

    cfg = handle_config_defaulting(json.loads((Path(path) / CFG_FILE).read_text()))
    return {**(cfg.get("metadata") or {}), **cfg}


def cfg_layer(cfg: dict[str, Any]) -> int | None:
    """The block whose output the SAE reads: ``blocks.L.hook_resid_post`` (or ``blocks.L+1.hook_resid_pre``)."""
    match = _HOOK.fullmatch(str(cfg.get("hook_name") or ""))
    if match is None:
        return None
    return int(match.group(1)) - (1 if match.group(2) == "hook_resid_pre" else 0)


def check_matches(source: ExternalSource, d_model: int, layer: int, model_names: set[str]) -> dict[str, Any]:
    """The SAE's cfg.json, checked against the sweep (width, hook/layer, model, architecture, normalisation);
    raises ExternalSAEError naming the SAE's value and the sweep's. Reads no weights."""
    cfg, where = read_cfg(source.path), source.path
    arch = cfg.get("architecture")
    if arch not in ARCHITECTURES:
        raise ExternalSAEError(f"{where}: architecture {arch!r} is not supported; valid: {list(ARCHITECTURES)}")
    if cfg.get("d_in") != d_model:
        raise ExternalSAEError(f"{where}: d_in {cfg.get('d_in')} does not match the sweep's model width {d_model}")
    found = cfg_layer(cfg)
    if found != layer or cfg.get("hook_head_index") is not None:
        raise ExternalSAEError(f"{where}: hook_name {cfg.get('hook_name')!r} (layer {found}) does not match the "
                               f"sweep's blocks.{layer}.hook_resid_post (layer {layer})")
    if str(cfg.get("model_name") or "") not in model_names:
        raise ExternalSAEError(f"{where}: model_name {cfg.get('model_name')!r} does not match the sweep's model "
                               f"{sorted(model_names)}")
    check_normalisation(cfg, source)
    if cfg.get("reshape_activations", "none") != "none":
        raise ExternalSAEError(f"{where}: reshape_activations {cfg['reshape_activations']!r}: only 'none' (the "
                               "residual stream) is evaluated")
    return cfg


def check_normalisation(cfg: dict[str, Any], source: ExternalSource) -> None:
    norm = cfg.get("normalize_activations", "none")
    if norm not in NORMALISATIONS:
        raise ExternalSAEError(f"{source.path}: normalize_activations {norm!r} is not supported; valid: "
                               f"{list(NORMALISATIONS)} (a per-token rescaling makes the unlearning clamp's "
                               "raw-space edit token-dependent)")
    if norm == "expected_average_only_in" and source.norm_scaling_factor is None:
        raise ExternalSAEError(f"{source.path}: normalize_activations 'expected_average_only_in' needs the "
                               "registry entry's norm_scaling_factor (SAELens folds it only in from_pretrained): "
                               "name the SAE through its release ('saes:'), or fold the factor and set 'none'")


# -- loading ------------------------------------------------------------------------------------------
@dataclass
class LoadedExternal:
    """An external SAE as SAELens built it (float32, normalisation folded), and what hsae's metrics need."""

    sae: Any  # the SAELens SAE
    cfg: dict[str, Any]  # cfg.json as read (metadata flattened in)
    groups: torch.Tensor | None  # the (n, K) groups the folder declares (hsae's export), else None
    nce_temperature: float

    @property
    def architecture(self) -> str:
        return str(self.cfg["architecture"])

    def weights(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(config, state) by value, as the activation server's ``evaluate`` takes an SAE."""
        state = {k: v.detach().cpu().numpy() for k, v in self.sae.state_dict().items()}
        return {"external": self.sae.cfg.to_dict()}, state

    def module(self, scale: float = 1.0) -> ExternalSAE:
        return ExternalSAE(self.sae, self.groups, scale, self.nce_temperature)


def load_external(source: ExternalSource) -> LoadedExternal:
    """SAELens's ``SAE.load_from_disk`` on the folder, the registry's scaling factor folded as SAELens folds it."""
    from sae_lens import SAE

    cfg = read_cfg(source.path)
    check_normalisation(cfg, source)
    sae = SAE.load_from_disk(source.path, device="cpu", dtype="float32")
    if cfg.get("normalize_activations") == "expected_average_only_in":
        sae.fold_activation_norm_scaling_factor(float(source.norm_scaling_factor))  # sets 'none'
    structure = Path(source.path) / STRUCTURE_FILE
    groups = load_file(str(structure))["group_assignment"].float() if structure.is_file() else None
    params = (cfg.get("hsae_config") or {}).get("params") or {}
    return LoadedExternal(sae.eval(), cfg, groups, float(params.get("nce_temperature", 0.1)))


def from_weights(cfg: dict[str, Any], state: dict[str, np.ndarray]) -> ExternalSAE:
    """The server side of ``LoadedExternal.weights``: the SAELens SAE rebuilt from its config and state."""
    from sae_lens import SAE

    sae = SAE.from_dict(cfg["external"])
    sae.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in state.items()})  # a copy: read-only arrays
    return ExternalSAE(sae.eval(), None)


class ExternalSAE(torch.nn.Module):
    """A SAELens SAE seen through the interface hsae's metrics and evaluator use.

    ``scale`` puts it in a trained arm's unit: its input is ``scale * x`` for raw ``x``, so it runs SAELens's
    SAE on ``input / scale`` and returns the reconstruction times ``scale`` (features unchanged), and its
    ``W_dec`` is SAELens's times ``scale``: exactly the trained SAE an hsae export was folded from.
    """

    def __init__(self, sae: Any, groups: torch.Tensor | None, scale: float = 1.0, nce_temperature: float = 0.1):
        super().__init__()
        self.sae, self.scale, self.nce_temperature = sae, float(scale), nce_temperature
        self._groups = groups
        self.cfg = sae.cfg  # .d_sae, .d_in

    @property
    def W_dec(self) -> torch.Tensor:  # noqa: N802 (the SAE convention)
        return self.sae.W_dec * self.scale

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.sae.encode(x / self.scale)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return self.sae.decode(f) * self.scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encode(x)
        return self.decode(f), f

    def group_assignment(self) -> torch.Tensor | None:
        return self._groups

    def metric_nce_temperature(self) -> float:
        return self.nce_temperature


def metrics(loaded: LoadedExternal, x: torch.Tensor, labels: torch.Tensor | None, scale: float) -> dict[str, float]:
    """hsae's SAE metrics of the external SAE on held-out raw rows ``x``, in the unit ``scale`` gives."""
    from hsae import metrics as M

    module = loaded.module(scale)
    with torch.no_grad():
        return M.evaluate(module, x.float() * scale, labels, nce_temperature=module.metric_nce_temperature())


def check_trials(trials: list[Any], d_model: int, layer: int, model_names: set[str]) -> None:
    """Every external trial's SAE against the sweep (``check_matches``), before any compute."""
    for t in trials:
        if is_external(t.variant):
            check_matches(ExternalSource.from_params(t.params), d_model, layer, model_names)
