"""Sweep spaces and profiles: parsed and validated before any compute starts (no Ray here).

A space file (``tune/spaces/<name>.yaml``) lists blocks, each a variant with parameter values:

    description: alpha swept 0.1 -> 0.4 (the paper's linear sweep)
    scheduler: fifo            # fifo | asha (default fifo, see docs/sweeps.md)
    trials:
      - variant: fixed_ortho
        params:
          alpha: {grid: [0.1, 0.2, 0.3, 0.4]}   # grid: every value (grid search)
          n_groups: 32                          # a plain value: fixed
      - variant: dynamic_hier
        params:
          temperature_init: {loguniform: [0.1, 10.0]}   # sampled (Optuna only)

Grid search expands every block's grid values into a cartesian product; Optuna samples ``uniform``,
``loguniform``, ``int`` and ``choice`` ranges (and takes grid lists as choices). Every expanded
configuration is validated through ``SAEConfig`` before the sweep starts.

A grid space of several configurations declares its ``reference`` (the configuration every other is compared
with: the ablation's null setting, ``relu`` for the main study) and may declare a ``trend`` along ordered
grid parameters (docs/sweeps.md, "Reference and trend"):

    reference: {variant: fixed_ortho, params: {alpha: 0.0}}   # or a bare variant name: reference: relu
    trend: [alpha]
"""

from __future__ import annotations

import importlib.util
import itertools
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from hsae.config import SAEConfig, TrainConfig
from hsae.convergence import log_every_for
from hsae.external import ExternalArm, ExternalSAEError, is_external
from hsae.external import parse_block as parse_external_block
from hsae.keys import content_key
from hsae.machine import AUTOCAST, RunSettings
from hsae.models import check_dtype_name
from hsae.stream import StreamConfig, check_join_policy


def default_spaces_dir() -> Path:
    """``tune/spaces`` of the installed (or checked-out) project."""
    spec = importlib.util.find_spec("tune")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]) / "spaces"
    return Path(__file__).resolve().parent.parent / "tune" / "spaces"


# Shipped spaces that ``--space all`` leaves out, because they are not ablations: ``aa`` is the verdict's A/A test
# (relu against replicates of itself: it checks the verdict, not a hypothesis), and ``frontier`` trains every arm at
# four target L0s, a sparsity frontier at four times an ablation's compute (the ablations compare arms at the
# profile's one target L0). Each runs by its own name.
NOT_IN_ALL = ("aa", "frontier")


def shipped_spaces(spaces_dir: Path | None = None) -> list[str]:
    """The names of the shipped space files (``tune/spaces/*.yaml``), sorted: the one list of spaces."""
    return sorted(p.stem for p in (spaces_dir or default_spaces_dir()).glob("*.yaml"))


def all_spaces(spaces_dir: Path | None = None) -> list[str]:
    """What ``--space all`` runs: every shipped space but ``NOT_IN_ALL``."""
    return [name for name in shipped_spaces(spaces_dir) if name not in NOT_IN_ALL]


SAMPLERS = ("grid", "uniform", "loguniform", "int", "choice")
SCHEDULERS = ("asha", "fifo")
ACTIVATION_SOURCES = ("cache", "stream")


class SpaceError(ValueError):
    """A malformed or invalid space file; the message names the file and the field."""


# Profile fields that say how the verdict reads the rows, not what a trial computes: left out of the sweep
# context, so declaring them (or staging seeds) never retrains a finished trial.
VERDICT_FIELDS = ("equivalence_margin", "max_seeds", "seeds_per_stage", "seed_looks")


