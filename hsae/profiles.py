"""Profiles: everything about a sweep that is not its searched space, made of the configs it feeds.

A profile holds the real config objects (``harvest``: what activations, ``train``: how each SAE trains, ``stream``:
how a stream serves them, ``eval`` and ``bank``: how an SAE is scored) and states of each only what differs from
that config's defaults; its own fields are the study's (dictionary size, seeds, target L0, the declared headline).
``--set PATH=VALUE`` addresses any field by its path (``train.lr``, ``harvest.model.layer``, ``eval.unlearning.
min_forget_questions``); the flat names of earlier releases (``lr``, ``layer``, ``stream_join``) are accepted and
translated (``FLAT_NAMES``). A trial's key hashes the profile as those flat names (``Profile.key_fields``), so a
results directory written before the profile had this shape keeps its keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

from hsae.activations import HarvestConfig
from hsae.config import TrainConfig
from hsae.convergence import log_every_for
from hsae.corpora import CorpusSpec
from hsae.evaluation.evaluator import EvalConfig
from hsae.evaluation.questions import BankConfig
from hsae.evaluation.unlearning import UnlearningConfig
from hsae.machine import AUTOCAST, RunSettings
from hsae.models import ModelSpec
from hsae.stream import StreamConfig

ACTIVATION_SOURCES = ("cache", "stream")

# Profile fields that say how the verdict reads the rows, not what a trial computes: left out of the sweep
# context, so declaring them (or staging seeds) never retrains a finished trial.
VERDICT_FIELDS = ("equivalence_margin", "max_seeds", "seeds_per_stage", "seed_looks")

# The flat names a profile's fields had before it was made of configs: what ``--set`` and ``get_profile`` still
# accept, and the names a trial's key hashes them under.
FLAT_NAMES: dict[str, str] = {
    "model": "harvest.model.source", "layer": "harvest.model.layer", "harvest_dtype": "harvest.model.dtype",
    "corpus": "harvest.corpus.name", "forget_corpus": "harvest.corpus.forget", "retain_corpus": "harvest.corpus.retain",
    "n_ctxs": "harvest.n_ctxs", "n_eval_ctxs": "harvest.n_eval_ctxs", "ctx_len": "harvest.ctx_len",
    "holdout_fraction": "harvest.holdout_fraction", "forget_fraction": "harvest.forget_fraction",
    **{name: f"train.{name}" for name in (
        "steps", "batch_size", "lr", "log_every", "checkpoint_every", "lr_warmup_steps", "lr_decay_fraction",
        "calibration_fraction", "resample_every", "max_extensions", "extension_fraction")},
    "stream_block_contexts": "stream.block_contexts", "stream_window_blocks": "stream.window_blocks",
    "stream_stall_s": "stream.stall_s", "stream_join": "stream.join",
    "bank_kind": "bank.kind", "wmdp_questions": "bank.wmdp", "mmlu_questions": "bank.mmlu",
    "min_forget_questions": "eval.unlearning.min_forget_questions",
    "min_retain_questions": "eval.unlearning.min_retain_questions",
    "ce_contexts_per_domain": "eval.ce_contexts_per_domain",
}

# Fields a profile does not own: run settings (never part of a trial's key), the trial's own seed, and values derived
# from another field. ``--set`` refuses them with the reason.
NOT_SETTABLE: dict[str, str] = {
    "train.autocast": "precision is a run setting, not part of the study (it never changes a trial's key): use "
                      "--precision {auto,bf16,fp32}",
    "train.device": "the device is a run setting: use --gpus-per-trial",
    "harvest.model.device": "the device is a run setting: use --gpus-per-trial",
    "train.seed": "a trial's seed is its own: use --seeds (42, 43, ...)",
    "stream.batch_size": "a stream serves the training batch: set train.batch_size",
    "name": "a profile's name is chosen with --profile",
}

# Paths whose value may be null (their profile default is None), with the type a non-null value must have.
OPTIONAL_FIELDS: dict[str, type] = {"target_l0": int, "eval_model": str, "harvest.model.layer": int,
                                    "harvest.model.revision": str}


@dataclass(frozen=True)
class Profile:
    """A sweep's fixed part: the configs it feeds and the study's own settings."""

    name: str
    d_sae: int
    harvest: HarvestConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    # SAEBench evaluates a base model's SAEs on its instruction-tuned twin (None: the base model).
    eval_model: str | None = None
    evaluate: bool = True
    # Seeds per configuration (42, 43, ...): intervals need several; --seeds overrides.
    seeds: int = 3
    # Whether evaluation controls out of range fail the sweep (exit 3). Only the tiny test profile says no:
    # a random model knows nothing its controls could remove; its rows still carry controls_ok = false.
    controls_required: bool = True
    # Where training rows come from: "cache" (harvested once to disk, every trial samples the same rows) or
    # "stream" (hsae.stream: computed as trials consume them; memory bounded by the window whatever the
    # budget). --tokens beyond the cache's rows switches to "stream" unless --activations says otherwise.
    activations: str = "cache"
    # The held-out L0 every trial trains to (docs/training.md, "Target L0"), unless its block sets target_l0:
    # L1 variants calibrate their sparsity coefficient to it, TopK variants take k = target_l0. None: off.
    target_l0: int | None = None
    # The metric the verdict's claims are made on, declared before the run (docs/evaluation.md, "Headline");
    # every other candidate is secondary. Recorded on each trial row.
    headline_metric: str = "frontier_area"
    # The headline's equivalence margin, declared with it (docs/evaluation.md, "Equivalence margin"): an arm whose
    # difference from relu is shown to lie within ±margin is "equivalent to relu". Recorded on each trial row.
    equivalence_margin: float = 0.05
    # Seeds added in stages until each arm is decided (--until-decided; docs/evaluation.md, "Seeds in stages"): the
    # first look at `seeds`, then `seeds_per_stage` more for every undecided arm (and relu), up to `max_seeds`.
    # seed_looks is the number of looks the run declared (1 without stages): each spends 0.05 / seed_looks.
    max_seeds: int = 9
    seeds_per_stage: int = 2
    seed_looks: int = 1

    def __post_init__(self) -> None:
        if not (isinstance(self.equivalence_margin, (int, float)) and self.equivalence_margin > 0):
            raise ValueError(f"equivalence_margin must be > 0 (a difference in the headline's units), got "
                             f"{self.equivalence_margin!r}")
        if self.seed_looks < 1 or self.seeds_per_stage < 1:
            raise ValueError(f"seed_looks and seeds_per_stage must be >= 1, got {self.seed_looks}, "
                             f"{self.seeds_per_stage}")
        if self.activations not in ACTIVATION_SOURCES:
            raise ValueError(f"activations must be one of {list(ACTIVATION_SOURCES)}, got {self.activations!r}")
        if self.stream.batch_size != self.train.batch_size:  # one fact: a stream serves the training batch
            object.__setattr__(self, "stream", replace(self.stream, batch_size=self.train.batch_size))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Profile:
        """A profile from ``dataclasses.asdict`` of one, nested or (written before profiles were made of configs, a
        Tune experiment resumed now) flat, on the declared profile of its name."""
        data = dict(data)
        name = data.pop("name")
        template = PROFILES.get(name, PROFILES["tiny"])
        if "extension_steps" in data:  # written when extensions were a step count, before they were a fraction
            legacy = data.pop("extension_steps")
            data.setdefault("extension_fraction", legacy / data["steps"] if legacy else 0.0)
        return replace(override(template, _leaves(template, data)), name=name)

    def key_fields(self) -> dict[str, Any]:
        """What a sweep's key hashes of the profile: its own fields but the verdict's (``VERDICT_FIELDS``), every
        ``FLAT_NAMES`` field under its flat name (extensions as the steps one adds, what the trainer is given), and
        any other config field only where it differs from the declared profile of this name, so that a profile
        unchanged since its fields were flat keeps its trials' keys."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in VERDICT_FIELDS and f.name not in CONFIGS}
        out.update({flat: self.get(path) for flat, path in FLAT_NAMES.items() if flat != "extension_fraction"})
        out["extension_steps"] = self.train.steps_per_extension()
        declared = PROFILES.get(self.name)
        ignored = {*FLAT_NAMES.values(), *NOT_SETTABLE, "train.extension_steps"}
        for path, value in _config_leaves(self):
            if path not in ignored and (declared is None or value != declared.get(path)):
                out[path] = value
        return out

    def get(self, path: str) -> Any:
        """The value at a field path (``train.lr``) or flat name (``lr``)."""
        value: Any = self
        for part in FLAT_NAMES.get(path, path).split("."):
            value = getattr(value, part)
        return value

    def cache_rows(self) -> int:
        """Training rows a harvest of this profile holds (contexts x tokens after the start token)."""
        return self.harvest.n_ctxs * (self.harvest.ctx_len - 1)

    def stream_config(self) -> StreamConfig | None:
        return self.stream if self.activations == "stream" else None

    def train_config(self, seed: int, settings: RunSettings | None = None) -> TrainConfig:
        """What one trial of ``seed`` is given. Device "auto": the GPU Ray gave the trial (--gpus-per-trial), else
        the CPU. Precision is the run's (RunSettings), not the profile's: the trainer resolves "auto" on its
        device (hsae.machine). The warm-up is at most a tenth of the steps and the log interval at most 5% of them
        (so the convergence rule recomputes from the curves at any --steps); a stream serves each trial a fixed
        number of batches, so a streamed trial trains its budget (no extensions)."""
        precision = (settings or RunSettings()).precision
        train = self.train.resolved_extensions()
        return replace(train, seed=seed, lr_warmup_steps=min(train.lr_warmup_steps, train.steps // 10),
                       log_every=min(train.log_every, log_every_for(train.steps)), device="auto",
                       autocast=AUTOCAST.get(precision, precision),
                       max_extensions=train.max_extensions if self.activations == "cache" else 0)

    def trial_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """A space block's parameters with the profile's ``target_l0`` filled in where the block sets none."""
        if self.target_l0 is None or "target_l0" in params:
            return dict(params)
        return {**params, "target_l0": self.target_l0}


CONFIGS = ("harvest", "train", "stream", "eval", "bank")


PROFILES: dict[str, Profile] = {
    # The paper's protocol on Gemma-2-2B (GPU cluster): 2048 contexts x 128 tokens, 1000 steps x 2048 at lr 3e-4
    # (TrainConfig's defaults); WMDP / MMLU letter questions, which no training corpus contains; 10% of the
    # corpus documents are still held out for feature selection, control directions and CE text.
    "real": Profile(name="real", d_sae=16384, eval_model="google/gemma-2-2b-it",
                    harvest=HarvestConfig(model=ModelSpec("google/gemma-2-2b", layer=19), corpus=CorpusSpec("wmdp")),
                    train=TrainConfig(checkpoint_every=100), bank=BankConfig(kind="letter")),
    # What runs here offline on 2 CPU cores: Gemma-3-270M layer 13 (same relative depth), 2048 contexts
    # (260k training tokens, ~6 min to harvest), a 2x dictionary, 4500 steps x 1024 at lr 2e-3 with warm-up and
    # no decay; every variant trained to a held-out L0 of 64 (its sparsity coefficient calibrated over the first
    # 80% of the steps and frozen for the last 20%; dead latents resampled every 250 steps meanwhile) and judged
    # converged on those last 20%: one fixed objective at a constant rate (docs/training.md); a trial that is not
    # trains on, a third of its budget (1,500 steps) at a time, at most twice. 40% of each domain's articles are
    # held out (the cloze questions come from them), which leaves the forget corpus 721 training contexts: 35% of
    # the 2048.
    "embedded": Profile(name="embedded", d_sae=1280, target_l0=64,
                        harvest=HarvestConfig(model=ModelSpec("embedded", layer=13), corpus=CorpusSpec("embedded"),
                                              n_eval_ctxs=256, holdout_fraction=0.4, forget_fraction=0.35),
                        train=TrainConfig(steps=4500, batch_size=1024, lr=2e-3, log_every=75, checkpoint_every=300,
                                          lr_warmup_steps=50, calibration_fraction=0.8, resample_every=250,
                                          extension_fraction=1 / 3, max_extensions=2),
                        eval=EvalConfig(ce_contexts_per_domain=2)),
    # Unit/integration tests: a random tiny Gemma-2 on a toy corpus, seconds per trial; every candidate question
    # kept (its bank is small).
    "tiny": Profile(name="tiny", d_sae=256, seeds=1, controls_required=False,
                    harvest=HarvestConfig(model=ModelSpec("tiny", layer=2), corpus=CorpusSpec("toy"), n_ctxs=48,
                                          n_eval_ctxs=8, ctx_len=32, holdout_fraction=0.3),
                    train=TrainConfig(steps=40, batch_size=256, lr=3e-3, log_every=5, checkpoint_every=10),
                    stream=StreamConfig(block_contexts=16),
                    eval=EvalConfig(unlearning=UnlearningConfig(min_forget_questions=10, min_retain_questions=10),
                                    ce_contexts_per_domain=2),
                    bank=BankConfig(max_forget=1000, max_retain=1000)),
}


def get_profile(name: str, **overrides: Any) -> Profile:
    """The declared profile ``name`` with ``overrides`` (paths or flat names; None leaves a field as declared)."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; valid profiles: {sorted(PROFILES)}")
    return override(PROFILES[name], {k: v for k, v in overrides.items() if v is not None})


def override(profile: Profile, settings: Mapping[str, Any]) -> Profile:
    """``profile`` with each field path (or flat name) of ``settings`` set, each config rebuilt once (so its
    validation sees every change together)."""
    return _updated(profile, {FLAT_NAMES.get(k, k): v for k, v in settings.items()}, "")


def _updated(obj: Any, changes: dict[str, Any], prefix: str) -> Any:
    own: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    names = [f.name for f in dataclasses.fields(obj) if f.init]
    for path, value in changes.items():
        head, _, rest = path.partition(".")
        if head not in names or (rest and not dataclasses.is_dataclass(getattr(obj, head))):
            where = f" of {prefix[:-1]}" if prefix else ""
            flat = "" if prefix else f" (or a flat name: {sorted(FLAT_NAMES)})"
            raise ValueError(f"unknown profile field {prefix + path!r}; valid fields{where}: {names}{flat}")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            current = getattr(obj, head)
            own[head] = tuple(value) if isinstance(current, tuple) and isinstance(value, list) else value
    for head, sub in nested.items():
        own[head] = _updated(getattr(obj, head), sub, f"{prefix}{head}.")
    if not own:
        return obj
    try:
        return replace(obj, **own)
    except ValueError as exc:  # a config's own check names its field; the path says which config
        raise ValueError(f"{prefix[:-1]}: {exc}" if prefix else str(exc)) from None


def _leaves(template: Any, data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``data`` (an ``asdict`` of ``template``'s type, nested or flat) as {path: value}, descending where the
    template's value is a config."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        current = getattr(template, key, None)
        if isinstance(value, Mapping) and dataclasses.is_dataclass(current):
            out.update(_leaves(current, value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _config_leaves(profile: Profile) -> list[tuple[str, Any]]:
    """(path, value) of every field of the profile's configs, nested configs descended."""
    out: list[tuple[str, Any]] = []

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            elif f.init:
                out.append((prefix + f.name, value))

    for name in CONFIGS:
        walk(getattr(profile, name), f"{name}.")
    return out


def parse_profile_settings(pairs: list[str], profile: Profile) -> dict[str, Any]:
    """``--set PATH=VALUE`` pairs as typed overrides {path: value} of ``profile``'s fields (values read as YAML;
    ``PATH`` a field path such as ``train.lr`` or a flat name such as ``lr``)."""
    out: dict[str, Any] = {}
    valid = settable_paths(profile)
    for pair in pairs:
        name, sep, text = pair.partition("=")
        path = FLAT_NAMES.get(name, name)
        if path in NOT_SETTABLE or name in ("autocast", "precision", "device"):
            reason = NOT_SETTABLE.get(path, NOT_SETTABLE["train.autocast"])
            raise ValueError(f"--set {pair!r}: {reason}")
        if not sep or path not in valid:
            raise ValueError(f"--set {pair!r}: expected PATH=VALUE with PATH a field path, one of "
                             f"{sorted(valid)}, or a flat name, one of {sorted(FLAT_NAMES)}")
        old, value = profile.get(path), yaml.safe_load(text)
        if value is None and path in OPTIONAL_FIELDS:
            out[path] = None
            continue
        expected = type(old) if old is not None else OPTIONAL_FIELDS.get(path, str)
        if isinstance(old, tuple) and isinstance(value, list):
            value = tuple(value)
        ok = (isinstance(value, expected) and not (expected is int and isinstance(value, bool))) or (
            expected is float and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            raise ValueError(f"--set {name}: expected a {expected.__name__} (the profile has {old!r}), got {text!r}")
        out[path] = float(value) if expected is float else value
    return out


def settable_paths(profile: Profile) -> list[str]:
    """Every field path ``--set`` takes."""
    own = [f.name for f in dataclasses.fields(profile) if f.name not in CONFIGS]
    return [p for p in own + [path for path, _ in _config_leaves(profile)] if p not in NOT_SETTABLE]
