"""SAELens itself loads what we export: every variant, and a sweep's hub folder through its registry file.

Nothing here re-implements SAELens's maths: its loader (``SAE.load_from_disk``, ``SAE.from_pretrained``) builds
the SAE, its registry parser reads our ``pretrained_saes.yaml``, and its forward reconstructs. "Ours" is the hsae
SAE's forward on normalised activations, unscaled (as in tests/test_export.py). The error reported and gated is
the largest, over rows, of ||x_hat_saelens - x_hat_ours||_2 / ||x_hat_ours||_2 (per-row relative L2, float32),
and the same for the feature activations.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from huggingface_hub.utils import EntryNotFoundError
from sae_lens import SAE as SAELensSAE  # no skip: CI installs SAELens with the `saelens` extra
from sae_lens.loading import pretrained_sae_loaders
from sae_lens.loading import pretrained_saes_directory as registry
from safetensors.torch import load_file

from hsae.config import SAEConfig
from hsae.export import REGISTRY_FILE, SAELENS_STRUCTURE, export_saelens, hub_folder, main
from hsae.variants import VARIANTS, build_sae
from tests.helpers import TINY_PARAMS

D_IN, D_SAE = 24, 64
# A realistic fold: raw activations ~27x the unit the SAE trained in (residual streams are far larger).
SCALE = 0.037
TOLERANCE = 1e-4
ARCHITECTURE = {"topk": ("topk", "TopKSAE"), "matryoshka_batchtopk": ("jumprelu", "JumpReLUSAE")}
STRUCTURE_KIND = {"fixed_ortho": "groups", "adaptive_ortho": "groups", "enhanced_adaptive": "groups",
                  "static_hier": "hierarchy", "dynamic_hier": "hierarchy", "contrastive_hier": "hierarchy",
                  "matryoshka_batchtopk": "matryoshka", "relu": "none", "topk": "none"}


def raw_activations(seed: int, n: int = 512) -> torch.Tensor:
    """Unnormalised activations: unit per-element variance and a constant offset once multiplied by SCALE."""
    gen = torch.Generator().manual_seed(seed)
    offset = torch.randn(D_IN, generator=gen)
    return (torch.randn(n, D_IN, generator=gen) + offset) / SCALE


@torch.no_grad()
def trained_like(variant: str, seed: int = 0) -> torch.nn.Module:
    """An SAE of ``variant`` with random, trained-looking weights and learned structure, in eval mode."""
    gen = torch.Generator().manual_seed(1000 + seed)
    sae = build_sae(SAEConfig(variant, D_IN, D_SAE, TINY_PARAMS.get(variant, {})), generator=gen)
    sae.W_enc.copy_(torch.randn(D_IN, D_SAE, generator=gen) / D_IN**0.5)
    sae.W_dec.copy_(F.normalize(torch.randn(D_SAE, D_IN, generator=gen), dim=1))
    sae.b_enc.copy_(torch.randn(D_SAE, generator=gen) * 0.3 - 0.1)
    sae.b_dec.copy_(torch.randn(D_IN, generator=gen))
    if variant in ("adaptive_ortho", "enhanced_adaptive"):  # regrouped: no longer contiguous
        sae.group_of.copy_(sae.group_of[torch.randperm(D_SAE, generator=gen)])
    if variant in ("dynamic_hier", "contrastive_hier"):  # sharper, learned-looking soft assignment
        sae.query_l1.mul_(3.0)
        sae.query_l2.mul_(3.0)
        sae.assignment_l2.copy_(sae.attention_assignment())
    if variant == "matryoshka_batchtopk":
        # The inference threshold: the median positive pre-activation of *other* tokens (on the compared ones it
        # would sit exactly on one, which float rounding then flips either way: JumpReLU is discontinuous there).
        pre = F.relu(sae.pre_activation(raw_activations(seed + 100) * SCALE))
        sae.threshold.copy_(pre[pre > 0].median())
    return sae.eval()


@torch.no_grad()
def ours(sae: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x_hat, f = sae(x * SCALE)
    return x_hat / SCALE, f


@torch.no_grad()
def theirs(loaded: SAELensSAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return loaded(x), loaded.encode(x)


def max_row_rel_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    norms = expected.norm(dim=1)
    live = norms > 0
    return float(((got - expected).norm(dim=1)[live] / norms[live]).max())


def compare(sae: torch.nn.Module, loaded: SAELensSAE, seed: int = 0) -> tuple[float, float]:
    """(reconstruction, feature) max per-row relative errors of SAELens's forward against ours."""
    x = raw_activations(seed)
    hat, f = ours(sae, x)
    their_hat, their_f = theirs(loaded, x)
    assert their_hat.dtype == torch.float32
    return max_row_rel_error(their_hat, hat), max_row_rel_error(their_f, f)


