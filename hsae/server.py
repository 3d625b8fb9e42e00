"""The activation server: the one Ray actor that hosts the language model (the only Ray code in hsae).

The driver creates it before any trial starts; it harvests layer-L activations once (or reads them
from the disk cache), puts each shard into the object store once, and hands out the ObjectRefs.
Trials only ever fetch refs (numpy arrays are zero-copy, read-only); they never load the model.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import ray

from hsae.activations import SPLITS, Harvest, HarvestConfig, Harvester
from hsae.corpora import corpus_identity, heldout_roles, load_corpus, split_table
from hsae.evaluation.evaluator import EvalConfig, Evaluator, sae_from_weights
from hsae.evaluation.questions import (
    BankConfig,
    QuestionBank,
    bank_cache_identity,
    bank_source,
    build_bank,
    cached_bank,
    questions_table,
)
from hsae.evaluation.sparse_probe import (
    CorpusDocuments,
    HeldoutDocuments,
    ProbeConfig,
    documents_from_harvest,
    encode_pooled,
    raw_probe_grid,
    sparse_probe,
    split_noise,
)
from hsae.models import LoadedModel, ModelInfo, ModelSpec, load_model, resolve_device, resolve_dtype, spec_identity
from hsae.stream import ActivationStream, BlockSource, StreamBatches, StreamConfig
from hsae.train import Batch, to_batch

DEFAULT_NAME = "hsae-activations"
# Stream calls run on their own threads, so a trial waiting for a block never queues behind an evaluation
# (the default group keeps evaluations and set-up one at a time, as before).
STREAM_GROUP = "stream"
STREAM_THREADS = 32
# ``prepare`` (the refs every trial asks for when it starts) runs on its own thread too: in the default group a
# trial starting while evaluations are queued waited for all of them (the main job: 1,090 trial-s, 11% of the
# trials' time, holding a slot idle; docs/performance.md).
INFO_GROUP = "info"
INFO_THREADS = 4
# Evaluations run on as many threads as the server has evaluators (``evaluators``), each with its own model copy.
EVAL_GROUP = "eval"
# Handles of the servers this driver created. A non-detached actor dies when its last handle goes, so
# keeping one here makes a server live as long as its driver process, across several sweeps in it.
_HANDLES: dict[str, Any] = {}


def evaluation_spec(harvest_model: ModelSpec, eval_model: str | None) -> ModelSpec:
    """The model that answers the questions: the eval twin or the harvest's model, at the dtype "auto" resolves to."""
    return replace(harvest_model, source=eval_model or harvest_model.source, dtype="auto")


def bank_identity_of(harvest: HarvestConfig, spec: ModelSpec, bank_cfg: BankConfig) -> dict[str, Any]:
    """The question bank's cache identity: the answering model ``spec``, the harvest's corpus and split."""
    return bank_cache_identity(spec_identity(spec), corpus_identity(harvest.corpus), harvest.holdout_fraction,
                               harvest.seed, bank_cfg)


def planned_bank(harvest: HarvestConfig, eval_model: str | None, bank_cfg: BankConfig,
                 root: str | Path | None = None) -> QuestionBank | None:
    """The bank a sweep's server would evaluate with, when it is already built (cached); None when the first
    evaluation will build it."""
    spec = evaluation_spec(harvest.model, eval_model)
    return cached_bank(bank_cfg, bank_identity_of(harvest, spec, bank_cfg), Path(root) if root else None)


@dataclass(frozen=True)
class ServedInfo:
    """What the server serves, typed: the model's facts, where the activations came from, and their refs."""

    model: ModelInfo
    harvest_key: str  # content key of (model identity, layer, corpus, split, context settings)
    corpus: dict[str, Any]  # corpus identity and the document split that keeps evaluation held out
    cache_dir: str
    rows: dict[str, int]  # activation rows per split
    outliers: dict[str, int]  # rows per split dropped as attention sinks (activations.sink_rows)
    harvest_s: float
    tokens_per_s: float
    refs: dict[str, list[tuple[Any, Any, Any]]]  # split -> [(x, labels, tokens) ObjectRef per shard]