@dataclass(frozen=True)
class Profile:
    """Everything about a sweep that is not the searched space: model, data, sizes, budget."""

    name: str
    model: str
    layer: int
    corpus: str
    n_ctxs: int
    n_eval_ctxs: int
    ctx_len: int
    d_sae: int
    steps: int
    batch_size: int
    lr: float
    log_every: int
    checkpoint_every: int
    bank_kind: str = "cloze"
    min_forget_questions: int = 150
    min_retain_questions: int = 300
    ce_contexts_per_domain: int = 4
    # Where the real profile's data come from: hub ids, or local copies in the hub's layout (hsae.hub).
    # SAEBench evaluates a base model's SAEs on its instruction-tuned twin (None: the base model).
    eval_model: str | None = None
    forget_corpus: str = "cais/wmdp-bio-forget-corpus"
    retain_corpus: str = "Salesforce/wikitext"
    wmdp_questions: str = "cais/wmdp"
    mmlu_questions: str = "cais/mmlu"
    evaluate: bool = True
    # Seeds per configuration (42, 43, ...): intervals need several; --seeds overrides.
    seeds: int = 3
    # Fraction of each domain's documents held out from SAE training for evaluation (questions, feature
    # selection, control directions, CE text).
    holdout_fraction: float = 0.1
    # Share of training contexts drawn from the forget corpus (the rest from retain).
    forget_fraction: float = 0.5
    # Whether evaluation controls out of range fail the sweep (exit 3). Only the tiny test profile says no:
    # a random model knows nothing its controls could remove; its rows still carry controls_ok = false.
    controls_required: bool = True
    # Learning-rate schedule (TrainConfig): linear warm-up over these steps, linear decay to 0 over the last
    # fraction of the steps.
    lr_warmup_steps: int = 0
    lr_decay_fraction: float = 0.0
    # Where training rows come from: "cache" (harvested once to disk, every trial samples the same rows) or
    # "stream" (hsae.stream: computed as trials consume them; memory bounded by the window whatever the
    # budget). --tokens beyond the cache's rows switches to "stream" unless --activations says otherwise.
    activations: str = "cache"
    stream_block_contexts: int = 256
    stream_window_blocks: int = 4
    stream_stall_s: float = 120.0
    # Where each trial's stream batches start (hsae.stream.JOIN_POLICIES): "first" = batch 0 for every trial,
    # so its data are a function of the step alone; "oldest" = the oldest batch buffered when it starts (no
    # LM pass of its own, but timing decides its data: its rows say stream_join = "oldest").
    stream_join: str = "first"
    # The held-out L0 every trial trains to (docs/training.md, "Target L0"), unless its block sets target_l0:
    # L1 variants calibrate their sparsity coefficient to it, TopK variants take k = target_l0. None: off.
    target_l0: int | None = None
    # TrainConfig.calibration_fraction and resample_every (dead latents resampled; 0: never).
    calibration_fraction: float = 0.6
    resample_every: int = 0
    # Extensions (docs/training.md, "Extensions"): a trial the convergence rule fails trains on, at most
    # ``max_extensions`` times, each time ``extension_fraction`` of its budget (``extension_steps``: the one rule,
    # so --steps N trains N to N x (1 + max_extensions x extension_fraction) steps; max_extensions=0 turns them
    # off). Cached activations only: a stream serves each trial a fixed number of batches, so a streamed trial
    # trains its budget (its row says cfg_max_extensions = 0).
    extension_fraction: float = 0.0
    max_extensions: int = 0
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
    # The harvest's dtype (hsae.models.DTYPES, or "auto": bf16 on a GPU that computes it natively, else float32).
    # It changes every activation row, held-out ones included, hence the harvest key; the model that answers the
    # questions and gives CE/KL always runs at "auto" (docs/performance.md, "A bf16 harvest").
    harvest_dtype: str = "auto"

    def __post_init__(self) -> None:
        check_dtype_name("harvest_dtype", self.harvest_dtype)
        if not (isinstance(self.equivalence_margin, (int, float)) and self.equivalence_margin > 0):
            raise ValueError(f"equivalence_margin must be > 0 (a difference in the headline's units), got "
                             f"{self.equivalence_margin!r}")
        if self.seed_looks < 1 or self.seeds_per_stage < 1:
            raise ValueError(f"seed_looks and seeds_per_stage must be >= 1, got {self.seed_looks}, "
                             f"{self.seeds_per_stage}")
        if self.activations not in ACTIVATION_SOURCES:
            raise ValueError(f"activations must be one of {list(ACTIVATION_SOURCES)}, got {self.activations!r}")
        check_join_policy("stream_join", self.stream_join)
        fraction = self.extension_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < math.inf:
            raise ValueError(f"extension_fraction must be a number >= 0 (the share of a trial's steps each extension "
                             f"adds), got {fraction!r}")
        if self.max_extensions and not fraction:
            raise ValueError(f"max_extensions={self.max_extensions} needs extension_fraction > 0 (the share of a "
                             f"trial's steps each extension adds); max_extensions=0 turns extensions off")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        """A profile from ``asdict``; one written before extensions were a fraction of the budget (a Tune experiment
        interrupted then and resumed now) gives its ``extension_steps`` as that fraction of its ``steps``."""
        data = dict(data)
        if "extension_steps" in data:
            legacy = data.pop("extension_steps")
            data.setdefault("extension_fraction", legacy / data["steps"] if legacy else 0.0)
        return cls(**data)

    def extension_steps(self) -> int:
        """The steps one extension adds: ``extension_fraction`` of ``steps``, rounded, at least 1 (0: none). The
        embedded profile's 1/3 of 4,500 is the 1,500 steps it always had."""
        if not self.extension_fraction:
            return 0
        return max(1, round(self.extension_fraction * self.steps))

    def key_fields(self) -> dict[str, Any]:
        """What a sweep's key hashes of the profile: every field but the verdict's (``VERDICT_FIELDS``), the
        extension as its steps (what the trainer is given), so that a profile whose extension steps are unchanged
        keeps its trials' keys."""
        fields = {k: v for k, v in asdict(self).items() if k not in VERDICT_FIELDS}
        del fields["extension_fraction"]
        return {**fields, "extension_steps": self.extension_steps()}

    def cache_rows(self) -> int:
        """Training rows a harvest of this profile holds (contexts x tokens after the start token)."""
        return self.n_ctxs * (self.ctx_len - 1)

    def stream_config(self) -> StreamConfig | None:
        if self.activations != "stream":
            return None
        return StreamConfig(batch_size=self.batch_size, block_contexts=self.stream_block_contexts,
                            window_blocks=self.stream_window_blocks, stall_s=self.stream_stall_s,
                            join=self.stream_join)

    def train_config(self, seed: int, settings: RunSettings | None = None) -> TrainConfig:
        # Device "auto": the GPU Ray gave the trial (--gpus-per-trial), else the CPU. Precision is the run's
        # (RunSettings), not the profile's: the trainer resolves "auto" on its device (hsae.machine). The log
        # interval never exceeds 5% of the steps, so the convergence rule recomputes from the curves at any --steps.
        precision = (settings or RunSettings()).precision
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr, seed=seed,
                           lr_warmup_steps=min(self.lr_warmup_steps, self.steps // 10),
                           lr_decay_fraction=self.lr_decay_fraction,
                           log_every=min(self.log_every, log_every_for(self.steps)),
                           checkpoint_every=self.checkpoint_every, device="auto",
                           autocast=AUTOCAST.get(precision, precision),
                           calibration_fraction=self.calibration_fraction, resample_every=self.resample_every,
                           extension_steps=self.extension_steps(),
                           max_extensions=self.max_extensions if self.activations == "cache" else 0)

    def trial_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """A space block's parameters with the profile's ``target_l0`` filled in where the block sets none."""
        if self.target_l0 is None or "target_l0" in params:
            return dict(params)
        return {**params, "target_l0": self.target_l0}


