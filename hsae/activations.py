"""Harvest layer-L activations once, keep them on disk, serve them as arrays.

A harvest is keyed by a content hash of everything that determines its numbers (model identity,
layer, corpus content, ctx_len, n_ctxs, dtypes, seed, split). Under ``<cache>/activations/<key>/``:

- ``tokens_<split>.npy`` / ``domains_<split>.npy``: the packed contexts and their domains;
- ``<split>_<i>.npy`` + ``<split>_<i>.json``: activation shard i (attention-sink rows removed, see
  ``sink_rows``) and its sidecar (checksums, rows, rows dropped as outliers); the sidecar is written
  after the shard, so a shard without a matching
  sidecar was never finished and is rebuilt, as is one whose checksum does not match (the harvester
  prints which shard, which file and why: ``ActivationCache.shard_problem``);
- ``<split>_<i>.labels.npy`` / ``<split>_<i>.tokens.npy``: the domain label and token id of every row;
- ``manifest.json``: written last, for humans and quick metadata.

Every file is written to a temp name and renamed, so nothing half-written is ever read as complete.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hsae.atomic import atomic_file, atomic_write_text
from hsae.checks import check_positive_int
from hsae.corpora import (
    HELDOUT_ROLES,
    CorpusSpec,
    corpus_identity,
    heldout_indices,
    heldout_roles,
    load_corpus,
    pack_contexts,
    split_documents,
)
from hsae.keys import content_key, file_sha256
from hsae.models import (
    LoadedModel,
    ModelInfo,
    ModelSpec,
    cache_root,
    describe_model,
    load_model,
    load_tokenizer,
    spec_identity,
    stopped_forward,
    with_layer,
)
from hsae.progress import eta_text, format_duration, rate_text

STORE_DTYPES = {"float32": np.float32, "float16": np.float16}
SPLITS = ("train", "eval")
# 2: documents split per domain (corpora.heldout_indices); 3: outlier rows dropped; 4: held-out contexts packed
# per document role (select / test), each row's context recorded
FORMAT_VERSION = 4
# A context's role, as stored (``roles_<split>.npy``): train contexts, and the held-out ones packed from "select"
# or from "test" documents only (corpora.heldout_roles), so no select context holds a token of a test document.
CONTEXT_ROLES = ("train", *HELDOUT_ROLES)
# A row whose norm exceeds this many times the shard's median row norm is an attention sink (docs/training.md).
OUTLIER_FACTOR = 10.0
# The reason ``ActivationCache.shard_problem`` gives for a shard no harvest has started: work, not a repair.
NOT_HARVESTED = "not harvested yet"


@dataclass(frozen=True)
class HarvestConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    corpus: CorpusSpec = field(default_factory=CorpusSpec)
    ctx_len: int = 128
    n_ctxs: int = 2048
    n_eval_ctxs: int = 64
    store_dtype: str = "float32"
    seed: int = 42
    forget_fraction: float = 0.5
    holdout_fraction: float = 0.1  # of each domain's documents, held out for evaluation
    shard_ctxs: int = 128
    forward_batch: int = 8
    outlier_factor: float = OUTLIER_FACTOR

    def __post_init__(self) -> None:
        if self.model.layer is None:  # resolved once, here: the cache key and every reader need it
            object.__setattr__(self, "model", with_layer(self.model))
        check_positive_int("ctx_len", self.ctx_len, minimum=2)
        check_positive_int("n_ctxs", self.n_ctxs)
        check_positive_int("n_eval_ctxs", self.n_eval_ctxs, minimum=2)  # select and test contexts, one each
        check_positive_int("shard_ctxs", self.shard_ctxs)
        check_positive_int("forward_batch", self.forward_batch)
        if not isinstance(self.outlier_factor, (int, float)) or self.outlier_factor <= 1:
            raise ValueError(f"outlier_factor must be a number > 1 (times the median row norm), "
                             f"got {self.outlier_factor!r}")
        if self.store_dtype not in STORE_DTYPES:
            raise ValueError(f"unknown store_dtype {self.store_dtype!r}; valid: {list(STORE_DTYPES)}")
        for name in ("forget_fraction", "holdout_fraction"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")

    def n_contexts(self, split: str) -> int:
        return self.n_ctxs if split == "train" else self.n_eval_ctxs

    def n_shards(self, split: str) -> int:
        return -(-self.n_contexts(split) // self.shard_ctxs)


def harvest_key(cfg: HarvestConfig) -> str:
    doc = {
        "version": FORMAT_VERSION,
        "model": spec_identity(cfg.model),
        "layer": cfg.model.layer,
        "corpus": corpus_identity(cfg.corpus),
        **{k: v for k, v in asdict(cfg).items() if k not in ("model", "corpus", "shard_ctxs", "forward_batch")},
        "shard_ctxs": cfg.shard_ctxs,
    }
    return content_key(doc)


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_file(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


@dataclass
class Shard:
    x: np.ndarray  # (rows, d) activations, position 0 and outlier rows excluded
    labels: np.ndarray  # (rows,) int8 domain of each token
    tokens: np.ndarray  # (rows,) int64 token id of each row (lines labels up with their text)
    contexts: np.ndarray  # (rows,) int64 index of each row's context in its split (tokens_<split>.npy)
    outliers: int = 0  # rows dropped by the outlier rule


def cache_dir(key: str, root: Path | None = None) -> Path:
    """Where the harvest with ``key`` (``harvest_key``) lives; its ``manifest.json`` marks it complete."""
    return (root or cache_root()) / "activations" / key


class ActivationCache:
    """The on-disk store of one harvest (one key). Reading never returns a shard that fails its checksum."""

    def __init__(self, cfg: HarvestConfig, root: Path | None = None) -> None:
        self.cfg = cfg
        self.key = harvest_key(cfg)
        self.dir = cache_dir(self.key, root)
        self.dir.mkdir(parents=True, exist_ok=True)

    def shard_path(self, split: str, i: int) -> Path:
        return self.dir / f"{split}_{i:05d}.npy"

    def _sidecar(self, split: str, i: int) -> Path:
        return self.dir / f"{split}_{i:05d}.json"

    def _labels_path(self, split: str, i: int) -> Path:
        return self.dir / f"{split}_{i:05d}.labels.npy"

    def _tokens_path(self, split: str, i: int) -> Path:
        return self.dir / f"{split}_{i:05d}.tokens.npy"

    def _files(self, split: str, i: int) -> dict[str, Path]:
        return {"sha256": self.shard_path(split, i), "labels_sha256": self._labels_path(split, i),
                "tokens_sha256": self._tokens_path(split, i),
                "contexts_sha256": self.dir / f"{split}_{i:05d}.contexts.npy"}

    def shard_problem(self, split: str, i: int) -> str | None:
        """What is wrong with shard ``i`` of ``split``, in words naming the shard and the file; None if it is
        valid (every file present and matching the checksums its sidecar recorded)."""
        reason = self._problem(split, i)
        return None if reason is None else f"{split} shard {i + 1}/{self.cfg.n_shards(split)}: {reason}"

    def shard_is_valid(self, split: str, i: int) -> bool:
        return self._problem(split, i) is None

    def _problem(self, split: str, i: int) -> str | None:
        """The reason alone (``NOT_HARVESTED`` for a shard never started: not a repair)."""
        side, files = self._sidecar(split, i), self._files(split, i)
        if not side.is_file():
            if not any(p.is_file() for p in files.values()):
                return NOT_HARVESTED
            return (f"its sidecar {side.name} is missing (the harvest stopped before the shard was finished, "
                    "or the sidecar was deleted)")
        try:
            meta = json.loads(side.read_text())
            recorded = {k: meta[k] for k in files}
        except (ValueError, KeyError, TypeError, OSError) as exc:
            return f"sidecar {side.name} unreadable ({type(exc).__name__}: {exc})"
        for k, path in files.items():
            if not path.is_file():
                return f"{path.name} is missing"
            try:
                if recorded[k] != file_sha256(path):
                    return f"checksum of {path.name} does not match its sidecar {side.name} (file changed or truncated)"
            except OSError as exc:
                return f"{path.name} cannot be read ({exc})"
        return None

    def write_shard(self, split: str, i: int, shard: Shard) -> None:
        self._sidecar(split, i).unlink(missing_ok=True)
        arrays = (shard.x, shard.labels, shard.tokens, shard.contexts)
        for array, path in zip(arrays, self._files(split, i).values(), strict=True):
            _atomic_save_npy(path, array)
        meta = {k: file_sha256(p) for k, p in self._files(split, i).items()}
        meta.update(rows=int(shard.x.shape[0]), outliers=int(shard.outliers))
        atomic_write_text(self._sidecar(split, i), json.dumps(meta))

    def read_shard(self, split: str, i: int) -> Shard:
        x, labels, tokens, contexts = (np.load(p) for p in self._files(split, i).values())
        outliers = int(json.loads(self._sidecar(split, i).read_text()).get("outliers", 0))
        return Shard(x=x, labels=labels, tokens=tokens, contexts=contexts, outliers=outliers)

    def contexts(self, split: str) -> tuple[np.ndarray, np.ndarray] | None:
        tok, dom = self.dir / f"tokens_{split}.npy", self.dir / f"domains_{split}.npy"
        if tok.is_file() and dom.is_file() and self.context_roles(split) is not None:
            try:
                tokens, domains = np.load(tok), np.load(dom)
                if tokens.shape == (self.cfg.n_contexts(split), self.cfg.ctx_len) and domains.shape == tokens.shape[:1]:
                    return tokens, domains
            except (ValueError, OSError):
                pass
        return None

    def context_roles(self, split: str) -> np.ndarray | None:
        """Each context's document role (``CONTEXT_ROLES`` names); None when not (validly) written yet."""
        try:
            roles = read_context_roles(self.dir, split)
        except (ValueError, OSError):
            return None
        return roles if roles.shape == (self.cfg.n_contexts(split),) else None

    def write_contexts(self, split: str, tokens: np.ndarray, domains: np.ndarray, roles: np.ndarray) -> None:
        codes = np.asarray([CONTEXT_ROLES.index(r) for r in roles], dtype=np.int8)
        _atomic_save_npy(self.dir / f"roles_{split}.npy", codes)
        _atomic_save_npy(self.dir / f"tokens_{split}.npy", tokens)
        _atomic_save_npy(self.dir / f"domains_{split}.npy", domains)


