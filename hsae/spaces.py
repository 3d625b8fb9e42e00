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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from hsae.config import SAEConfig
from hsae.external import ExternalArm, ExternalSAEError, is_external
from hsae.external import parse_block as parse_external_block
from hsae.keys import content_key
from hsae.profiles import Profile


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


class SpaceError(ValueError):
    """A malformed or invalid space file; the message names the file and the field."""


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
                and all(k in params and same_value(params[k], v) for k, v in self.params.items()))

    def as_dict(self) -> dict[str, Any]:
        return {"variant": self.variant, "params": dict(self.params), "arm": self.arm}


def same_value(a: Any, b: Any) -> bool:
    """Whether two parameter values are one: numbers within float round-off (a value read back from a row is a
    float), anything else (booleans included) by its text."""
    if not any(isinstance(x, (bool, np.bool_)) for x in (a, b)):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
        except (TypeError, ValueError):
            pass
    return str(a) == str(b)


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
