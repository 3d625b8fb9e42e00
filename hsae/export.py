"""Saving SAEs: our own format (exact round trip) and the SAELens layout other tools load.

Both fold the training normalisation back into the weights, so a saved SAE takes raw activations:
with x_n = s x, f = ReLU((s x - b_dec) W_enc + b_enc) and x_hat = (f W_dec + b_dec) / s, the folded weights are
W_enc' = s W_enc, W_dec' = W_dec / s, b_dec' = b_dec / s. Feature activations keep the training unit.

``hub_folder`` (CLI: ``hsae-export hub RESULTS_DIR DEST``, or ``python -m hsae.export``) lays a sweep's SAELens
exports out as one folder ready to upload to a model hub, with the release's entry for SAELens's pretrained-SAE
registry.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from hsae.atomic import atomic_dir
from hsae.config import SAEConfig
from hsae.keys import content_key
from hsae.variants import SAE, build_sae
from hsae.variants.matryoshka_batchtopk import MatryoshkaBatchTopKSAE
from hsae.variants.static_hier import StaticHierSAE

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "hsae_config.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_CONFIG = "cfg.json"
# Next to an export: the group assignments SAELens has no place for (``export_structure``).
SAELENS_STRUCTURE = "hsae_structure.safetensors"
# The cfg.json format written: SAELens >= 6 keeps its ``metadata`` block on load; older formats drop it.
SAELENS_CFG_FORMAT = "6.0.0"
# A hub folder's registry file: one release in the shape of SAELens's packaged pretrained_saes.yaml.
REGISTRY_FILE = "pretrained_saes.yaml"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


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


def export_structure(sae: SAE) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The variant's structure that no SAELens architecture holds: groups, hierarchy levels, prefixes.

    Returns the description kept in ``cfg.json``'s ``metadata["hsae_structure"]`` and the assignment
    tensors written next to it as ``hsae_structure.safetensors`` (none for ungrouped variants):
    ``group_assignment`` (n, K), the (coarse) groups; for hierarchies also ``fine_assignment`` (n, K1*K2),
    parent-major. Rows sum to 1; one-hot unless the assignment is soft (``dynamic_hier``, ``contrastive_hier``).
    """
    with torch.no_grad():
        groups = sae.group_assignment()
        if groups is None:
            return {"kind": "none"}, {}
        tensors = {"group_assignment": groups}
        doc: dict[str, Any] = {"kind": "groups", "n_groups": int(groups.shape[1])}
        if isinstance(sae, StaticHierSAE):
            tensors["fine_assignment"] = sae.fine_assignment()
            doc = {"kind": "hierarchy", "levels": [sae.p.n_groups_l1, sae.p.n_groups_l2]}
        elif isinstance(sae, MatryoshkaBatchTopKSAE):
            doc = {"kind": "matryoshka", "prefix_sizes": list(sae.sizes)}
    tensors = {k: v.detach().float().cpu().contiguous().clone() for k, v in tensors.items()}
    doc["hard"] = all(bool(((t == 0) | (t == 1)).all()) for t in tensors.values())
    doc["file"] = SAELENS_STRUCTURE
    doc["tensors"] = {k: list(v.shape) for k, v in tensors.items()}
    return doc, tensors


