"""A profile is made of the configs it feeds: no field stated twice, paths and flat names, keys kept."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import asdict

import pytest

from hsae.activations import HarvestConfig
from hsae.config import TrainConfig
from hsae.corpora import CorpusSpec
from hsae.evaluation.evaluator import EvalConfig
from hsae.evaluation.questions import BankConfig
from hsae.evaluation.unlearning import UnlearningConfig
from hsae.models import ModelSpec
from hsae.profiles import (
    CONFIGS,
    FLAT_NAMES,
    NOT_SETTABLE,
    PROFILES,
    Profile,
    get_profile,
    override,
    parse_profile_settings,
    settable_paths,
)
from hsae.spaces import sweep_context
from hsae.stream import StreamConfig

FED = (TrainConfig, HarvestConfig, ModelSpec, CorpusSpec, StreamConfig, EvalConfig, UnlearningConfig, BankConfig)


def names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_no_config_field_is_declared_again_in_the_profile():
    own = names(Profile) - set(CONFIGS) - {"name"}  # the profile's name; CorpusSpec.name is the corpus's
    for cls in FED:
        assert not own & names(cls), f"Profile restates {sorted(own & names(cls))} of {cls.__name__}"
    # The configs are the real objects, each with its own defaults and validation.
    assert {name: type(getattr(PROFILES["embedded"], name)) for name in CONFIGS} == {
        "harvest": HarvestConfig, "train": TrainConfig, "stream": StreamConfig, "eval": EvalConfig, "bank": BankConfig}


def test_every_flat_name_points_at_a_field_and_reads_as_its_path():
    profile = get_profile("embedded")
    for flat, path in FLAT_NAMES.items():
        assert profile.get(flat) == profile.get(path), flat
        assert path in settable_paths(profile), path
    text = {"lr": "0.01", "stream_join": "oldest", "min_forget_questions": "20", "layer": "12"}
    for flat, value in text.items():
        by_flat = override(profile, parse_profile_settings([f"{flat}={value}"], profile))
        by_path = override(profile, parse_profile_settings([f"{FLAT_NAMES[flat]}={value}"], profile))
        assert by_flat == by_path and by_flat != profile, flat
    assert by_path.harvest.model.layer == 12


def test_a_path_sets_a_nested_field_and_keeps_the_others():
    profile = get_profile("embedded")
    changed = override(profile, parse_profile_settings(
        ["train.weight_decay=0.02", "eval.unlearning.multipliers=[25, 50]", "harvest.corpus.retain=x/y"], profile))
    assert changed.train.weight_decay == 0.02 and changed.train.lr == profile.train.lr
    assert changed.eval.unlearning.multipliers == (25.0, 50.0)  # a list read as the config's tuple
    assert changed.eval.unlearning.min_forget_questions == profile.eval.unlearning.min_forget_questions
    assert changed.harvest.corpus.retain == "x/y" and changed.harvest.model == profile.harvest.model


def test_a_change_is_validated_by_its_config_and_a_bad_path_names_the_valid_ones():
    profile = get_profile("tiny")
    with pytest.raises(ValueError, match="lr must be"):
        override(profile, {"train.lr": -1.0})
    with pytest.raises(ValueError, match=r"unknown profile field 'train.learning_rate'; valid fields of train: .*'lr'"):
        override(profile, {"train.learning_rate": 0.1})
    with pytest.raises(ValueError, match=r"expected PATH=VALUE with PATH a field path, one of .*'train.lr'"):
        parse_profile_settings(["train.learning_rate=0.1"], profile)
    with pytest.raises(ValueError, match="train.lr: expected a float"):
        parse_profile_settings(["train.lr=fast"], profile)
    with pytest.raises(ValueError, match="expected PATH=VALUE"):
        parse_profile_settings(["train=1"], profile)  # a whole config is not a value
    for path, reason in NOT_SETTABLE.items():
        with pytest.raises(ValueError, match=re.escape(reason)):
            parse_profile_settings([f"{path}=1"], profile)


def test_a_profile_reads_back_from_its_dict_nested_or_flat():
    for profile in PROFILES.values():
        assert Profile.from_dict(asdict(profile)) == profile
    changed = override(get_profile("embedded"), {"train.steps": 900, "stream.join": "oldest", "d_sae": 640})
    assert Profile.from_dict(asdict(changed)) == changed
    # A Tune experiment started before profiles were made of configs carries the flat fields.
    flat = {"name": "embedded", "d_sae": 640, "target_l0": 64,
            **{name: changed.get(path) for name, path in FLAT_NAMES.items()}}
    assert Profile.from_dict(flat) == changed


def test_the_stream_serves_the_training_batch():
    profile = override(get_profile("embedded"), {"train.batch_size": 512, "activations": "stream"})
    assert profile.stream_config().batch_size == 512
    assert get_profile("embedded").stream_config() is None  # cached activations: no stream


def test_keys_change_with_any_setting_and_only_then():
    embedded = get_profile("embedded")
    base = sweep_context(embedded, "0123456789abcdef")
    assert sweep_context(Profile.from_dict(asdict(embedded)), "0123456789abcdef") == base
    for path, value in (("train.weight_decay", 0.02), ("eval.unlearning.multipliers", (25.0,)),
                        ("bank.candidates_per_domain", 300), ("harvest.shard_ctxs", 64), ("train.lr", 1e-3)):
        assert sweep_context(override(embedded, {path: value}), "0123456789abcdef") != base, path
    # Run settings and verdict declarations are not what a trial computes.
    for change in ({"train.device": "cuda"}, {"train.autocast": "bf16"}, {"seed_looks": 3}):
        assert sweep_context(override(embedded, change), "0123456789abcdef") == base, change
