"""The cluster launcher configs pass Ray's own validator; broken ones are rejected."""

import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"


def load(name):
    return yaml.safe_load((CLUSTER / name).read_text())


def validate(cfg):
    validate_config(prepare_config(copy.deepcopy(cfg)))


@pytest.mark.parametrize("name", ["gpu.yaml", "local.yaml"])
def test_cluster_configs_validate(name):
    validate(load(name))


def test_gpu_config_pins_a_ray_gpu_image_and_integer_resources():
    cfg = load("gpu.yaml")
    assert cfg["docker"]["image"].startswith("rayproject/ray:2.60") and cfg["docker"]["image"].endswith("-gpu")
    for node in cfg["available_node_types"].values():
        assert all(isinstance(v, int) for v in node["resources"].values())
        assert node["resources"]["GPU"] >= 1


@pytest.mark.parametrize("break_it", [
    lambda c: c.update(head_node_type="no_such_type"),
    lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU=0.5),
    lambda c: c.update(not_a_ray_key=1),
])
def test_broken_gpu_configs_are_rejected(break_it):
    cfg = load("gpu.yaml")
    break_it(cfg)
    with pytest.raises(Exception):  # noqa: B017 - Ray raises ValueError or jsonschema's ValidationError
        validate(cfg)