PROFILES: dict[str, Profile] = {
    # The paper's protocol on Gemma-2-2B (GPU cluster): 2048 contexts x 128 tokens, 1000 steps.
    "real": Profile(name="real", model="google/gemma-2-2b", layer=19, corpus="wmdp", n_ctxs=2048, n_eval_ctxs=64,
                    ctx_len=128, d_sae=16384, steps=1000, batch_size=2048, lr=3e-4, log_every=10,
                    checkpoint_every=100, bank_kind="letter", eval_model="google/gemma-2-2b-it"),
    # WMDP / MMLU questions are test sets that no training corpus contains; 10% of the corpus documents are
    # still held out for feature selection, control directions and CE text.
    # What runs here offline on 2 CPU cores: Gemma-3-270M layer 13 (same relative depth), 2048 contexts
    # (260k training tokens, ~6 min to harvest), a 2x dictionary, 4500 steps x 1024 at lr 2e-3 with warm-up and
    # no decay; every variant trained to a held-out L0 of 64 (its sparsity coefficient calibrated over the first
    # 80% of the steps and frozen for the last 20%; dead latents resampled every 250 steps meanwhile) and judged
    # converged on those last 20%: one fixed objective at a constant rate (docs/training.md); a trial that is not
    # trains on, a third of its budget (1,500 steps) at a time, at most twice. 40% of each domain's articles are
    # held out (the cloze questions come from them), which leaves the forget corpus 721 training contexts: 35% of
    # the 2048.
    "embedded": Profile(name="embedded", model="embedded", layer=13, corpus="embedded", n_ctxs=2048, n_eval_ctxs=256,
                        ctx_len=128, d_sae=1280, steps=4500, batch_size=1024, lr=2e-3, log_every=75,
                        checkpoint_every=300, ce_contexts_per_domain=2, holdout_fraction=0.4, forget_fraction=0.35,
                        lr_warmup_steps=50, lr_decay_fraction=0.0, target_l0=64, calibration_fraction=0.8,
                        resample_every=250, extension_fraction=1 / 3, max_extensions=2),
    # Unit/integration tests: a random tiny Gemma-2 on a toy corpus, seconds per trial.
    "tiny": Profile(name="tiny", model="tiny", layer=2, corpus="toy", n_ctxs=48, n_eval_ctxs=8, ctx_len=32,
                    d_sae=256, steps=40, batch_size=256, lr=3e-3, log_every=5, checkpoint_every=10,
                    min_forget_questions=10, min_retain_questions=10, ce_contexts_per_domain=2, seeds=1,
                    holdout_fraction=0.3, controls_required=False, stream_block_contexts=16),
}