def check_structure(sae: torch.nn.Module, path: Path, meta: dict) -> None:
    """cfg.json's metadata and hsae_structure.safetensors hold the structure SAELens cannot use."""
    variant = sae.cfg.variant
    structure = meta["hsae_structure"]
    assert structure["kind"] == STRUCTURE_KIND[variant]
    assert meta["hsae_config"] == sae.cfg.to_dict() and meta["folded_scale"] == pytest.approx(SCALE)
    if structure["kind"] == "none":
        assert not (path / SAELENS_STRUCTURE).exists()
        return
    saved = load_file(str(path / SAELENS_STRUCTURE))
    assert set(saved) == set(structure["tensors"])
    torch.testing.assert_close(saved["group_assignment"], sae.group_assignment().float(), rtol=0, atol=0)
    if variant in ("adaptive_ortho", "enhanced_adaptive"):
        assert torch.equal(saved["group_assignment"].argmax(dim=1), sae.group_of)
    if structure["kind"] == "hierarchy":
        assert structure["levels"] == [4, 4] and structure["hard"] is (variant == "static_hier")
        torch.testing.assert_close(saved["fine_assignment"], sae.fine_assignment().detach(), rtol=0, atol=0)
    if structure["kind"] == "matryoshka":
        assert structure["prefix_sizes"] == sae.sizes == [8, 16, 32, 64]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_saelens_loads_every_variant_and_reconstructs_as_we_do(variant, tmp_path):
    seed = sorted(VARIANTS).index(variant)  # different weights for every variant
    sae = trained_like(variant, seed)
    path = export_saelens(sae, tmp_path / variant, scale=SCALE, model_name="toy", hook_layer=3)
    loaded = SAELensSAE.load_from_disk(path, device="cpu")
    architecture, class_name = ARCHITECTURE.get(variant, ("standard", "StandardSAE"))
    assert loaded.cfg.architecture() == architecture and type(loaded).__name__ == class_name
    if variant == "topk":
        assert loaded.cfg.k == 8
    if variant == "matryoshka_batchtopk":
        assert float(loaded.threshold.detach().min()) > 0  # the threshold path, not plain ReLU
    assert loaded.cfg.metadata.hook_name == "blocks.3.hook_resid_post" and loaded.cfg.metadata.model_name == "toy"
    assert loaded.cfg.metadata.hsae_variant == variant  # SAELens keeps our metadata on load
    check_structure(sae, path, json.loads((path / "cfg.json").read_text())["metadata"])
    rec, feat = compare(sae, loaded, seed)
    l0 = float((loaded.encode(raw_activations(seed)) > 0).float().sum(dim=1).mean())
    print(f"\n[peer-load] {variant:>22s} -> {architecture:<9s} ({class_name}) L0 {l0:5.1f}  "
          f"max row rel err: x_hat {rec:.2e}, f {feat:.2e}")
    assert 0 < l0 < D_SAE
    assert rec <= TOLERANCE and feat <= TOLERANCE, (variant, rec, feat)


# -- a sweep's hub folder --------------------------------------------------------------------------
# (variant, status, converged, exported): what hub_folder must keep or leave out, and why.
TRIALS = [
    ("relu", "completed", True, True),
    ("topk", "completed", True, True),
    ("matryoshka_batchtopk", "completed", True, True),
    ("dynamic_hier", "completed", True, True),
    ("adaptive_ortho", "completed", True, True),
    ("static_hier", "completed", False, True),
    ("fixed_ortho", "failed", None, False),
    ("contrastive_hier", "completed", True, False),
]


def write_sweep(results: Path, trials: list[tuple]) -> dict[str, torch.nn.Module]:
    """A results directory as a sweep leaves it: trials.parquet with sae_path, and the SAELens exports."""
    saes, rows = {}, []
    for i, (variant, status, converged, exported) in enumerate(trials):
        trial_id = f"t{i:02d}{variant[:3]}"
        sae_path = f"saes/{trial_id}" if exported else None
        if exported:
            saes[trial_id] = trained_like(variant, seed=i)
            export_saelens(saes[trial_id], results / sae_path, scale=SCALE, model_name="toy-lm", hook_layer=5)
        rows.append({"trial_id": trial_id, "variant": variant, "seed": 42, "status": status, "converged": converged,
                     "sae_path": sae_path, "l0": 10.0 + i, "explained_variance": 0.9 - i / 100, "model": "toy-lm",
                     "layer": 5})
    table = pd.DataFrame(rows).astype({"converged": "boolean", "seed": "Int64", "layer": "Int64",
                                       "sae_path": "string"})
    table.to_parquet(results / "trials.parquet")
    return saes


@pytest.fixture
def saelens_registry(monkeypatch):
    """SAELens's own registry parser, pointed at a file of ours instead of its packaged pretrained_saes.yaml."""

    def read(path: Path) -> dict:
        class Package:
            def joinpath(self, name: str) -> Path:
                assert name == "pretrained_saes.yaml"
                return path

        monkeypatch.setattr(registry, "files", lambda package: Package())
        registry.get_pretrained_saes_directory.cache_clear()
        return registry.get_pretrained_saes_directory()

    yield read
    registry.get_pretrained_saes_directory.cache_clear()


