"""The trainer: pure torch, no Ray. Steps, optimiser, normalisation, checkpoints and sanity guards."""

from __future__ import annotations

import functools
import json
import math
import shutil
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from hsae import metrics as M
from hsae.atomic import atomic_dir
from hsae.config import SAEConfig, TrainConfig
from hsae.convergence import convergence_verdict
from hsae.l0_control import L0Controller
from hsae.machine import PrecisionChoice, resolve_precision
from hsae.models import resolve_device
from hsae.resampling import resample_dead
from hsae.variants import SAE, LossOutput, StepInput, build_sae


class DegenerateRunError(RuntimeError):
    """A run that cannot have learned anything: its scores must never be reported.

    The seed paper's unlearning scores were 0.0 because every SAE trained for zero steps; this error
    makes that outcome a loud failure instead of a number.
    """

    def __init__(self, reason: str, metrics: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.metrics = metrics or {}


# Held-out rows the per-log-step validation uses (a fixed uniform sample): cheap enough to log often.
VALIDATION_ROWS = 4096


@dataclass
class Batch:
    x: torch.Tensor
    labels: torch.Tensor | None = None


def to_batch(x: Any, labels: Any = None) -> Batch:
    """Numpy or torch (any float dtype) to a float32 Batch; labels to int64."""
    xt = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float()
    lt = None
    if labels is not None:
        lt = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels).long()
    return Batch(xt, lt)


@runtime_checkable
class BatchSource(Protocol):
    """Anything that gives the batch of a step; resume needs ``batch_at`` to be a function of the step."""

    def batch_at(self, step: int) -> Batch: ...


class ArrayBatches:
    """Shuffled mini-batches over in-memory arrays; ``batch_at(step)`` depends only on (seed, step).

    That purity is what lets a resumed run see exactly the batches the uninterrupted run saw.
    """

    def __init__(self, x: Any, labels: Any = None, batch_size: int = 2048, seed: int = 42) -> None:
        self.x = x
        self.labels = labels
        self.n = len(x)
        if self.n < batch_size:
            raise ValueError(f"batch_size={batch_size} is larger than the {self.n} activations available")
        self.batch_size = batch_size
        self.seed = seed
        self.per_epoch = self.n // batch_size
        self._epoch = -1
        self._perm: np.ndarray | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._epoch = epoch
        assert self._perm is not None
        return self._perm

    def batch_at(self, step: int) -> Batch:
        epoch, i = divmod(step, self.per_epoch)
        # Sorted for sequential reads; the trainer puts the rows back in a random order.
        idx = np.sort(self._permutation(epoch)[i * self.batch_size : (i + 1) * self.batch_size])
        labels = None if self.labels is None else self.labels[idx]
        return to_batch(self.x[idx], labels)

    def unique_rows(self, steps: int) -> int:
        """How many distinct rows the first ``steps`` batches contain."""
        seen = np.zeros(self.n, dtype=bool)
        full, rest = divmod(steps, self.per_epoch)
        for epoch in range(full + 1):
            used = self.per_epoch if epoch < full else rest
            seen[self._permutation(epoch)[: used * self.batch_size]] = True
            if seen.all():
                break
        return int(seen.sum())


class IteratorBatches:
    """Adapts a plain iterator of (x, labels) or x; on resume the first ``step`` items are skipped."""

    def __init__(self, items: Iterable[Any]) -> None:
        self._it: Iterator[Any] = iter(items)
        self._pos = 0
        self._last: tuple[int, Batch] | None = None

    def batch_at(self, step: int) -> Batch:
        if self._last is not None and self._last[0] == step:
            return self._last[1]
        if step < self._pos:
            raise ValueError(f"an iterator source cannot rewind to step {step} (at {self._pos})")
        while True:
            try:
                item = next(self._it)
            except StopIteration:
                msg = f"the batch iterator ran out at step {self._pos}; training needs more batches"
                raise ValueError(msg) from None
            self._pos += 1
            if self._pos - 1 == step:
                break
        batch = to_batch(*item) if isinstance(item, tuple) else to_batch(item)
        self._last = (step, batch)
        return batch


def uniform_rows(batch: Batch, n: int) -> Batch:
    """A fixed uniform sample of ``n`` rows of ``batch`` (all of them when it has no more), in row order."""
    if len(batch.x) <= n:
        return batch
    idx = M.sample_rows(len(batch.x), n)
    return Batch(batch.x[idx], None if batch.labels is None else batch.labels[idx])