def get_profile(name: str, **overrides: Any) -> Profile:
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; valid profiles: {sorted(PROFILES)}")
    fields = {f for f in asdict(PROFILES[name])}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown profile field(s) {unknown}; valid: {sorted(fields)}")
    return replace(PROFILES[name], **{k: v for k, v in overrides.items() if v is not None})


# Profile fields whose default is None, with the type a --set value must have (null turns them off again).
OPTIONAL_PROFILE_FIELDS: dict[str, type] = {"target_l0": int}


def parse_profile_settings(pairs: list[str], profile: Profile) -> dict[str, Any]:
    """``--set field=value`` pairs as typed overrides of ``profile``'s fields (values read as YAML)."""
    out: dict[str, Any] = {}
    current = asdict(profile)
    for pair in pairs:
        field_name, sep, text = pair.partition("=")
        if field_name in ("autocast", "precision", "device"):
            raise ValueError(f"--set {pair!r}: precision and device are run settings, not part of the study (they "
                             f"never change a trial's key): use --precision {{auto,bf16,fp32}} or --gpus-per-trial")
        if not sep or field_name not in current or field_name == "name":
            raise ValueError(f"--set {pair!r}: expected FIELD=VALUE with FIELD one of "
                             f"{sorted(k for k in current if k != 'name')}")
        value, old = yaml.safe_load(text), current[field_name]
        if value is None and field_name in OPTIONAL_PROFILE_FIELDS:
            out[field_name] = None
            continue
        expected = type(old) if old is not None else OPTIONAL_PROFILE_FIELDS.get(field_name, str)
        ok = (isinstance(value, expected) and not (expected is int and isinstance(value, bool))) or (
            expected is float and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            raise ValueError(f"--set {field_name}: expected a {expected.__name__} (the profile has {old!r}), "
                             f"got {text!r}")
        out[field_name] = float(value) if expected is float else value
    return out


@dataclass(frozen=True)
class Block:
    variant: str
    params: dict[str, Any]
    external: ExternalArm | None = None  # an external arm (hsae.external): SAEs loaded, not trained
    arm: str | None = None  # a label naming this block's arm in the verdict (docs/sweeps.md, "Arms")

    def grid(self) -> list[dict[str, Any]]:
        """The parameters of each configuration of the block's grid (its cartesian product, in file order)."""
        names = list(self.params)
        choices = [v["grid"] if isinstance(v, dict) else [v] for v in self.params.values()]
        return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*choices)]


@dataclass(frozen=True)
class Reference:
    """The configuration a space's other arms are compared with: a variant, the parameter values that single it
    out among the space's configurations, and its arm label (none for an unlabelled block)."""

    variant: str
    params: dict[str, Any] = field(default_factory=dict)
    arm: str = ""

    def matches(self, variant: str, params: dict[str, Any], arm: str | None) -> bool:
        return (variant == self.variant and (arm or "") == self.arm
                and all(k in params and _same_value(params[k], v) for k, v in self.params.items()))

    def as_dict(self) -> dict[str, Any]:
        return {"variant": self.variant, "params": dict(self.params), "arm": self.arm}