def read_context_roles(directory: Path, split: str) -> np.ndarray:
    """The role names of ``split``'s contexts from ``roles_<split>.npy`` in a harvest directory."""
    codes = np.load(directory / f"roles_{split}.npy")
    if codes.ndim != 1 or not np.isin(codes, np.arange(len(CONTEXT_ROLES))).all():
        raise ValueError(f"{directory / f'roles_{split}.npy'}: role codes must be 0..{len(CONTEXT_ROLES) - 1}")
    return np.asarray(CONTEXT_ROLES, dtype=object)[codes]


def shard_context_slice(cfg: HarvestConfig, i: int, n_contexts: int) -> slice:
    return slice(i * cfg.shard_ctxs, min((i + 1) * cfg.shard_ctxs, n_contexts))


def sink_rows(x: np.ndarray, factor: float) -> np.ndarray:
    """Rows that are attention sinks by the rule: norm above ``factor`` x the median row norm of ``x``.

    Some models park a huge activation on a few tokens (SmolLM2-135M: 1% of tokens carry 95% of the centred
    variance, norms up to 155x the median); kept, they dominate every reconstruction metric.
    """
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    return norms > factor * np.median(norms)


@dataclass
class Harvest:
    key: str
    dir: Path
    d_model: int
    shards: dict[str, list[Shard]]
    forwards: int
    harvest_s: float
    tokens_per_s: float

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        return (np.concatenate([s.x for s in self.shards[split]]),
                np.concatenate([s.labels for s in self.shards[split]]))

    def outliers(self, split: str) -> int:
        """Rows of ``split`` dropped by the outlier rule (``sink_rows``)."""
        return int(sum(s.outliers for s in self.shards[split]))

    def token_ids(self, split: str) -> np.ndarray:
        """The token id of every row of ``split`` (lines rows up with their text)."""
        return np.concatenate([s.tokens for s in self.shards[split]])

    def row_contexts(self, split: str) -> np.ndarray:
        """The context (index into ``tokens_<split>.npy``) of every row of ``split``."""
        return np.concatenate([s.contexts for s in self.shards[split]])

    def row_roles(self, split: str) -> np.ndarray:
        """The document role ("train" / "select" / "test") of every row of ``split``: its context's role."""
        return read_context_roles(self.dir, split)[self.row_contexts(split)]


