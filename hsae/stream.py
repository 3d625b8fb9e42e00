"""The activation stream: shuffled training batches computed as trials consume them, in bounded memory.

The stream is a deterministic function of (corpus, split, seed) and of nothing that happens at run
time. It is cut into *blocks* of ``block_contexts`` contexts: block ``b`` lies in epoch
``b // blocks_per_epoch``. An epoch packs the training documents in a document order drawn from
(seed, epoch); epoch 0 is the disk cache's packing. The LM runs over a block's contexts once. The
block's activation rows (start token and attention sinks dropped, as in a harvest) are permuted with
(seed, block) and cut into batches, so every batch mixes rows of hundreds of contexts. Batch ``i`` of
the stream is batch ``i % per_block`` of block ``i // per_block``, whoever asks and whenever.

Who reads which batches is the join policy (``StreamConfig.join``). ``"first"`` (the default): every
trial trains on batches ``0 .. steps - 1``, so its data are a function of (corpus, split, seed, step)
alone, whenever it starts, as in cache mode. ``"oldest"``: a trial joins at the oldest batch still
buffered, which costs no LM pass of its own but depends on timing (its row says so).

The producer thread computes the blocks attached consumers will read next: for each, its current block
and the ones after it, up to ``window_blocks`` blocks ahead and never beyond the last batch it asked for,
nearest first. Trials that read together share each block; a trial that starts later (a late joiner,
say the fifth of four slots) is served from its own first block, which the window recomputes for it and
for every trial that starts with it. Memory is at most ``window_blocks`` blocks, plus one block per
consumer that is recomputing, whatever the token budget. A block is evicted (oldest first) only when
the window is full and no attached consumer will read it.

Back-pressure: when the window is full of blocks attached consumers still want and another block is
missing, the producer waits ``stall_s`` seconds. Every consumer that stayed in the same window block all
that time is then *detached*: the window moves on, and each block such a consumer asks for later is
recomputed for it alone, once (counted in ``lm_tokens``), and not kept in the window. It is attached
again once it reaches the window or is the only consumer left. Only attached consumers drive the
producer. A failed block stops the producer; the consumer that needs the block computes it itself and
meets the error. A consumer that asks nothing for ``lease_s`` seconds (finished, stopped by ASHA,
crashed) has left. A resumed trial asks for the batches it would have seen, and evicted ones are
recomputed. A restarted server recomputes whatever is asked.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hsae.activations import Harvester
from hsae.checks import check_positive, check_positive_int
from hsae.corpora import load_corpus, pack_contexts, split_documents

EPOCHS_KEPT = 64  # packed epochs kept (token ids only: 2 MB each for the real profile)
# Where a trial's batches start: "first" = stream batch 0 for every trial (its data are a function of the
# step alone); "oldest" = the oldest batch buffered when it joins (cheaper, but depends on timing).
JOIN_POLICIES = ("first", "oldest")


def check_join_policy(name: str, value: str) -> None:
    if value not in JOIN_POLICIES:
        raise ValueError(f"{name} must be one of {list(JOIN_POLICIES)}, got {value!r}")


@dataclass(frozen=True)
class StreamConfig:
    batch_size: int = 2048  # a profile sets its training batch here (Profile keeps the two one fact)
    block_contexts: int = 256  # the mixing buffer: a batch draws its rows from this many contexts
    window_blocks: int = 4  # blocks kept published at once: the memory bound
    stall_s: float = 120.0  # how long the producer waits for the slowest consumer before detaching it
    lease_s: float = 600.0  # a consumer silent this long has left
    join: str = "first"  # JOIN_POLICIES: where a trial's batches start

    def __post_init__(self) -> None:
        for name in ("batch_size", "block_contexts"):
            check_positive_int(name, getattr(self, name))
        check_positive_int("window_blocks", self.window_blocks, minimum=2)  # one being read, one being made
        check_positive("stall_s", self.stall_s)
        check_positive("lease_s", self.lease_s)
        check_join_policy("join", self.join)


class BlockSource:
    """The contexts of every block, and the block's shuffled activation batches (Ray-free)."""

    def __init__(self, harvester: Harvester, cfg: StreamConfig) -> None:
        hcfg = harvester.cfg
        self.harvester, self.cfg = harvester, cfg
        self.blocks_per_epoch = hcfg.n_ctxs // cfg.block_contexts
        if self.blocks_per_epoch < 1:
            raise ValueError(f"block_contexts={cfg.block_contexts} exceeds an epoch's {hcfg.n_ctxs} contexts "
                             f"(n_ctxs): lower stream.block_contexts or raise --n-ctxs")
        rows = cfg.block_contexts * (hcfg.ctx_len - 1)
        self.batches_per_block = rows // cfg.batch_size
        if self.batches_per_block < 1:
            raise ValueError(f"a block of {cfg.block_contexts} contexts gives {rows} rows, fewer than one batch of "
                             f"{cfg.batch_size}: raise stream.block_contexts")
        self.tokens_per_block = cfg.block_contexts * hcfg.ctx_len  # what the LM computes for a block
        # Packed epochs, the newest few: the producer and a trial recomputing an old block need different ones.
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._epochs_lock = threading.Lock()

    def epoch_contexts(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Epoch 0 is the cache's packing of the training documents; later epochs reshuffle the documents."""
        with self._epochs_lock:
            if epoch in self._epochs:
                return self._epochs[epoch]
        h = self.harvester
        if epoch == 0:
            packed = h.packed_contexts("train")
        else:  # packed outside the lock: the producer and a recomputing trial may need different epochs
            train_docs, _ = split_documents(load_corpus(h.cfg.corpus), h.cfg.holdout_fraction, h.cfg.seed)
            packed = pack_contexts(h.loaded.tokenizer, train_docs, h.cfg.ctx_len, h.cfg.n_ctxs,
                                   seed=[h.cfg.seed, epoch], forget_fraction=h.cfg.forget_fraction)
        with self._epochs_lock:
            while len(self._epochs) >= EPOCHS_KEPT:
                del self._epochs[min(self._epochs)]
            self._epochs[epoch] = packed
        return packed

    def block_batches(self, block: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """The LM's activations of the block, shuffled and cut into (x, labels) batches."""
        epoch, i = divmod(block, self.blocks_per_epoch)
        tokens, domains = self.epoch_contexts(epoch)
        sl = slice(i * self.cfg.block_contexts, (i + 1) * self.cfg.block_contexts)
        shard = self.harvester.compute_shard(tokens[sl], domains[sl])
        need = self.batches_per_block * self.cfg.batch_size
        # Attention sinks leave fewer rows than planned: the permutation wraps round (deterministically).
        order = np.resize(np.random.default_rng([self.harvester.cfg.seed, block]).permutation(len(shard.x)), need)
        b = self.cfg.batch_size
        return [(shard.x[order[k * b:(k + 1) * b]], shard.labels[order[k * b:(k + 1) * b]])
                for k in range(self.batches_per_block)]


@dataclass
class Consumer:
    start: int  # its first batch
    position: int  # the next batch it will ask for
    end: int  # one past the last batch it needs
    seen: float  # when it last asked
    moved: float  # when its position last entered a new block
    attached: bool = True
    held: tuple[int, list[tuple[Any, Any]]] | None = field(default=None, repr=False)  # its current block


class ActivationStream:
    """The window of published blocks, the consumers and the producer thread (see the module doc).

    ``put`` turns a batch's arrays into what consumers receive (``ray.put`` in the server; identity in tests).
    """

    def __init__(self, source: BlockSource, put: Callable[[Any], Any] = lambda a: a,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.source, self.cfg, self.put, self.clock = source, source.cfg, put, clock
        self.per_block = source.batches_per_block
        self.window: dict[int, list[tuple[Any, Any]]] = {}
        self.consumers: dict[str, Consumer] = {}
        self.lock = threading.Condition()
        self.lm_tokens = 0
        self.blocks_computed = 0
        self.blocks_recomputed = 0
        self.peak_window_blocks = 0
        self._computing: set[int] = set()
        self.producer_error: str | None = None
        self._producer: threading.Thread | None = None
        self._stop = False

    # -- consumers ------------------------------------------------------------------------------------
    def join(self, consumer: str, steps: int) -> int:
        """Register ``consumer`` for ``steps`` batches; returns its first batch (0, or the oldest one buffered
        under the ``"oldest"`` join policy)."""
        with self.lock:
            known = self.consumers.get(consumer)
            if known is not None:
                return known.start
            start = self._oldest_block() * self.per_block if self.cfg.join == "oldest" else 0
            now = self.clock()
            self.consumers[consumer] = Consumer(start, start, start + steps, now, now)
            self._start_producer()
            self.lock.notify_all()
            return start

    def batches(self, consumer: str, start: int, count: int) -> list[tuple[Any, Any]]:
        """Batches ``start .. start+count-1`` for ``consumer``: buffered, awaited, or recomputed."""
        with self.lock:
            c = self.consumers.get(consumer)
            if c is None:  # a restarted server meets a consumer it never saw join
                now = self.clock()
                c = self.consumers[consumer] = Consumer(start, start, start + count, now, now)
            self._move(c, start)
            c.end = max(c.end, start + count)
            if not any(o.attached for o in self.consumers.values()):
                c.attached = True  # alone, it drives the producer again rather than recomputing every block
            self._start_producer()  # it ends when nobody needs more; this consumer may need more now
            self.lock.notify_all()
        out = []
        for i in range(start, start + count):
            block, k = divmod(i, self.per_block)
            if c.held is None or c.held[0] != block:  # a block recomputed for it serves all its batches
                c.held = (block, self._block(consumer, block))
            out.append(c.held[1][k])
            with self.lock:  # its position moves as it receives: a request may span more than the window
                self._move(c, i + 1)
                self.consumers.setdefault(consumer, c)  # a lease that ran out mid-request is renewed
                self.lock.notify_all()
        return out

    def _move(self, c: Consumer, position: int) -> None:
        """(Lock held.) The consumer's next batch is ``position``."""
        now = self.clock()
        if position // self.per_block != c.position // self.per_block:
            c.moved = now
        c.position, c.seen = position, now

    def leave(self, consumer: str) -> None:
        with self.lock:
            self.consumers.pop(consumer, None)
            self.lock.notify_all()

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {"lm_tokens": self.lm_tokens, "blocks_computed": self.blocks_computed,
                    "blocks_recomputed": self.blocks_recomputed, "window_blocks": len(self.window),
                    "peak_window_blocks": self.peak_window_blocks, "batches_per_block": self.per_block,
                    "batches_per_epoch": self.per_block * self.source.blocks_per_epoch,
                    "producer_error": self.producer_error,
                    "consumers": {k: {"start": v.start, "position": v.position, "end": v.end, "attached": v.attached}
                                  for k, v in self.consumers.items()}}

    def close(self) -> None:
        with self.lock:
            self._stop = True
            self.lock.notify_all()
        if self._producer is not None:
            self._producer.join()

    # -- blocks ---------------------------------------------------------------------------------------
    def _block(self, consumer: str, block: int) -> list[tuple[Any, Any]]:
        """The block from the window, waiting for the producer when it is coming, else recomputed alone."""
        with self.lock:
            while True:
                if block in self.window:
                    self._attach(consumer)
                    return self.window[block]
                if not self._coming(block):
                    break
                self.lock.wait(timeout=1.0)
                c = self.consumers.get(consumer)
                if c is not None:
                    c.seen = self.clock()  # waiting is not silence
            c = self.consumers.get(consumer)
            if c is not None:
                c.attached = False
        batches = self._compute(block)
        with self.lock:
            self.blocks_recomputed += 1
        return batches

    def _coming(self, block: int) -> bool:
        """Whether the producer will publish ``block`` soon: it is being made, or an attached consumer wants it."""
        if block in self._computing:
            return True
        producing = self._producer is not None and self._producer.is_alive()
        return producing and block in self._wanted()

    def _attach(self, consumer: str) -> None:
        c = self.consumers.get(consumer)
        if c is not None:
            c.attached = True

    def _compute(self, block: int) -> list[tuple[Any, Any]]:
        batches = [(self.put(x), self.put(labels)) for x, labels in self.source.block_batches(block)]
        with self.lock:
            self.lm_tokens += self.source.tokens_per_block
        return batches

    def _wanted(self) -> list[int]:
        """Blocks attached consumers read next, nearest first: each one's current block, then the following
        ones up to ``window_blocks`` ahead, never past the last batch it asked for."""
        ahead: dict[int, int] = {}
        for c in self.consumers.values():
            if not c.attached or c.position >= c.end:
                continue
            first, last = c.position // self.per_block, (c.end - 1) // self.per_block
            for block in range(first, min(last, first + self.cfg.window_blocks - 1) + 1):
                ahead[block] = min(ahead.get(block, block - first), block - first)
        return sorted(ahead, key=lambda block: (ahead[block], block))

    def _oldest_block(self) -> int:
        """The oldest block buffered; with none, the first one an attached consumer wants (0 if none does)."""
        if self.window:
            return min(self.window)
        wanted = self._wanted()
        return min(wanted) if wanted else 0

    # -- the producer ---------------------------------------------------------------------------------
    def _start_producer(self) -> None:
        """(Lock held.) A producer thread, unless one is running."""
        if self._producer is None:
            self._stop = False
            self._producer = threading.Thread(target=self._produce, name="hsae-stream", daemon=True)
            self._producer.start()

    def _produce(self) -> None:
        block = None
        try:
            while True:
                with self.lock:
                    block = self._wait_for_room()
                    if block is None:  # let go under the lock: the next request starts a new producer
                        self._producer = None
                        return
                    self._computing.add(block)
                batches = self._compute(block)
                with self.lock:
                    self._computing.discard(block)
                    self.window[block] = batches
                    self.blocks_computed += 1
                    self.peak_window_blocks = max(self.peak_window_blocks, len(self.window))
                    self.lock.notify_all()
        except Exception as exc:  # noqa: BLE001 - kept for stats; the trial that needs the block meets it itself
            self.producer_error = f"block {block}: {type(exc).__name__}: {exc}"
        finally:  # on an error too: waiting consumers then compute the block themselves and meet the error
            with self.lock:
                self._computing.discard(block)
                if self._producer is threading.current_thread():
                    self._producer = None
                self.lock.notify_all()

    def _wait_for_room(self) -> int | None:
        """(Lock held.) The next block to make once the window has room for it; None to stop."""
        waited_since = self.clock()
        while not self._stop:
            self._drop_silent()
            wanted = self._wanted()
            if not wanted:
                return None  # nobody attached needs more: the producer ends (a request restarts it)
            missing = [block for block in wanted if block not in self.window and block not in self._computing]
            if not missing:
                waited_since = self.clock()  # everything wanted is published: waiting for readers, not stalled
            else:
                self._evict_unwanted(wanted)
                if len(self.window) < self.cfg.window_blocks:
                    return missing[0]
                if self.clock() - waited_since > self.cfg.stall_s:
                    self._detach_stalled(waited_since)
                    waited_since = self.clock()
            self.lock.wait(timeout=min(1.0, self.cfg.stall_s))
        return None

    def _evict_unwanted(self, wanted: list[int]) -> None:
        """While the window is full, drop its oldest blocks that no attached consumer will read."""
        for block in sorted(set(self.window) - set(wanted)):
            if len(self.window) < self.cfg.window_blocks:
                break
            del self.window[block]

    def _detach_stalled(self, since: float) -> None:
        """Detach every attached consumer that has read the same window block since ``since``: those holding
        the window back (a consumer waiting for a missing block is not one of them)."""
        for c in self.consumers.values():
            if c.attached and c.position // self.per_block in self.window and c.moved <= since:
                c.attached = False
        self._evict_unwanted(self._wanted())

    def _drop_silent(self) -> None:
        now = self.clock()
        for name in [k for k, c in self.consumers.items() if now - c.seen > self.cfg.lease_s]:
            del self.consumers[name]


class StreamBatches:
    """A trial's view of the stream: batch ``step`` is stream batch ``start + step`` (a pure function of the
    step, as resume needs). ``fetch(start, count)`` returns that many (x, labels) pairs from the server."""

    def __init__(self, fetch: Callable[[int, int], list[tuple[Any, Any]]], start: int, batch_size: int,
                 steps: int | None = None, epoch_batches: int | None = None, prefetch: int = 8) -> None:
        self.fetch, self.start, self.batch_size, self.prefetch = fetch, start, batch_size, prefetch
        self.steps = steps  # never ask past the last step: a batch asked for is a batch the LM computes
        self.epoch_batches = epoch_batches  # later epochs repack the same documents
        self._held: dict[int, tuple[Any, Any]] = {}

    def batch_at(self, step: int) -> Any:
        from hsae.train import to_batch

        index = self.start + step
        if index not in self._held:
            count = self.prefetch if self.steps is None else max(1, min(self.prefetch, self.steps - step))
            self._held = dict(enumerate(self.fetch(index, count), start=index))
        x, labels = self._held[index]  # kept: the trainer reads step 0 twice (initialisation, then the step)
        return to_batch(x, labels)

    def unique_rows(self, steps: int) -> int:
        """Distinct training tokens the first ``steps`` batches hold: each stream row is new until the
        stream enters its second epoch, which repacks the same documents' tokens."""
        batches = steps if self.epoch_batches is None else min(steps, self.epoch_batches)
        return batches * self.batch_size