def _same_value(a: Any, b: Any) -> bool:
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15) if numbers else a == b


@dataclass(frozen=True)
class Space:
    name: str
    description: str
    scheduler: str
    blocks: tuple[Block, ...]
    source: str = ""
    reference: Reference | None = None  # required of a grid space with >= 2 configurations
    trend: tuple[str, ...] = ()  # ordered grid parameters tested for a trend (>= 3 levels each)

    def configurations(self) -> list[tuple[str, dict[str, Any], str]]:
        """(variant, params, arm label) of every grid configuration, in file order (an external block is one)."""
        return [(b.variant, {}, "") if b.external is not None else (b.variant, params, b.arm or "")
                for b in self.blocks for params in ([{}] if b.external is not None else b.grid())]

    def declaration(self) -> dict[str, Any]:
        """What the report reads of the space, declared before the run (results/spaces/<name>.json)."""
        return {"name": self.name, "description": self.description,
                "reference": None if self.reference is None else self.reference.as_dict(), "trend": list(self.trend)}

    def has_samplers(self) -> bool:
        return any(isinstance(v, dict) and next(iter(v)) != "grid" for b in self.blocks for v in b.params.values())


@dataclass(frozen=True)
class TrialSpec:
    """One concrete trial: what to train, with which seed, on what, and which sweep asks for it.

    ``context`` is the content key of everything outside the space entry that changes the result
    (``sweep_context``: model identity with its weights' hashes, layer, corpus and split, profile and
    training settings), so the same entry on another model or budget is another trial. ``experiment`` and
    ``space`` say where the trial is reported, not what it is: they are not part of its key, so the same
    configuration asked for by two spaces or experiments is one trial, trained once.
    """

    experiment: str
    space: str
    variant: str
    params: dict[str, Any] = field(default_factory=dict)
    seed: int = 42
    context: str = ""
    arm: str = ""  # the block's ``arm:`` label ("" for none); a labelled arm is an independent replicate

    @property
    def key(self) -> str:
        """The trial's id: a content key of ``identity()``, whatever space or experiment asks for it."""
        return content_key(self.identity(), length=16)

    def identity(self) -> dict[str, Any]:
        """What the trial is: variant, parameters, seed, arm label and sweep context (no names)."""
        out = {"variant": self.variant, "params": dict(self.params), "seed": self.seed, "context": self.context}
        return {**out, "arm": self.arm} if self.arm else out

    def legacy_key(self, experiment: str | None = None, space: str | None = None) -> str:
        """The id this trial had before ids were content only (they also hashed the experiment and space
        names): ``experiment`` and ``space`` default to the spec's own. ``hsae.results.ResultsStore.adopt_legacy``
        finds rows written under it and moves them to ``key``."""
        out = {"experiment": self.experiment if experiment is None else experiment,
               "space": self.space if space is None else space, **self.identity()}
        return content_key(out, length=16)

    @property
    def train_seed(self) -> int:
        """The initialisation seed: ``seed``, or for a labelled arm one derived from (seed, arm), so that arms of
        one configuration are independent replicates rather than byte-identical copies (an A/A test). The
        batch order stays ``seed``'s (tune/trainable.py): a seed is one data order for every arm."""
        return self.seed if not self.arm else int(content_key({"seed": self.seed, "arm": self.arm}, length=7), 16)

    def as_dict(self) -> dict[str, Any]:
        """Every field (Tune's trial config; ``TrialSpec(**as_dict())`` gives the spec back)."""
        return {"experiment": self.experiment, "space": self.space, **self.identity()}


def sweep_context(profile: Profile, harvest_key: str) -> str:
    """The key of a sweep's fixed part: the profile (budget, sizes, evaluation) and the activations' key."""
    return content_key({"profile": profile.key_fields(), "activations": harvest_key}, length=16)


