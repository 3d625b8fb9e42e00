"""hsae/schema.py is the one list of columns: metrics, rows, the report and the docs must agree with it."""

import re
from pathlib import Path

import pytest
import torch

from hsae import results, schema
from hsae.config import SAEConfig
from hsae.metrics import evaluate
from hsae.models import ModelInfo
from hsae.profiles import PROFILES
from hsae.results import trial_row
from hsae.spaces import TrialSpec
from hsae.variants import build_sae

DOCS = Path(__file__).resolve().parents[1] / "docs" / "results-schema.md"


@pytest.fixture(scope="module")
def evaluated() -> dict[str, float]:
    torch.manual_seed(0)
    sae = build_sae(SAEConfig("fixed_ortho", 16, 64, {"n_groups": 8}))
    x = torch.randn(256, 16)
    labels = torch.randint(0, 2, (256,))
    return evaluate(sae, x, labels)


def _sae_columns() -> list[str]:
    return [c.name for c in schema.TRIAL_COLUMNS if c.group == "sae_metric"]


def test_every_evaluate_key_is_a_row_metric_or_declared_evaluate_only(evaluated):
    declared = set(_sae_columns()) | set(schema.EVALUATE_ONLY)
    undeclared = sorted(set(evaluated) - declared)
    assert not undeclared, f"evaluate returns {undeclared}: add them to hsae/schema.py (sae_metric or EVALUATE_ONLY)"


def test_every_row_metric_is_returned_by_evaluate(evaluated):
    missing = [name for name in _sae_columns() if name not in evaluated]
    assert not missing, f"hsae/schema.py declares {missing} but hsae.metrics.evaluate does not return them"
    assert not set(schema.EVALUATE_ONLY) & {c.name for c in schema.TRIAL_COLUMNS}


def test_sae_metrics_are_the_sae_metric_columns_in_row_order():
    assert list(schema.SAE_METRICS) == _sae_columns()
    assert schema.SAE_METRICS == (
        "mse", "explained_variance", "fvu", "l0", "l1", "dead_fraction", "cosine", "l2_ratio",
        "decoder_norm_min", "decoder_norm_max", "condition_number", "condition_number_max", "group_entropy",
        "inter_group_correlation", "inter_group_cosine", "nce",
    )


def _documented_names() -> set[str]:
    """Every name in a table cell or a code span of the docs page (comma-separated lists count name by name)."""
    text = DOCS.read_text()
    pieces = re.findall(r"`([^`]+)`", text)
    for line in text.splitlines():
        if line.startswith("|"):
            pieces += line.strip("|").split("|")
    return {name.strip() for piece in pieces for name in piece.split(",")}


@pytest.mark.parametrize("names", [schema.TRIAL_COLUMN_NAMES, schema.CURVE_COLUMN_NAMES], ids=["trials", "curves"])
def test_every_column_is_documented(names):
    missing = [name for name in names if name not in _documented_names()]
    assert not missing, f"docs/results-schema.md does not name {missing}"


def test_docs_name_the_schema_as_source_of_truth():
    assert "hsae/schema.py" in DOCS.read_text().split("\n## ")[0]


def test_report_metrics_are_trial_columns():
    unknown = [m for m in schema.REPORT_METRICS if m not in schema.TRIAL_COLUMN_NAMES]
    assert not unknown
    assert len(set(schema.REPORT_METRICS)) == len(schema.REPORT_METRICS)


@pytest.mark.parametrize("col", [*schema.TRIAL_COLUMNS, *schema.CURVE_COLUMNS, *schema.EVALUATE_ONLY_COLUMNS],
                         ids=lambda c: c.name)
def test_column_is_well_formed(col):
    assert col.meaning.strip() and "\n" not in col.meaning
    assert col.dtype in schema.DTYPES
    assert col.direction in schema.DIRECTIONS
    assert col.group in schema.GROUPS


def test_names_are_unique_and_lookups_work():
    assert len(set(schema.TRIAL_COLUMN_NAMES)) == len(schema.TRIAL_COLUMN_NAMES)
    assert len(set(schema.CURVE_COLUMN_NAMES)) == len(schema.CURVE_COLUMN_NAMES)
    assert schema.column("mse").direction == "lower"
    assert schema.label("explained_variance") == "EV"
    assert schema.label("mse") == "mse"
    assert schema.label("cfg_alpha") == "cfg_alpha"
    with pytest.raises(KeyError):
        schema.column("no_such_metric")


def test_results_columns_come_from_the_schema():
    assert results.TRIAL_COLUMNS == [(c.name, c.dtype) for c in schema.TRIAL_COLUMNS]
    assert results.CURVE_COLUMNS == list(schema.CURVE_COLUMN_NAMES)
    df = results.trial_frame({"experiment": "e", "status": "completed", "mse": 0.5, "cfg_alpha": 0.1})
    assert list(df.columns) == [*schema.TRIAL_COLUMN_NAMES, "cfg_alpha"]
    assert {n: str(t) for n, t in df.dtypes.items() if n != "cfg_alpha"} == dict(results.TRIAL_COLUMNS)


def test_trial_frame_rejects_a_column_outside_the_schema():
    with pytest.raises(ValueError, match="undocumented"):
        results.trial_frame({"experiment": "e", "status": "completed", "not_a_column": 1.0})


def test_a_row_names_the_dtype_its_activations_were_harvested_in():
    model = ModelInfo(source="m", family="gemma2", layer=2, d_model=8, n_layers=4, bos_id=None, eos_id=None,
                      dtype="bfloat16", identity={})
    spec = TrialSpec("exp", "space", "relu", {}, 42, "ctx")
    row = trial_row(spec, PROFILES["tiny"], model, None, None, "completed")
    assert row["harvest_dtype"] == "bfloat16"
    assert "harvest_dtype" in schema.TRIAL_COLUMN_NAMES