def as_source(data: Any) -> BatchSource:
    return data if isinstance(data, BatchSource) else IteratorBatches(data)


@dataclass
class TrainResult:
    sae: SAE
    scale: float
    steps: int
    tokens: int
    wall_s: float
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    # The shared sparsity coefficient the SAE ended with (L1 coefficient x the calibrated multiplier); None for
    # variants without one (TopK).
    sparsity_coeff: float | None = None
    revived_latents: int = 0  # dead latents resampled over the run
    extensions: int = 0  # times the run trained on because the convergence rule failed (TrainConfig.max_extensions)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else float("nan")


def check_trained(steps: int, final_loss: float, metrics: dict[str, float]) -> None:
    """Raise DegenerateRunError unless the run trained and its SAE reconstructs with live features."""
    if steps <= 0:
        raise DegenerateRunError(f"trained {steps} steps: an untrained SAE has no scores", metrics)
    if not math.isfinite(final_loss):
        raise DegenerateRunError(f"final training loss is not finite ({final_loss})", metrics)
    check_live(metrics)


def check_live(metrics: dict[str, float]) -> None:
    """Raise DegenerateRunError unless the SAE reconstructs (explained variance > 0) with live features."""
    ev, l0, dead = metrics.get("explained_variance"), metrics.get("l0"), metrics.get("dead_fraction")
    if l0 is None or not math.isfinite(l0) or l0 <= 0:
        raise DegenerateRunError(f"L0 = {l0}: no feature fires on the evaluation batch", metrics)
    if dead is None or not dead < 1.0:
        raise DegenerateRunError(f"dead fraction = {dead}: every feature is dead", metrics)
    if ev is None or not math.isfinite(ev) or ev <= 0:
        raise DegenerateRunError(f"explained variance = {ev} <= 0: the SAE reconstructs worse than the mean", metrics)


@dataclass
class Progress:
    """What the trainer reports at a log step: the step's record, and the checkpoint saved at it, if any."""

    step: int
    record: dict[str, float]
    checkpoint: Path | None = None


ProgressCallback = Callable[[Progress], None]