def _check_sampler(where: str, name: str, spec: Any) -> None:
    if not isinstance(spec, dict):
        return
    if len(spec) != 1:
        raise SpaceError(f"{where}: parameter {name!r} must be a value or one of {{{', '.join(SAMPLERS)}: ...}}, "
                         f"got {spec!r}")
    kind, arg = next(iter(spec.items()))
    if kind not in SAMPLERS:
        raise SpaceError(f"{where}: parameter {name!r} uses unknown sampler {kind!r}; valid samplers: {list(SAMPLERS)}")
    if kind in ("grid", "choice"):
        if not isinstance(arg, list) or not arg:
            raise SpaceError(f"{where}: {name}.{kind} must be a non-empty list, got {arg!r}")
    else:
        if (not isinstance(arg, list) or len(arg) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in arg)):
            raise SpaceError(f"{where}: {name}.{kind} must be [low, high] numbers, got {arg!r}")
        lo, hi = arg
        if not lo < hi or (kind == "loguniform" and lo <= 0):
            raise SpaceError(f"{where}: {name}.{kind} needs low < high{' and low > 0' if kind == 'loguniform' else ''}"
                             f", got {arg!r}")


def parse_space(name: str, text: str, source: str = "<string>") -> Space:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpaceError(f"{source}: malformed YAML: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("trials"), list) or not doc["trials"]:
        raise SpaceError(f"{source}: a space file needs a non-empty 'trials' list of {{variant, params}} blocks")
    unknown = sorted(set(doc) - set(SPACE_KEYS))
    if unknown:
        raise SpaceError(f"{source}: unknown top-level key(s) {unknown}; valid: {list(SPACE_KEYS)}")
    scheduler = doc.get("scheduler", "fifo")
    if scheduler not in SCHEDULERS:
        raise SpaceError(f"{source}: scheduler {scheduler!r} is not one of {list(SCHEDULERS)}")
    blocks = []
    for i, raw in enumerate(doc["trials"]):
        where = f"{source}: trials[{i}]"
        if isinstance(raw, dict) and set(raw) == {"external"}:
            blocks.append(_external_block(raw["external"], where, source))
            continue
        if not isinstance(raw, dict) or "variant" not in raw:
            raise SpaceError(f"{where}: each block needs a 'variant' (and optional 'params'), or is one 'external' "
                             "arm (docs/sweeps.md, \"External arms\")")
        extra = sorted(set(raw) - {"variant", "params", "arm"})
        if extra:
            raise SpaceError(f"{where}: unknown key(s) {extra}; valid: ['variant', 'params', 'arm']")
        if "arm" in raw and not (isinstance(raw["arm"], str) and raw["arm"].strip()):
            raise SpaceError(f"{where}: 'arm' must be a non-empty name, got {raw['arm']!r}")
        params = raw.get("params") or {}
        if not isinstance(params, dict):
            raise SpaceError(f"{where}: 'params' must be a mapping, got {params!r}")
        for pname, spec in params.items():
            _check_sampler(where, pname, spec)
        blocks.append(Block(str(raw["variant"]), dict(params), arm=raw.get("arm")))
    space = Space(name, str(doc.get("description", "")), scheduler, tuple(blocks), source)
    return replace(space, reference=_reference(doc.get("reference"), space), trend=_trend(doc.get("trend"), space))


SPACE_KEYS = ("description", "scheduler", "reference", "trend", "trials")
REFERENCE_HELP = ("declare the configuration every other arm is compared with, e.g. 'reference: relu' or "
                  "'reference: {variant: fixed_ortho, params: {alpha: 0.0}}' (docs/sweeps.md, \"Reference and trend\")")


def _reference(raw: Any, space: Space) -> Reference | None:
    """The space's ``reference``: required of a grid space of >= 2 configurations, matching exactly one."""
    where = f"{space.source}: space {space.name!r}"
    if space.has_samplers():
        if raw is not None:
            raise SpaceError(f"{where}: 'reference' is for grid spaces (a search compares no arms)")
        return None
    configs = space.configurations()
    if raw is None:
        if len(configs) >= 2:
            raise SpaceError(f"{where} has {len(configs)} configurations but no 'reference': {REFERENCE_HELP}")
        return None
    if isinstance(raw, str):
        raw = {"variant": raw}
    if not isinstance(raw, dict) or "variant" not in raw or set(raw) - {"variant", "params", "arm"} \
            or not isinstance(raw.get("params") or {}, dict):
        raise SpaceError(f"{where}: 'reference' must be a variant name or {{variant, params, arm}}, got {raw!r}")
    ref = Reference(str(raw["variant"]), dict(raw.get("params") or {}), str(raw.get("arm") or ""))
    # Arms are compared within a target L0 (the frontier space's verdict is one per target): one match per target.
    targets = {str(p.get("target_l0")) for _, p, _ in configs}
    exact = [c for c in configs if ref.matches(*c) and set(c[1]) == set(ref.params)]  # relu: relu at its defaults
    found = [str(c[1].get("target_l0")) for c in (exact or [c for c in configs if ref.matches(*c)])]
    if sorted(found) != sorted(targets):
        listed = "; ".join(f"{v} {p}" + (f" arm {a}" if a else "") for v, p, a in configs)
        raise SpaceError(f"{where}: 'reference' {raw!r} matches {len(found)} of its configurations, not exactly one"
                         f"{' per target L0' if len(targets) > 1 else ''} (its configurations: {listed})")
    return ref


def _trend(raw: Any, space: Space) -> tuple[str, ...]:
    """The space's ``trend`` parameters: grid parameters with >= 3 levels (two levels are one comparison)."""
    where = f"{space.source}: space {space.name!r}"
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw) or len(set(raw)) != len(raw):
        raise SpaceError(f"{where}: 'trend' must be a list of distinct parameter names, got {raw!r}")
    levels = {p: set() for p in raw}
    for _, params, _ in space.configurations() if not space.has_samplers() else []:
        for p in raw:
            if isinstance(params.get(p), (int, float)) and not isinstance(params.get(p), bool):
                levels[p].add(float(params[p]))
    for p, seen in levels.items():
        if len(seen) < 3:
            raise SpaceError(f"{where}: 'trend' parameter {p!r} takes {len(seen)} numeric grid level(s) here; a "
                             f"trend needs >= 3 (two levels are one comparison, tested against the reference)")
    return tuple(raw)