def saelens_cfg(sae: SAE, scale: float, structure: dict[str, Any], model_name: str = "", hook_layer: int = 0,
                dataset_path: str = "", context_size: int = 128,
                extra_metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``cfg.json`` of an export: SAELens 6's layout (its loader keeps ``metadata``), plus the pre-6 keys.

    ``metadata.sae_lens_version`` names the cfg format (6.0.0), not a SAELens that trained it
    (``sae_lens_training_version`` is null). Older readers and scripts find the flat pre-6 keys.
    """
    run = {"model_name": model_name, "hook_name": f"blocks.{hook_layer}.hook_resid_post", "hook_head_index": None,
           "context_size": context_size, "dataset_path": dataset_path, "prepend_bos": True, "neuronpedia_id": None}
    metadata = {**run, "sae_lens_version": SAELENS_CFG_FORMAT, "sae_lens_training_version": None,
                "hook_layer": hook_layer, "hsae_variant": sae.cfg.variant, "hsae_config": sae.cfg.to_dict(),
                "folded_scale": scale, "hsae_structure": structure, **(extra_metadata or {})}
    cfg = {
        "architecture": sae.saelens_architecture,
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **run,
        "hook_layer": hook_layer,
        "activation_fn_str": "topk" if sae.saelens_architecture == "topk" else "relu",
        "activation_fn_kwargs": {},
        "finetuning_scaling_factor": False,
        "sae_lens_training_version": None,
        "metadata": metadata,
    }
    cfg.update(sae.saelens_extra_cfg())
    if cfg["architecture"] == "topk":
        cfg["k"] = cfg["activation_fn_kwargs"]["k"]
    return cfg


def export_saelens(
    sae: SAE,
    path: str | Path,
    scale: float = 1.0,
    model_name: str = "",
    hook_layer: int = 0,
    dataset_path: str = "",
    context_size: int = 128,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``cfg.json`` + ``sae_weights.safetensors`` in the layout SAELens loads from disk.

    Grouped variants are plain ReLU SAEs at inference (their groups only shape training), so they
    export as ``standard``; TopK as ``topk``; Matryoshka BatchTopK as ``jumprelu`` with its threshold
    (docs/variants.md, "Export to SAELens"). The structure SAELens cannot use goes to ``metadata`` and,
    for grouped variants, ``hsae_structure.safetensors`` (``export_structure``).
    """
    path = Path(path)
    state = folded_state(sae, scale)
    tensors = {name: state[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    tensors.update({k: v.detach().cpu().contiguous() for k, v in sae.extra_export_tensors().items()})
    structure, structure_tensors = export_structure(sae)
    cfg = saelens_cfg(sae, scale, structure, model_name, hook_layer, dataset_path, context_size, metadata)
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / SAELENS_WEIGHTS))
        if structure_tensors:
            save_file(structure_tensors, str(tmp / SAELENS_STRUCTURE))
        (tmp / SAELENS_CONFIG).write_text(json.dumps(cfg, indent=2))
    return path


# -- a hub-ready folder of a sweep's SAEs ------------------------------------------------------------
@dataclass(frozen=True)
class HubFolder:
    """What ``hub_folder`` wrote: the folder, its release, the SAE ids in it and the trials left out, with why."""

    dest: Path
    release: str
    repo_id: str
    saes: list[str]
    left_out: dict[str, str]


def _hub_reason(row: Any, results_dir: Path) -> str:
    """Why a trials.parquet row cannot go into a hub folder; '' when it can."""
    import pandas as pd

    if row.status != "completed":
        return f"status {row.status}"
    if pd.isna(row.converged) or not bool(row.converged):
        return "not converged" if not pd.isna(row.converged) else "convergence unknown"
    if pd.isna(row.sae_path) or not str(row.sae_path):
        return "no exported SAE (sae_path empty)"
    folder = results_dir / str(row.sae_path)
    missing = [name for name in (SAELENS_CONFIG, SAELENS_WEIGHTS) if not (folder / name).is_file()]
    return f"{folder} lacks {', '.join(missing)}" if missing else ""


def hub_sae_id(row: Any) -> str:
    """A trial's SAE id (and folder name) in a hub folder: ``<variant>_seed<seed>_<trial_id>``."""
    return f"{row.variant}_seed{row.seed}_{row.trial_id}"


def select_for_hub(trials: Any, results_dir: Path) -> tuple[list[Any], dict[str, str]]:
    """The completed, converged rows whose exported SAE exists (by variant, seed), and the rest with why."""
    missing = {"trial_id", "variant", "seed", "status", "converged", "sae_path", "l0", "explained_variance",
               "model", "layer"} - set(trials.columns)
    if missing:
        raise ValueError(f"trials.parquet lacks the column(s) {sorted(missing)} (a sweep without exported SAEs?)")
    kept, left_out = [], {}
    for row in trials.sort_values(["variant", "seed", "trial_id"]).itertuples(index=False):
        reason = _hub_reason(row, results_dir)
        if reason:
            left_out[str(row.trial_id)] = reason
        else:
            kept.append(row)
    return kept, left_out


def exported_model_name(results_dir: Path, row: Any) -> str:
    """The ``model_name`` an export carries (a name peers resolve; the row's ``model`` may be "embedded")."""
    return str(json.loads((results_dir / str(row.sae_path) / SAELENS_CONFIG).read_text())["model_name"])


def registry_entry(rows: list[Any], repo_id: str, results_dir: Path) -> dict[str, Any]:
    """One release of SAELens's ``pretrained_saes.yaml`` (read by ``get_pretrained_saes_directory``)."""
    models = sorted({exported_model_name(results_dir, r) for r in rows})
    if len(models) != 1:
        raise ValueError(f"a release holds SAEs of one model; these trials come from {models}")
    saes = [{"id": hub_sae_id(r), "path": hub_sae_id(r), "l0": round(float(r.l0), 4),
             "variance_explained": round(float(r.explained_variance), 4)} for r in rows]
    # conversion_func null: the folders are in SAELens's own format, read by its default loader.
    return {"repo_id": repo_id, "model": models[0], "conversion_func": None, "saes": saes}


def _hub_readme(release: str, repo_id: str, rows: list[Any], model: str) -> str:
    lines = ["---", "library_name: saelens", "tags: [sparse-autoencoder, hsae]", "---", "", f"# {release}", "",
             f"Sparse autoencoders on `{model}`, exported by hsae (SAELens layout, one folder per SAE;",
             f"`{REGISTRY_FILE}` is the entry for SAELens's pretrained-SAE registry). Load one with",
             "", "```python", "from sae_lens import SAE", "",
             f'sae = SAE.from_pretrained("{repo_id}", "{hub_sae_id(rows[0])}")', "```", "",
             "The hsae variant, its configuration and group structure are in each `cfg.json`'s `metadata`.", "",
             "| id | variant | seed | layer | L0 | explained variance |", "|---|---|---|---|---|---|"]
    lines += [f"| {hub_sae_id(r)} | {r.variant} | {r.seed} | {r.layer} | {float(r.l0):.4g} | "
              f"{float(r.explained_variance):.4g} |" for r in rows]
    return "\n".join(lines) + "\n"


def _check_hub_args(results_dir: Path, dest: Path, release: str, repo_id: str) -> None:
    if not (results_dir / "trials.parquet").is_file():
        raise ValueError(f"{results_dir} holds no trials.parquet: not a sweep's results directory")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ValueError(f"{dest} exists and is not an empty directory; choose a new destination")
    if not _NAME.fullmatch(release):
        raise ValueError(f"release {release!r}: use letters, digits, '.', '_' and '-' only")
    if not all(_NAME.fullmatch(part) for part in repo_id.split("/")) or repo_id.count("/") > 1:
        raise ValueError(f"repo id {repo_id!r}: expected ORG/NAME")


def hub_folder(results_dir: str | Path, dest: str | Path, release: str | None = None,
               repo_id: str | None = None) -> HubFolder:
    """Lay a sweep's exported SAEs out as one folder ready to upload to a model hub, written atomically.

    ``dest`` gets one subfolder per completed, converged trial (a copy of its ``sae_path`` export), the
    release's entry for SAELens's registry (``pretrained_saes.yaml``) and a README.md. ``release``
    defaults to ``dest``'s name and ``repo_id`` to the release. Raises ``ValueError`` on bad input.
    """
    import pandas as pd

    results_dir, dest = Path(results_dir), Path(dest)
    release = release or dest.name
    repo_id = repo_id or release
    _check_hub_args(results_dir, dest, release, repo_id)
    rows, left_out = select_for_hub(pd.read_parquet(results_dir / "trials.parquet"), results_dir)
    if not rows:
        why = "; ".join(f"{t}: {r}" for t, r in left_out.items()) or "the table is empty"
        raise ValueError(f"no completed, converged SAE to share in {results_dir}/trials.parquet ({why})")
    entry = registry_entry(rows, repo_id, results_dir)
    with atomic_dir(dest) as tmp:
        for row in rows:
            shutil.copytree(results_dir / str(row.sae_path), tmp / hub_sae_id(row))
        (tmp / REGISTRY_FILE).write_text(yaml.safe_dump({release: entry}, sort_keys=False))
        (tmp / "README.md").write_text(_hub_readme(release, repo_id, rows, entry["model"]))
    return HubFolder(dest, release, repo_id, [hub_sae_id(r) for r in rows], left_out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hsae-export", description="Share a sweep's SAEs.")
    sub = parser.add_subparsers(dest="command", required=True)
    hub = sub.add_parser("hub", help="lay a sweep's exported SAEs out as one folder ready to upload to a model hub")
    hub.add_argument("results_dir", type=Path, help="the sweep's results directory (holds trials.parquet)")
    hub.add_argument("dest", type=Path, help="the folder to write; must not exist or be empty")
    hub.add_argument("--release", default=None, help="release name in the registry file (default: DEST's name)")
    hub.add_argument("--repo-id", default=None, help="hub repository ORG/NAME it will be uploaded to "
                                                     "(default: the release name)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = hub_folder(args.results_dir, args.dest, release=args.release, repo_id=args.repo_id)
    except (ValueError, OSError) as exc:
        print(f"hsae.export hub: error: {exc}", file=sys.stderr)
        return 2
    for trial_id, reason in out.left_out.items():
        print(f"left out {trial_id}: {reason}")
    print(f"wrote {len(out.saes)} SAE(s) to {out.dest}/ (release {out.release!r}, repo {out.repo_id!r}, "
          f"registry {REGISTRY_FILE}); {len(out.left_out)} trial(s) left out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