class ActivationServer:
    """Plain class; ``create_activation_server`` wraps it as a named Ray actor."""

    def __init__(
        self,
        cfg: HarvestConfig,
        cache_root: str | None = None,
        threads: int | None = None,
        eval_cfg: EvalConfig | None = None,
        bank_cfg: BankConfig | None = None,
        eval_model: str | None = None,
        stream: StreamConfig | None = None,
        evaluators: int = 1,
    ) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        self.cache_root = Path(cache_root) if cache_root else None
        self.cfg = cfg
        self.harvester = Harvester(cfg, self.cache_root)
        self.eval_cfg = eval_cfg or EvalConfig()
        self.bank_cfg = bank_cfg or BankConfig()
        # SAEBench evaluates base-model SAEs on the instruction-tuned twin (gemma-2-2b-it for gemma-2-2b).
        self.eval_model = eval_model
        self.stream_cfg = stream  # None: training rows come from the disk cache (every split harvested)
        self._stream: ActivationStream | None = None
        self._stream_lock = threading.Lock()
        self._prepare_lock = threading.Lock()  # ``prepare`` is called from the info and the default group
        self._info: ServedInfo | None = None
        self._harvest: Harvest | None = None
        self._evaluator: Evaluator | None = None
        # Evaluators free to take an SAE: the first, then its replicas (hsae.evaluation.Evaluator.replica).
        self.evaluators = max(int(evaluators), 1)
        self._free: queue.Queue[Evaluator] | None = None
        self._pool_lock = threading.Lock()
        self.probe_cfg = ProbeConfig()
        self._documents: HeldoutDocuments | None = None  # the sparse probe's held-out documents, built once
        self._raw_probe: list[dict[str, Any]] | None = None  # its raw-activation ceiling (no SAE in it)
        # Seconds spent building the evaluator (bank + question residuals) and running the controls.
        self._timings: dict[str, float] = {}

    @ray.method(concurrency_group=INFO_GROUP)
    def prepare(self) -> ServedInfo:
        """Harvest (or read the cache) once; later calls return the same refs."""
        with self._prepare_lock:
            return self._prepare()

    def _prepare(self) -> ServedInfo:
        if self._info is None:
            with self._every_core():
                harvest = self._harvest = self.harvester.run(("eval",) if self.stream_cfg else SPLITS)
                refs = {
                    split: [(ray.put(s.x), ray.put(s.labels), ray.put(s.tokens)) for s in shards]
                    for split, shards in harvest.shards.items()
                }
                model = self.harvester.info()
                if model.d_model != harvest.d_model:
                    raise ValueError(f"the cached activations are {harvest.d_model} wide, the model {model.d_model}")
                corpus = {**corpus_identity(self.cfg.corpus), "holdout_fraction": self.cfg.holdout_fraction,
                          "split_seed": self.cfg.seed}
                rows = {split: int(sum(len(s.x) for s in harvest.shards.get(split, []))) for split in SPLITS}
                self._info = ServedInfo(model=model, harvest_key=harvest.key, corpus=corpus, cache_dir=str(harvest.dir),
                                        rows=rows, outliers={s: harvest.outliers(s) if s in harvest.shards else 0
                                                             for s in SPLITS},
                                        harvest_s=harvest.harvest_s, tokens_per_s=harvest.tokens_per_s,
                                        refs=refs)
        return self._info

    def evaluator(self) -> Evaluator:
        """Built on first use: the model (loaded only now if the harvest came from disk), the question
        bank (cached on disk by content hash) and the questions' layer-L residuals."""
        if self._evaluator is None:
            t0 = time.perf_counter()
            self.prepare()
            assert self._harvest is not None
            loaded, spec = self._evaluation_model()
            cfg = self.cfg
            source = bank_source(loaded, cfg.corpus, self.bank_cfg, cfg.holdout_fraction, cfg.seed)
            say = self.harvester.progress  # the server's one progress callback (print)
            bank = build_bank(loaded, self.bank_cfg, source, bank_identity_of(cfg, spec, self.bank_cfg), progress=say,
                              root=self.cache_root)
            x, labels = self.heldout_content_rows("select")
            test_x, test_labels = self.heldout_content_rows("test") if self.eval_cfg.crossfit else (None, None)
            tokens, domains = self.test_contexts()
            self._evaluator = Evaluator(loaded, bank, x, labels, tokens, domains, self.eval_cfg, progress=say,
                                        test_x=test_x, test_labels=test_labels)
            self._timings["banks"] = time.perf_counter() - t0
        return self._evaluator

    def _evaluation_model(self) -> tuple[LoadedModel, ModelSpec]:
        """The model that answers the questions and gives CE/KL, and its spec: the eval twin or the harvest's model,
        always at the dtype "auto" resolves to; the harvest's loaded model serves when it is that model. What a
        harvest's dtype still reaches: every activation row it wrote, the held-out ones included (feature selection,
        control directions, the sparse probe, each row's EV and L0)."""
        harvest = self.cfg.model
        spec = evaluation_spec(harvest, self.eval_model)
        device = resolve_device(harvest.device)
        if spec.source == harvest.source and resolve_dtype(harvest.dtype, device) == resolve_dtype("auto", device):
            return self.harvester.loaded, spec
        return load_model(spec), spec

    def heldout_content_rows(self, role: str) -> tuple[np.ndarray, np.ndarray]:
        """What selects (firing frequencies, control directions): held-out activations and labels of content
        tokens of contexts packed from documents of ``role`` only (*select*; *test* for the cross-fitted fold B);
        BOS, EOS and padding never count."""
        info = self.prepare().model  # read once, in prepare
        assert self._harvest is not None
        x, labels = self._harvest.arrays("eval")
        special = [t for t in (info.bos_id, info.eos_id) if t is not None]  # packed contexts have no padding
        keep = ~np.isin(self._harvest.token_ids("eval"), special) & (self._harvest.row_roles("eval") == role)
        return x[keep], labels[keep]

    def test_contexts(self) -> tuple[np.ndarray, np.ndarray]:
        """What CE/KL is measured on: the held-out contexts packed from *test* documents, and their domains."""
        tokens, domains = self.harvester.packed_contexts("eval")
        test = self.harvester.cache.context_roles("eval") == "test"
        return tokens[test], domains[test]

    def questions(self) -> list[dict[str, Any]]:
        """Every question of the bank (what questions.parquet holds), in bank order."""
        return questions_table(self.evaluator().bank)

    def split(self) -> dict[str, list[Any]]:
        """The document split of the corpus (what split.parquet holds): doc_id, domain, part, role."""
        return split_table(load_corpus(self.cfg.corpus), self.cfg.holdout_fraction, self.cfg.seed).to_dict("list")

    def _pool(self) -> queue.Queue[Evaluator]:
        """The evaluators, built once: everything lazy (CE references, the probe's documents and raw grid) is
        computed first, so evaluations on several threads only read what they share."""
        with self._pool_lock:
            if self._free is None:
                first = self.evaluator()
                first.warm()
                self._raw_probe_grid()
                free: queue.Queue[Evaluator] = queue.Queue()
                free.put(first)
                for _ in range(self.evaluators - 1):
                    free.put(first.replica())
                self._free = free
        return self._free

    @contextmanager
    def _lease(self) -> Iterator[Evaluator]:
        pool = self._pool()
        ev = pool.get()
        try:
            yield ev
        finally:
            pool.put(ev)

    @ray.method(concurrency_group=EVAL_GROUP)
    def evaluate(self, sae_cfg: dict[str, Any], state: dict[str, np.ndarray], ce: bool = True) -> dict[str, Any]:
        """Unlearning grid (+ CE/KL scores) of one SAE passed by value (folded weights, raw activations), on
        whichever evaluator is free."""
        with self._lease() as ev:
            out = {"unlearning": ev.unlearning(sae_cfg, state)}
            if ce:
                out["ce"] = ev.ce_scores(sae_cfg, state)
        out["sparse_probe"] = self.sparse_probe(sae_cfg, state)
        return out

    def heldout_documents(self) -> HeldoutDocuments:
        """The held-out documents of the eval split (built once; tokenizer only, no forward): every content
        row tagged with its document, and each document's domain, topic and select/test role."""
        if self._documents is None:
            info = self.prepare().model
            assert self._harvest is not None
            cfg = self.cfg
            doc_rows, docs = self.harvester.context_documents("eval")
            dataset = load_corpus(cfg.corpus)
            role_of = dict(zip(dataset["doc_id"], heldout_roles(np.asarray(dataset["domain"]), cfg.holdout_fraction,
                                                                cfg.seed), strict=True))
            doc_ids = np.asarray(docs["doc_id"], dtype=object)
            topic = docs["topic"] if "topic" in docs.column_names else [""] * len(docs)
            corpus = CorpusDocuments(doc_ids, np.asarray(docs["domain"]), np.asarray(topic, dtype=object),
                                     np.asarray([role_of[d] for d in doc_ids], dtype=object))
            shards = [(s.x, s.tokens) for s in self._harvest.shards["eval"]]
            special = [t for t in (info.bos_id, info.eos_id) if t is not None]
            self._documents = documents_from_harvest(shards, self.harvester.packed_contexts("eval")[0], doc_rows,
                                                     cfg.shard_ctxs, special, corpus)
        return self._documents

    def _pooled_latents(self, sae_cfg: dict[str, Any], state: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        sae = sae_from_weights(sae_cfg, state)

        @torch.no_grad()
        def encode(x: np.ndarray) -> np.ndarray:
            return sae.encode(torch.as_tensor(x, dtype=torch.float32)).numpy()

        return encode_pooled(encode, self.heldout_documents(), self.probe_cfg.encode_batch)

    def _raw_probe_grid(self) -> list[dict[str, Any]]:
        """The probe's raw-activation ceiling on the held-out documents (no SAE in it): built once."""
        if self._raw_probe is None:
            self._raw_probe = raw_probe_grid(self.heldout_documents(), self.probe_cfg)
        return self._raw_probe

    def sparse_probe(self, sae_cfg: dict[str, Any], state: dict[str, np.ndarray]) -> dict[str, Any]:
        """k-sparse probing of held-out topics on one SAE by value (hsae.evaluation.sparse_probe): its grid
        (probe.parquet rows without trial_id) and the row's sparse_probe_* columns."""
        result = sparse_probe(self._pooled_latents(sae_cfg, state), self.heldout_documents(), self.probe_cfg,
                              self._raw_probe_grid())
        return {"grid": result.grid, "columns": result.columns}

    def sparse_probe_noise(self, sae_cfg: dict[str, Any], state: dict[str, np.ndarray],
                           n_splits: int = 10) -> dict[str, dict[str, float | None]]:
        """The probe's split-to-split spread on one SAE: re-drawn select/test halves (``split_noise``)."""
        return split_noise(self._pooled_latents(sae_cfg, state), self.heldout_documents(), self.probe_cfg, n_splits)

    def controls(self) -> dict[str, Any]:
        """The evaluation controls; the driver asks before any trial starts, so this (and the bank and
        question residuals built on first use) may use every core."""
        t0 = time.perf_counter()
        with self._every_core():
            out = self.evaluator().controls()
            self._pool()  # the evaluators' one-off work, while no trial runs yet
        self._timings["controls"] = time.perf_counter() - t0 - self._timings.get("banks", 0.0)
        return out

    def timings(self) -> dict[str, float]:
        """Seconds of the one-off work: ``banks`` (evaluator build) and ``controls`` (controls alone)."""
        return dict(self._timings)

    @contextmanager
    def _every_core(self) -> Iterator[None]:
        """Work done before trials start (harvest, bank, controls) runs on every core, then back to ``threads``."""
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        try:
            yield
        finally:
            torch.set_num_threads(self.threads)

    # -- the stream (hsae.stream): trials consume training batches as the model computes them -----------
    def _the_stream(self) -> ActivationStream:
        if self.stream_cfg is None:
            raise RuntimeError("this activation server serves its training rows from the disk cache, not a stream")
        with self._stream_lock:  # stream calls arrive on many threads at once: one stream, one producer
            if self._stream is None:
                self._stream = ActivationStream(BlockSource(self.harvester, self.stream_cfg), put=ray.put)
        return self._stream

    @ray.method(concurrency_group=STREAM_GROUP)
    def stream_join(self, consumer: str, steps: int) -> int:
        """Register a trial for ``steps`` batches; its first stream batch (0, or the oldest still buffered under
        the ``"oldest"`` join policy: ``StreamConfig.join``)."""
        return self._the_stream().join(consumer, steps)

    @ray.method(concurrency_group=STREAM_GROUP)
    def stream_batches(self, consumer: str, start: int, count: int) -> list[tuple[Any, Any]]:
        """ObjectRefs of stream batches ``start .. start+count-1`` (x, labels), computed if need be."""
        return self._the_stream().batches(consumer, start, count)

    @ray.method(concurrency_group=STREAM_GROUP)
    def stream_leave(self, consumer: str) -> dict[str, Any]:
        """The trial is done with the stream; returns the stream's counters (``ActivationStream.stats``)."""
        stream = self._the_stream()
        stream.leave(consumer)
        return stream.stats()

    @ray.method(concurrency_group=STREAM_GROUP)
    def stream_stats(self) -> dict[str, Any]:
        """The stream's counters, with this process's peak resident memory (model, window and all)."""
        import resource

        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {**self._the_stream().stats(), "server_peak_rss_mb": peak_mb} if self.stream_cfg else {}

    def forwards(self) -> int:
        """Model forwards run by this server process (0 when everything came from disk)."""
        return self.harvester.forwards

    def model_loaded(self) -> bool:
        return self.harvester.model_loaded


def create_activation_server(
    cfg: HarvestConfig,
    name: str = DEFAULT_NAME,
    cache_root: str | None = None,
    num_cpus: float = 1,
    num_gpus: float | None = None,
    max_restarts: int = -1,
    eval_cfg: EvalConfig | None = None,
    bank_cfg: BankConfig | None = None,
    eval_model: str | None = None,
    stream: StreamConfig | None = None,
    evaluators: int = 1,
) -> Any:
    """Create (or get, if one with this name is alive) the named server actor, evaluating on ``evaluators``
    threads (each holds a copy of the model).

    Call it in the driver before ``Tuner.fit()``: an actor created inside a trial would be captured by
    that trial's placement group. ``num_gpus`` defaults to 1 when the cluster has a GPU.
    """
    if num_gpus is None:
        num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    groups = {STREAM_GROUP: STREAM_THREADS, INFO_GROUP: INFO_THREADS, EVAL_GROUP: max(int(evaluators), 1)}
    actor_cls = ray.remote(concurrency_groups=groups)(ActivationServer)
    handle = actor_cls.options(
        name=name,
        get_if_exists=True,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        max_restarts=max_restarts,
        max_task_retries=-1 if max_restarts else 0,
    ).remote(cfg, cache_root, threads=max(int(num_cpus), 1), eval_cfg=eval_cfg, bank_cfg=bank_cfg,
             eval_model=eval_model, stream=stream, evaluators=evaluators)
    _HANDLES.setdefault(name, handle)  # the creating handle owns the actor: keep that one
    return handle


class ShardedRows:
    """Row access across a list of arrays without concatenating them (no copy of the object store)."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, idx: Any) -> np.ndarray:
        idx = np.asarray(idx)
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        out = np.empty((len(idx),) + self.parts[0].shape[1:], dtype=self.parts[0].dtype)
        for k in np.unique(which):
            sel = which == k
            out[sel] = self.parts[k][idx[sel] - self.offsets[k]]
        return out


@dataclass
class ServedActivations:
    """What a trial holds after fetching the server's refs: rows of x, labels and token ids per split."""

    x: ShardedRows
    labels: ShardedRows
    tokens: ShardedRows
    model: ModelInfo

    def eval_batch(self) -> Batch:
        """Every row of the split, as one batch (the trainer samples what it validates on)."""
        idx = np.arange(len(self.x))
        return to_batch(self.x[idx], self.labels[idx])


def fetch(info: ServedInfo, split: str = "train") -> ServedActivations:
    """Resolve a server's refs for ``split`` into arrays (zero-copy views of the object store)."""
    triples = info.refs[split]
    xs = ray.get([t[0] for t in triples])
    labels = ray.get([t[1] for t in triples])
    tokens = ray.get([t[2] for t in triples])
    return ServedActivations(ShardedRows(xs), ShardedRows(labels), ShardedRows(tokens), info.model)


def stream_source(server: Any, consumer: str, start: int, batch_size: int, steps: int) -> StreamBatches:
    """A trial's ``steps`` batches from the server's stream, from stream batch ``start`` on."""
    epoch_batches = ray.get(server.stream_stats.remote())["batches_per_epoch"]

    def fetch_batches(first: int, count: int) -> list[tuple[Any, Any]]:
        refs = ray.get(server.stream_batches.remote(consumer, first, count))
        arrays = ray.get([r for pair in refs for r in pair])
        return list(zip(arrays[0::2], arrays[1::2], strict=True))

    return StreamBatches(fetch_batches, start, batch_size, steps, epoch_batches)