class Harvester:
    """Builds or reads a harvest. The model is loaded only if some shard has to be computed."""

    def __init__(self, cfg: HarvestConfig, root: Path | None = None,
                 progress: Callable[[str], None] | None = print) -> None:
        self.cfg = cfg
        self.cache = ActivationCache(cfg, root)
        self.progress = progress
        self._loaded: LoadedModel | None = None
        self._load_lock = threading.Lock()
        self.forwards = 0

    @property
    def loaded(self) -> LoadedModel:
        with self._load_lock:  # the stream's threads and the evaluator may ask first at once: load once
            if self._loaded is None:
                self._loaded = load_model(self.cfg.model)
        return self._loaded

    @property
    def model_loaded(self) -> bool:
        return self._loaded is not None

    def info(self) -> ModelInfo:
        """The model's facts: from the loaded model, or from its config alone when the cache served everything."""
        return self._loaded.info if self._loaded is not None else describe_model(self.cfg.model)

    def _say(self, msg: str) -> None:
        if self.progress is not None:
            self.progress(f"[hsae] {msg}")

    def packed_contexts(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        cached = self.cache.contexts(split)
        if cached is not None:
            return cached
        tokens, domains, _, _, roles = self._pack(split, self.loaded.tokenizer)
        self.cache.write_contexts(split, tokens, domains, roles)
        return tokens, domains

    def _pack(self, split: str, tokenizer: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, Any, np.ndarray]:
        """The packed contexts of ``split``, the document row of each token (-1: BOS), the documents, and each
        context's role. Held-out contexts are packed from "select" documents (the first half, rounded up) and
        from "test" documents (the rest) separately: a context never mixes the two roles."""
        cfg = self.cfg
        dataset = load_corpus(cfg.corpus)
        train_docs, heldout_docs = split_documents(dataset, cfg.holdout_fraction, cfg.seed)
        n = cfg.n_contexts(split)
        if split == "train":
            tokens, domains, rows = pack_contexts(tokenizer, train_docs, cfg.ctx_len, n, seed=cfg.seed,
                                                  forget_fraction=cfg.forget_fraction, with_documents=True)
            return tokens, domains, rows, train_docs, np.full(n, "train", dtype=object)
        all_domains = np.asarray(dataset["domain"])
        doc_roles = heldout_roles(all_domains, cfg.holdout_fraction, cfg.seed)[
            heldout_indices(all_domains, cfg.holdout_fraction, cfg.seed)]  # heldout_docs' order
        parts = []
        for k, (role, count) in enumerate(zip(HELDOUT_ROLES, ((n + 1) // 2, n // 2), strict=True)):
            members = np.flatnonzero(doc_roles == role)
            tokens, domains, rows = pack_contexts(tokenizer, heldout_docs.select(members), cfg.ctx_len, count,
                                                  seed=cfg.seed + 1 + k, forget_fraction=cfg.forget_fraction,
                                                  with_documents=True)
            parts.append((tokens, domains, np.where(rows >= 0, members[np.maximum(rows, 0)], -1),
                          np.full(count, role, dtype=object)))
        tokens, domains, rows, roles = (np.concatenate(a) for a in zip(*parts, strict=True))
        return tokens, domains, rows, heldout_docs, roles

    def context_documents(self, split: str) -> tuple[np.ndarray, Any]:
        """Which document every token of ``split``'s contexts comes from: (n_contexts, ctx_len) rows of the
        returned documents (a ``datasets.Dataset``; -1 for the BOS), re-packed with the harvest's settings
        (tokenizer only, no forward) and checked against the cached contexts."""
        tokenizer = self._loaded.tokenizer if self._loaded is not None else load_tokenizer(self.cfg.model)
        tokens, _, rows, docs, _ = self._pack(split, tokenizer)
        if not np.array_equal(tokens, self.packed_contexts(split)[0]):
            raise ValueError(f"the {split} contexts re-packed for their document ids differ from the cached "
                             f"ones in {self.cache.dir}: the corpus or tokenizer changed under one harvest key")
        return rows, docs

    @torch.no_grad()
    def compute_shard(self, tokens: np.ndarray, domains: np.ndarray, first_context: int = 0) -> Shard:
        """Stopped forward over the shard's contexts; position 0 (the start token) and outlier rows dropped.
        Rows record their context's index, counted from ``first_context`` (the shard's first context)."""
        cfg, loaded = self.cfg, self.loaded
        outs = []
        for start in range(0, len(tokens), cfg.forward_batch):
            ids = torch.from_numpy(tokens[start : start + cfg.forward_batch])
            resid = stopped_forward(loaded, ids)
            self.forwards += 1
            outs.append(resid[:, 1:, :].float().cpu().numpy())
        x = np.concatenate(outs).reshape(-1, loaded.d_model)
        stored = x.astype(STORE_DTYPES[cfg.store_dtype])
        if not np.isfinite(stored).all():
            raise ValueError(
                f"activations overflow store_dtype={cfg.store_dtype} (max |x| = {np.abs(x).max():.3g}); use float32"
            )
        labels = np.repeat(domains.astype(np.int8), cfg.ctx_len - 1)
        sinks = sink_rows(x, cfg.outlier_factor)
        keep = ~sinks
        contexts = np.repeat(np.arange(first_context, first_context + len(tokens), dtype=np.int64), cfg.ctx_len - 1)
        return Shard(stored[keep], labels[keep], tokens[:, 1:].reshape(-1)[keep], contexts[keep],
                     outliers=int(sinks.sum()))

    def run(self, splits: tuple[str, ...] = SPLITS) -> Harvest:
        """Harvest (or read) ``splits``; the stream mode harvests only the held-out split to disk."""
        cfg, cache = self.cfg, self.cache
        self._say(f"activation cache: {cache.dir}")
        t0 = time.perf_counter()
        computed_tokens = 0
        shards: dict[str, list[Shard]] = {}
        for split in splits:
            computed_tokens += self._fill_split(split)
            shards[split] = [cache.read_shard(split, i) for i in range(cfg.n_shards(split))]
        elapsed = time.perf_counter() - t0
        d_model = int(shards[splits[0]][0].x.shape[1])
        if set(splits) == set(SPLITS):  # the manifest marks a complete cache (the pre-flight reads it)
            manifest = {"key": cache.key, "config": asdict(cfg), "d_model": d_model,
                        "rows": {s: int(sum(len(sh.x) for sh in shards[s])) for s in SPLITS},
                        "outliers": {s: int(sum(sh.outliers for sh in shards[s])) for s in SPLITS}}
            atomic_write_text(cache.dir / "manifest.json", json.dumps(manifest, indent=2, default=str))
        tps = computed_tokens / elapsed if computed_tokens else float("nan")
        return Harvest(cache.key, cache.dir, d_model, shards, self.forwards, elapsed, tps)

    def _fill_split(self, split: str) -> int:
        """Compute the shards of ``split`` that are missing or invalid, saying why each is redone; returns
        the tokens computed."""
        cfg, cache = self.cfg, self.cache
        n_shards = cfg.n_shards(split)
        problems = {i: cache._problem(split, i) for i in range(n_shards)}
        missing = [i for i, reason in problems.items() if reason is not None]
        tokens, domains = self.packed_contexts(split)
        if not missing:
            return 0
        cached = n_shards - len(missing)
        # A cache that existed before (a valid shard, or a trace of one) is being repaired: say what was wrong.
        for i in missing:
            if problems[i] != NOT_HARVESTED:
                self._say(f"repairing the activation cache: {split} shard {i + 1}/{n_shards}: {problems[i]}; "
                          "re-harvesting it")
        total = sum(tokens[shard_context_slice(cfg, i, len(tokens))].size for i in missing)
        kept = f" ({cached} already cached)" if cached else ""
        self._say(f"harvesting {split}: {len(missing)}/{n_shards} shards{kept}, {total:,} tokens at layer "
                  f"{cfg.model.layer} of {cfg.model.source}")
        done, t_split = 0, time.perf_counter()
        for i in missing:
            sl = shard_context_slice(cfg, i, len(tokens))
            shard = self.compute_shard(tokens[sl], domains[sl], first_context=sl.start)
            cache.write_shard(split, i, shard)
            done += tokens[sl].size
            elapsed = time.perf_counter() - t_split
            left = eta_text(done, total, elapsed) if done < total else f"done in {format_duration(elapsed)}"
            sinks = f", {shard.outliers} outlier rows dropped" if shard.outliers else ""
            self._say(f"{split} shard {i + 1}/{n_shards}: {done:,}/{total:,} tokens, "
                      f"{rate_text(done, elapsed, 'tokens')}, {left}{sinks}")
        return done


def harvest(cfg: HarvestConfig, root: Path | None = None, progress: Callable[[str], None] | None = print) -> Harvest:
    return Harvester(cfg, root, progress).run()