def test_hub_folder_loads_through_saelens_registry(tmp_path, saelens_registry, monkeypatch):
    saes = write_sweep(tmp_path / "results", TRIALS)
    out = hub_folder(tmp_path / "results", tmp_path / "hub", release="hsae-toy", repo_id="org/hsae-toy")
    assert out.left_out == {"t05sta": "not converged", "t06fix": "status failed",
                            "t07con": "no exported SAE (sae_path empty)"}
    directory = saelens_registry(tmp_path / "hub" / REGISTRY_FILE)
    lookup = directory["hsae-toy"]
    assert set(directory) == {"hsae-toy"} and lookup.repo_id == "org/hsae-toy" and lookup.model == "toy-lm"
    assert lookup.conversion_func is None and list(lookup.saes_map) == out.saes
    by_id = {f"{v}_seed42_{t}": t for t, v in ((t, saes[t].cfg.variant) for t in saes)}
    assert set(lookup.saes_map) == set(by_id) - {"static_hier_seed42_t05sta"}
    for sae_id, folder in lookup.saes_map.items():
        trial = by_id[sae_id]
        assert lookup.expected_l0[sae_id] == 10.0 + int(trial[1:3])
        loaded = SAELensSAE.load_from_disk(tmp_path / "hub" / folder, device="cpu")
        rec, feat = compare(saes[trial], loaded, seed=int(trial[1:3]))
        assert rec <= TOLERANCE and feat <= TOLERANCE, (sae_id, rec, feat)
    # And SAELens's hub path: from_pretrained(release, id) resolves repo and folder through the registry entry.
    served = []

    def hub_download(repo_id: str, filename: str, **kwargs) -> str:
        assert repo_id == "org/hsae-toy"
        if not (tmp_path / "hub" / filename).is_file():
            raise EntryNotFoundError(filename)
        served.append(filename)
        return str(tmp_path / "hub" / filename)

    monkeypatch.setattr(pretrained_sae_loaders, "hf_hub_download", hub_download)
    sae_id = "dynamic_hier_seed42_t03dyn"
    loaded = SAELensSAE.from_pretrained("hsae-toy", sae_id, device="cpu")
    assert served == [f"{sae_id}/cfg.json", f"{sae_id}/sae_weights.safetensors"]
    assert max(compare(saes["t03dyn"], loaded, seed=3)) <= TOLERANCE


def test_hub_folder_registry_has_saelens_shape(tmp_path):
    write_sweep(tmp_path / "results", TRIALS[:2])
    hub_folder(tmp_path / "results", tmp_path / "hub")
    doc = yaml.safe_load((tmp_path / "hub" / REGISTRY_FILE).read_text())
    assert doc == {"hub": {"repo_id": "hub", "model": "toy-lm", "conversion_func": None, "saes": [
        {"id": "relu_seed42_t00rel", "path": "relu_seed42_t00rel", "l0": 10.0, "variance_explained": 0.9},
        {"id": "topk_seed42_t01top", "path": "topk_seed42_t01top", "l0": 11.0, "variance_explained": 0.89}]}}
    assert sorted(p.name for p in (tmp_path / "hub").iterdir()) == [
        "README.md", REGISTRY_FILE, "relu_seed42_t00rel", "topk_seed42_t01top"]
    assert "library_name: saelens" in (tmp_path / "hub" / "README.md").read_text()


def test_hub_cli_writes_and_reports_what_it_left_out(tmp_path, capsys):
    write_sweep(tmp_path / "results", TRIALS[4:])
    assert main(["hub", str(tmp_path / "results"), str(tmp_path / "hub"), "--release", "r1",
                 "--repo-id", "org/r1"]) == 0
    printed = capsys.readouterr().out
    assert "left out t01sta: not converged" in printed and "left out t02fix: status failed" in printed
    assert "wrote 1 SAE(s)" in printed and (tmp_path / "hub" / "adaptive_ortho_seed42_t00ada" / "cfg.json").is_file()


def test_hub_cli_refuses_bad_input(tmp_path, capsys):
    results = tmp_path / "results"

    def refused(*args: str) -> str:
        assert main(["hub", *args]) == 2
        return capsys.readouterr().err

    assert "holds no trials.parquet" in refused(str(tmp_path / "nowhere"), str(tmp_path / "hub"))
    write_sweep(results, [("relu", "failed", None, False), ("topk", "completed", False, True)])
    err = refused(str(results), str(tmp_path / "hub"))
    assert "no completed, converged SAE" in err and "t00rel: status failed" in err and "t01top: not converged" in err
    assert not (tmp_path / "hub").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert "is not an empty directory" in refused(str(results), str(tmp_path / "full"))
    assert "expected ORG/NAME" in refused(str(results), str(tmp_path / "hub"), "--repo-id", "a/b/c")
    with pytest.raises(SystemExit) as usage:
        main(["hub", str(results)])
    assert usage.value.code == 2