class Trainer:
    """Trains one SAE on a batch source. Knows nothing of Ray: ``on_progress`` is the only way out.

    It alone owns checkpoints and resume: every ``checkpoint_every`` steps (and at the last step) it
    saves into ``checkpoint_dir``, keeps the newest ``keep_checkpoints``, and reports the path; a
    checkpoint step is also a log step.
    """

    def __init__(
        self,
        sae_cfg: SAEConfig,
        train_cfg: TrainConfig,
        on_progress: ProgressCallback | None = None,
        checkpoint_dir: str | Path | None = None,
    ) -> None:
        self.sae_cfg = sae_cfg
        self.budget = train_cfg  # the schedule asked for; ``cfg`` is it with the extensions trained so far
        self.cfg = train_cfg
        self.extensions = 0
        self.device = resolve_device(train_cfg.device)
        self.on_progress = on_progress
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        generator = torch.Generator().manual_seed(train_cfg.seed)
        self.sae = build_sae(sae_cfg, generator=generator).to(self.device)
        self.optimizer = torch.optim.AdamW(
            self.sae.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay
        )
        self._loss = torch.compile(self.sae.loss) if train_cfg.compile else self.sae.loss
        self.step = 0
        self.scale: float | None = None
        self.wall_s = 0.0
        self.history: list[dict[str, float]] = []
        self.last_loss = float("nan")
        self.controller = self._make_controller()
        self.revived_total = 0
        self.revived_since_log = 0
        self._val_batch: Batch | None = None  # the validation rows of the run in progress (``begin``)

    def _make_controller(self) -> L0Controller | None:
        """The L0 controller when the SAE has a ``target_l0`` and a sparsity coefficient to calibrate."""
        target = self.sae.p.target_l0
        if target is None or self.sae.sparsity_coeff() is None:
            return None
        cfg = self.cfg
        start, end = max(cfg.l1_warmup_steps, cfg.lr_warmup_steps), cfg.calibration_end()
        if end <= start:
            raise ValueError(f"calibration_fraction={cfg.calibration_fraction} ends the calibration at step {end}, "
                             f"before the warm-up ends (step {start}): no step is left to reach target_l0={target}")
        return L0Controller(target=float(target), start=start, end=end, gain=cfg.l0_control_gain,
                            ema_decay=cfg.l0_ema_decay)

    @property
    def warm_until(self) -> int:
        """The first step after the learning-rate and sparsity warm-ups."""
        return max(self.cfg.l1_warmup_steps, self.cfg.lr_warmup_steps)

    def _resamples(self) -> bool:
        return bool(self.cfg.resample_every) and self.sae.sparsity_coeff() is not None

    def sparsity_coeff(self) -> float | None:
        """The shared sparsity coefficient in effect (after the warm-up)."""
        base = self.sae.sparsity_coeff()
        if base is None:
            return None
        return base * (self.controller.multiplier if self.controller is not None else 1.0)

    @functools.cached_property
    def precision(self) -> PrecisionChoice:
        """The precision this trainer computes in, and why: "auto" measured on this device (hsae.machine)."""
        requested = {"none": "fp32"}.get(self.cfg.autocast, self.cfg.autocast)
        return resolve_precision(requested, self.device, self.sae_cfg.d_in, self.sae_cfg.d_sae)

    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision.precision == "bf16")

    # -- data ----------------------------------------------------------------------------------
    def _prepare(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = batch.x.to(self.device, non_blocking=True).float()
        if self.scale is not None:
            x = x * self.scale
        labels = batch.labels.to(self.device) if batch.labels is not None else None
        if self.sae.needs_labels and labels is None:
            raise ValueError(f"variant {self.sae_cfg.variant!r} needs domain labels with every batch")
        return x, labels

    @torch.no_grad()
    def _initialise_from(self, first: Batch) -> None:
        """Normalisation scale and b_dec from the first batch (the step-0 batch, so resume sees the same).

        The scale makes the *centred* per-element variance 1: residual streams carry large, nearly
        constant directions (Gemma's massive activations) that b_dec absorbs and that must not set
        the unit the sparsity penalty is measured in.
        """
        x = first.x.to(self.device).float()
        scale = activation_scale(x)  # also refuses a batch without variance
        self.scale = scale if self.cfg.normalize_activations else 1.0
        centre = geometric_median(x) if self.cfg.geometric_median_init else x.mean(dim=0)
        self.sae.b_dec.copy_(centre * self.scale)

    @torch.no_grad()
    def set_active_latents(self, x: torch.Tensor, l0: float) -> None:
        """Shift each latent's encoder bias so that it fires on a fraction l0 / n of the rows of ``x`` (L0 ~ l0):
        a trained SAE's sparsity, for measuring the costs that scale with the active latents."""
        pre = self.sae.pre_activation(x.to(self.device).float() * self.scale)
        self.sae.b_enc.sub_(torch.quantile(pre.float(), 1.0 - l0 / pre.shape[1], dim=0))

    # -- training ------------------------------------------------------------------------------
    def fit(
        self,
        data: Any,
        eval_batch: Batch | None = None,
        resume: bool = True,
        guard: bool = True,
    ) -> TrainResult:
        """Train to ``cfg.steps`` (resuming from ``checkpoint_dir`` if asked) and score on ``eval_batch``.

        A fixed sample of ``VALIDATION_ROWS`` of ``eval_batch`` (held-out rows) gives the validation MSE
        (``val_mse``) and mechanism curves of every log step; the final metrics use all of it. The same steps
        as ``train_together`` with one trainer: ``begin``, ``advance`` while ``wants_step``, ``finish``.
        """
        source = as_source(data)
        self.begin(source, eval_batch, resume)
        while self.wants_step():
            started = time.perf_counter()
            batch = source.batch_at(self.step)
            self.advance(batch, fetch_s=time.perf_counter() - started)
        return self.finish(source, eval_batch, guard)

    def begin(self, source: BatchSource, eval_batch: Batch | None = None, resume: bool = True) -> None:
        """Ready to step: resumed from ``checkpoint_dir`` if asked, the scale and b_dec from the step-0 batch, the
        validation rows drawn from ``eval_batch``."""
        if resume and self.checkpoint_dir is not None:
            latest = latest_checkpoint(self.checkpoint_dir)
            if latest is not None:
                self.load_checkpoint(latest)
        if self.scale is None:
            self._initialise_from(source.batch_at(0))
        self._val_batch = None if eval_batch is None else uniform_rows(eval_batch, VALIDATION_ROWS)
        self.sae.train()

    def wants_step(self) -> bool:
        """Whether a step is due: within the schedule, or at its end with the validation curve unconverged and an
        extension left (which is then scheduled)."""
        if self.step < self.cfg.steps:
            return True
        if self._val_batch is None or self.extensions >= self.cfg.max_extensions or self.convergence()["converged"]:
            return False
        self._extend(self.extensions + 1)
        return True

    def advance(self, batch: Batch, fetch_s: float = 0.0) -> None:
        """One step on ``batch`` (the source's batch at ``self.step``), logged when due. ``wall_s`` counts this
        trainer's own time: its steps and logs, and ``fetch_s``, its share of fetching the batch."""
        started = time.perf_counter()
        out, batch_size = self._train_step(batch)
        self.wall_s += time.perf_counter() - started + fetch_s
        if self._is_log_step():
            started = time.perf_counter()
            self._log(out, batch_size, self._val_batch)
            self.wall_s += time.perf_counter() - started

    def finish(self, source: BatchSource, eval_batch: Batch | None = None, guard: bool = True) -> TrainResult:
        """The final metrics on ``eval_batch`` (else the step-0 batch); with ``guard``, a DegenerateRunError if
        the SAE did not train."""
        return self._result(eval_batch if eval_batch is not None else source.batch_at(0), guard)

    def convergence(self) -> dict[str, Any]:
        """The convergence verdict (hsae.convergence) of the curve so far, over the current schedule."""
        history = self.history
        multiplier = None if self.controller is None else [h.get("sparsity_multiplier") for h in history]
        return convergence_verdict([h["step"] for h in history], [h.get("val_mse") for h in history], self.cfg.steps,
                                   self.warm_until, self.cfg.decay_start(), multiplier)

    def _extend(self, extensions: int) -> None:
        """Schedule ``extensions`` extensions: more steps, and the calibration phase (controller, resampling)
        stretched to its fraction of them."""
        self.extensions = extensions
        self.cfg = self.budget.extended(extensions)
        if self.controller is not None:
            self.controller.end = self.cfg.calibration_end()

    def _train_step(self, batch: Batch) -> tuple[LossOutput, int]:
        x, labels = self._prepare(batch)
        # Rows in a random order (a function of seed and step, so resume sees the same): every term
        # estimated on the first rows of a batch (Gram, regrouping, InfoNCE) sees a uniform sample.
        order = torch.from_numpy(np.random.default_rng([self.cfg.seed, self.step]).permutation(x.shape[0])).to(x.device)
        x = x[order]
        labels = labels[order] if labels is not None else None
        cfg = self.cfg
        warm = min(1.0, (self.step + 1) / cfg.l1_warmup_steps) if cfg.l1_warmup_steps else 1.0
        multiplier = self.controller.multiplier if self.controller is not None else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr_at(self.step)
        with self._autocast():
            out = self._loss(StepInput(x, labels, self.step, sparsity_scale=warm * multiplier))
        self.optimizer.zero_grad(set_to_none=True)
        out.total.backward()
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.step += 1
        self.sae.on_step_end(self.step, out.f.detach())
        if self.controller is not None:
            self.controller.observe(self.step - 1, float((out.f.detach() != 0).sum(dim=-1).float().mean()))
        self._maybe_resample(x)
        return out, x.shape[0]

    def _maybe_resample(self, x: torch.Tensor) -> None:
        """Every ``resample_every`` steps of the calibration phase, resample the dead latents."""
        every = self.cfg.resample_every
        if not self._resamples() or self.step % every or self.step >= self.cfg.calibration_end():
            return
        revived = resample_dead(self.sae, x, self.optimizer, self.cfg.seed, self.step)
        self.revived_total += revived
        self.revived_since_log += revived

    def _is_checkpoint_step(self) -> bool:
        every = self.cfg.checkpoint_every
        return bool(every and self.checkpoint_dir is not None
                    and (self.step % every == 0 or self.step == self.cfg.steps))

    def _is_log_step(self) -> bool:
        return self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps or self._is_checkpoint_step()

    def _log(self, out: LossOutput, batch_size: int, eval_batch: Batch | None) -> None:
        """Record the step (loss terms, L0, validation MSE), checkpoint if due, and report both."""
        record = {"step": float(self.step), "tokens": float(self.step * batch_size), "wall_s": self.wall_s}
        record["loss"] = float(out.total.detach())
        record.update({k: float(v.detach()) for k, v in out.terms.items()})
        record["l0"] = float((out.f.detach() != 0).sum(dim=-1).float().mean())
        record["tokens_per_s"] = record["tokens"] / max(self.wall_s, 1e-9)
        record["lr"] = self.optimizer.param_groups[0]["lr"]
        if self.controller is not None:
            record["sparsity_multiplier"] = self.controller.multiplier
        if self._resamples():
            record["revived_latents"] = float(self.revived_since_log)
            self.revived_since_log = 0
        if eval_batch is not None:
            record.update(self.validation_record(eval_batch))
        self.last_loss = record["loss"]
        self.history.append(record)
        checkpoint = None
        if self._is_checkpoint_step():
            assert self.checkpoint_dir is not None
            checkpoint = self.save_checkpoint(self.checkpoint_dir / f"step_{self.step:08d}")
            prune_checkpoints(self.checkpoint_dir, self.cfg.keep_checkpoints)
        if self.on_progress is not None:
            self.on_progress(Progress(self.step, record, checkpoint))

    @torch.no_grad()
    def validation_record(self, batch: Batch) -> dict[str, float]:
        """On held-out rows (eval mode, training units): the MSE and the variant's mechanism diagnostics."""
        x, labels = self._prepare(batch)
        self.sae.eval()
        try:
            x_hat, f = self.sae(x)
            return {"val_mse": M.mse(x, x_hat), **M.held_out_diagnostics(self.sae, f, labels),
                    **self.sae.mechanism_metrics(f)}
        finally:
            self.sae.train()

    def _result(self, eval_batch: Batch, guard: bool) -> TrainResult:
        """Final metrics on ``eval_batch``; with ``guard``, a DegenerateRunError if the SAE did not train."""
        if guard and not math.isfinite(self.last_loss):
            raise DegenerateRunError(f"final training loss is not finite ({self.last_loss})")
        x_eval, labels_eval = self._prepare(eval_batch)
        final = M.evaluate(self.sae, x_eval, labels_eval, nce_temperature=self.sae.metric_nce_temperature())
        if guard:
            check_trained(self.step, self.last_loss, final)
        return TrainResult(sae=self.sae, scale=float(self.scale if self.scale is not None else 1.0), steps=self.step,
                           tokens=self.step * self.cfg.batch_size, wall_s=self.wall_s, metrics=final,
                           history=list(self.history), sparsity_coeff=self.sparsity_coeff(),
                           revived_latents=self.revived_total, extensions=self.extensions)

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, path: str | Path) -> Path:
        """Everything a bit-exact resume needs, written to a temp dir and renamed into place."""
        path = Path(path)
        state = {k: v.detach().contiguous().clone() for k, v in self.sae.state_dict().items()}
        meta = {
            "step": self.step,
            "scale": self.scale,
            "wall_s": self.wall_s,
            "last_loss": self.last_loss,
            "sae_config": self.sae_cfg.to_dict(),
            "train_config": self.cfg.to_dict(),
            "history": self.history,
            "controller": None if self.controller is None else self.controller.state(),
            "revived": [self.revived_total, self.revived_since_log],
            "extensions": self.extensions,
        }
        with atomic_dir(path) as tmp:
            save_file(state, str(tmp / "sae.safetensors"))
            torch.save({"optimizer": self.optimizer.state_dict(), "torch_rng": torch.get_rng_state()},
                       tmp / "optimizer.pt")
            (tmp / "state.json").write_text(json.dumps(meta))
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        path = Path(path)
        meta = json.loads((path / "state.json").read_text())
        saved = SAEConfig.from_dict(meta["sae_config"])
        if saved.to_dict() != self.sae_cfg.to_dict():
            raise ValueError(f"checkpoint {path} is for {saved.to_dict()}, not {self.sae_cfg.to_dict()}")
        self.sae.load_state_dict(load_file(str(path / "sae.safetensors"), device=str(self.device)))
        blob = torch.load(path / "optimizer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(blob["optimizer"])
        torch.set_rng_state(blob["torch_rng"].cpu())
        self.step = int(meta["step"])
        self.scale = meta["scale"]
        self.wall_s = float(meta["wall_s"])
        self.last_loss = float(meta["last_loss"])
        self.history = list(meta["history"])
        if self.controller is not None:
            self.controller.load(meta["controller"])
        self.revived_total, self.revived_since_log = (int(v) for v in meta.get("revived", (0, 0)))
        self._extend(int(meta.get("extensions", 0)))


def train_together(trainers: Sequence[Trainer], data: Any, eval_batch: Batch | None = None, resume: bool = True,
                   guard: bool = True) -> list[TrainResult]:
    """Train several SAEs on one batch source, each batch fetched once for every trainer at its step: the arms of
    one seed read one data order, so each step's batch serves them all (dictionary_learning trains a list of
    trainers on one buffer the same way). Each trainer keeps its own schedule, checkpoints, convergence verdict
    and extensions (an arm that converged stops; one still extending goes on alone); a trainer resumed at
    another step than the others gets its own batches until it catches up. Every trainer steps exactly as its
    own ``fit`` would (nothing in a step draws from a shared random state), so the SAEs are the same.

    A fetched batch's time is shared evenly by the trainers that step on it (each one's ``wall_s``)."""
    source = as_source(data)
    for trainer in trainers:
        trainer.begin(source, eval_batch, resume)
    active = [t for t in trainers if t.wants_step()]
    while active:
        step = min(t.step for t in active)
        due = [t for t in active if t.step == step]
        started = time.perf_counter()
        batch = source.batch_at(step)
        fetch_s = (time.perf_counter() - started) / len(due)
        for trainer in due:
            trainer.advance(batch, fetch_s)
        active = [t for t in active if t not in due or t.wants_step()]
    return [t.finish(source, eval_batch, guard) for t in trainers]


def step_seconds(sae_cfg: SAEConfig, train_cfg: TrainConfig, steps: int = 3, l0: float | None = None) -> float:
    """Median seconds of one CPU training step of this SAE, on Gaussian rows at ``train_cfg``'s batch size and
    precision, after one warm-up step, in the calling process's torch threads; with ``l0``, about that many
    latents fire per row, as in a trained SAE (at initialisation half of them do, and the co-activation Gram's
    cost depends on how many fire: docs/performance.md).

    What orders a sweep's trials longest first (tune/ablate.py); a benchmark is bench/train_step.py.
    """
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((steps + 1) * train_cfg.batch_size, sae_cfg.d_in, generator=generator)
    source = ArrayBatches(x, torch.arange(len(x)) % 2, train_cfg.batch_size, seed=0)
    trainer = Trainer(sae_cfg, replace(train_cfg, device="cpu"))
    trainer._initialise_from(source.batch_at(0))
    if l0:
        trainer.set_active_latents(source.batch_at(0).x, l0)
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        trainer._train_step(source.batch_at(step))
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


@torch.no_grad()
def activation_scale(x: torch.Tensor) -> float:
    """The normalisation scale of a batch: sqrt(d / E||x - mean||^2), a centred per-element variance of 1."""
    x = x.float()
    var = float((x - x.mean(dim=0)).pow(2).sum(dim=1).mean())
    if not math.isfinite(var) or var <= 0:
        raise ValueError(f"the first activation batch has variance {var}: cannot train on it")
    return math.sqrt(x.shape[1] / var)


@torch.no_grad()
def geometric_median(x: torch.Tensor, iterations: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """The point minimising the summed Euclidean distance to the rows of ``x`` (Weiszfeld's algorithm)."""
    x = x.double()
    point = x.mean(dim=0)
    for _ in range(iterations):
        weights = 1.0 / (x - point).norm(dim=1).clamp_min(1e-12)
        new = (weights[:, None] * x).sum(dim=0) / weights.sum()
        moved = float((new - point).norm() / point.norm().clamp_min(1e-12))
        point = new
        if moved < tol:
            break
    return point.float()


def complete_checkpoints(directory: str | Path) -> list[Path]:
    """Finished checkpoint directories, oldest first (step numbers are zero-padded)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("step_*") if (p / "state.json").is_file())


def latest_checkpoint(directory: str | Path) -> Path | None:
    done = complete_checkpoints(directory)
    return done[-1] if done else None


def prune_checkpoints(directory: Path, keep: int) -> None:
    for old in complete_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