def _external_block(raw: Any, where: str, source: str) -> Block:
    """An ``external:`` block; its relative paths are relative to the space file's folder."""
    base = Path(source).resolve().parent if Path(source).is_file() else Path.cwd()
    try:
        arm = parse_external_block(raw, where, base)
    except ExternalSAEError as exc:
        raise SpaceError(str(exc)) from exc
    return Block(arm.variant, {}, arm)


def load_space(name: str, spaces_dir: Path | None = None) -> Space:
    """A space by name (``tune/spaces/<name>.yaml``) or by the path of a YAML file of your own."""
    if name.endswith((".yaml", ".yml")):
        path = Path(name)
        if not path.is_file():
            raise SpaceError(f"space file {name!r} does not exist")
        return parse_space(path.stem, path.read_text(), str(path))
    directory = spaces_dir or default_spaces_dir()
    available = shipped_spaces(directory)
    if name not in available:
        raise SpaceError(f"unknown space {name!r}; valid spaces: {available + ['all']}")
    path = directory / f"{name}.yaml"
    return parse_space(name, path.read_text(), str(path))


def grid_trials(space: Space, experiment: str, seeds: list[int], context: str = "") -> list[TrialSpec]:
    """Every grid configuration x seed, seed by seed (file order within a seed); sampler entries are refused
    (grid search only). Seed-major, so trials running at once are different configurations: they finish at
    different times, and their evaluations do not all queue at once. The driver then runs each seed's trials
    longest first (tune/ablate.py, ``trial_order``)."""
    if space.has_samplers():
        raise SpaceError(f"{space.source}: space {space.name!r} has sampled parameters: use --search optuna")
    out = []
    for block in space.blocks:
        if block.external is not None:  # one trial per SAE, seeds 42, 43, ... in order (not --seeds)
            out += [TrialSpec(experiment, space.name, block.variant, src.params(), seed, context)
                    for seed, src in block.external.seeded()]
            continue
        out += [TrialSpec(experiment, space.name, block.variant, params, seed, context, block.arm or "")
                for params in block.grid() for seed in seeds]
    return sorted(out, key=lambda t: t.seed)  # stable: file order within a seed


def validate_trials(trials: list[TrialSpec], profile: Profile, d_in: int) -> None:
    """Build every SAEConfig now, so a bad value fails before Ray starts; name the trial that is wrong."""
    for t in trials:
        if is_external(t.variant):  # checked against the model by hsae.external.check_matches
            continue
        try:
            SAEConfig(t.variant, d_in, profile.d_sae, t.params)
        except ValueError as exc:
            raise SpaceError(f"space {t.space!r}, variant {t.variant!r}, params {t.params}: {exc}") from exc
