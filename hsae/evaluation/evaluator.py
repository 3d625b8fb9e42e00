"""The evaluator: lives where the model lives (inside the activation server), scores SAEs by value.

Built once per sweep: question residuals at layer L are computed once and kept; every setting of
every SAE re-runs only the layers after L, only for the questions its intervention changes, and
computes logits only for the answer tokens. Everything it uses is held out from SAE training: the
questions, the activations that select features and set the control directions (``select_x``), and
the CE/KL contexts.

Select and test (docs/evaluation.md): ``select_x`` must come from *select* documents only and the CE/KL
contexts from *test* documents (the activation server hands them over so); every question carries its
document's role, and every grid setting records its accuracies on select and on test questions, so a
matched-retain value chooses on one part and reports the other (``hsae.scoring``, "folds"). Cross-fitted
(``test_x`` given): each SAE's grid is built twice, fold A's features chosen on select documents' activations
(its settings are then chosen on select questions and scored on test ones), fold B's on test documents'
activations (chosen on test questions, scored on select ones); every grid row names its fold.

Every answer keeps, beside whether the correct option wins (argmax of the options' scores), the softmax probability
of the correct option over those same scores, quantised to 16 bits (``hsae.scoring.quantise_p``): the continuous
outcome every ``*_p`` metric reads, recorded for every setting, both controls and the unmodified model.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from hsae.config import SAEConfig
from hsae.corpora import FORGET, RETAIN
from hsae.evaluation.interventions import ConditionalProjection, SAEClamp
from hsae.evaluation.questions import QuestionBank, option_scores, pad_prompts, require_bank_sizes
from hsae.evaluation.tail import full_log_probs, tail_hidden
from hsae.evaluation.unlearning import (
    Outcome,
    UnlearningConfig,
    baseline_point,
    firing_frequencies,
    run_grid,
    select_features,
)
from hsae.keys import content_key
from hsae.models import LoadedModel, stopped_forward
from hsae.progress import ProgressLine, format_duration
from hsae.scoring import quantise_p
from hsae.train import DegenerateRunError
from hsae.variants import build_sae


@dataclass(frozen=True)
class EvalConfig:
    unlearning: UnlearningConfig = field(default_factory=UnlearningConfig)
    ce_contexts_per_domain: int = 4
    control_percentiles: tuple[float, ...] = (90.0, 95.0, 99.0, 99.9)
    control_strengths: tuple[float, ...] = (1.0, 2.0, 4.0)
    random_feature_control: bool = True
    batch: int = 64
    seed: int = 0
    # Settings of one SAE that edit a prompt identically share its answer (``Evaluator.accuracy``'s memo); False
    # re-runs every setting's prompts (the former path: bench/evaluation.py compares the two).
    share_answers: bool = True
    # Cross-fitting: a second grid per SAE whose features (and random control) are chosen on the *test* documents'
    # activations (fold B), so that fold B's scores on select questions are held out too and both folds are
    # reported (hsae.scoring, "folds"). False: fold A alone, about half the evaluation.
    crossfit: bool = True


def sae_from_weights(cfg: dict[str, Any], state: dict[str, np.ndarray]) -> Any:
    """An SAE (eval mode, raw-activation weights) from its config dict and folded state arrays; an external
    arm's SAE (``{"external": SAELens config}``, hsae.external) is rebuilt by SAELens."""
    if "external" in cfg:
        from hsae.external import from_weights

        return from_weights(cfg, state)
    sae = build_sae(SAEConfig.from_dict(cfg))
    # A copy: arrays from Ray's object store are read-only.
    sae.load_weights({k: torch.tensor(np.asarray(v)) for k, v in state.items()})
    return sae.eval()


def edit_ratios(resid: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
    """||edit|| / ||residual|| at every edited token position: the units every intervention shares."""
    delta = (edited - resid).norm(dim=-1)
    hit = delta > 0
    return delta[hit] / resid.norm(dim=-1)[hit].clamp_min(1e-12)


class BatchFeatures:
    """An SAE's features of the question batches, computed once per batch instead of once per setting.

    Keyed by the batch tensor's identity: the evaluator's question residuals are fixed tensors, so a
    batch's features never change while one SAE is scored.
    """

    def __init__(self, encode: Any) -> None:
        self.encode = encode
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        hit = self._cache.get(id(x))
        if hit is None or hit[0] is not x:
            hit = (x, self.encode(x))
            self._cache[id(x)] = hit
        return hit[1]


# Part of every evaluation's cache key: bump when what an evaluation returns changes for the same inputs.
# 2: accuracies on select and test questions too (matched retain: chosen on select, reported on test); 3: the
# probability of the correct option per question too, and the unmodified model's grid point; 4: every grid row names
# its fold, and a cross-fitted evaluation adds fold B's grid (features chosen on test documents).
EVAL_FORMAT = 4


def eval_cache_key(cfg: dict[str, Any], state: dict[str, np.ndarray], eval_cfg: EvalConfig, extra: Any) -> str:
    """Content hash of weights + configs: results are never cached under a name."""
    return content_key({"sae": cfg, "eval": asdict(eval_cfg), "extra": extra, "format": EVAL_FORMAT},
                       arrays=state, length=None)


class Evaluator:
    def __init__(
        self,
        loaded: LoadedModel,
        bank: QuestionBank,
        select_x: Any,
        select_labels: np.ndarray,
        eval_tokens: np.ndarray,
        eval_domains: np.ndarray,
        cfg: EvalConfig | None = None,
        progress: Callable[[str], None] | None = None,
        test_x: Any = None,
        test_labels: np.ndarray | None = None,
    ) -> None:
        self.loaded = loaded
        self.cfg = cfg or EvalConfig()
        # Where the one-off work (question residuals, controls) reports progress; per-SAE evaluations
        # stay silent: concurrent trials' lines would interleave.
        self.progress = progress
        require_bank_sizes(bank, self.cfg.unlearning.min_forget_questions, self.cfg.unlearning.min_retain_questions)
        self.bank = bank
        # Held-out content activations (no BOS/EOS/pad) for firing frequencies and control directions.
        self.select_x = select_x
        self.select_labels = np.asarray(select_labels)
        # The same from *test* documents: what chooses fold B's features (None: fold A alone).
        self.test_x = test_x if self.cfg.crossfit else None
        self.test_labels = None if self.test_x is None or test_labels is None else np.asarray(test_labels)
        if self.test_x is not None and self.test_labels is None:
            raise ValueError("test_x needs its test_labels (forget/retain of every row)")
        self.domains = np.asarray(bank.domain)
        self.is_select = bank.is_select()  # select questions choose settings; test questions are reported
        self.n_forget, self.n_retain = bank.count(FORGET), bank.count(RETAIN)
        self._prepare_questions()
        self._prepare_ce(eval_tokens, eval_domains)
        self._results: dict[str, dict[str, Any]] = {}

    def replica(self) -> Evaluator:
        """A twin that shares the bank, the question residuals, the CE references and the result cache, with a
        model copy and lock of its own: two replicas evaluate on two threads at once (the tail re-run cuts its
        model's block list while it runs). Call it after ``warm`` so nothing lazy is left to build twice."""
        twin = copy.copy(self)
        twin.loaded = replace(self.loaded, model=copy.deepcopy(self.loaded.model), lock=threading.RLock())
        return twin

    def warm(self) -> None:
        """Compute the SAE-independent CE references (clean and zero-ablation) now, not in the first evaluation."""
        for data in self.ce_sets.values():
            self._ce_references(data)

    def _say(self, msg: str) -> None:
        if self.progress is not None:
            self.progress(f"[hsae] {msg}")

    # -- question residuals (once) --------------------------------------------------------------
    def _prepare_questions(self) -> None:
        bank, loaded = self.bank, self.loaded
        pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
        order = np.argsort([len(p) for p in bank.prompts], kind="stable")
        self.batches = []
        line = ProgressLine(self.progress, "[hsae] question residuals", len(bank), "prompts")
        for start in range(0, len(bank), self.cfg.batch):
            idx = order[start : start + self.cfg.batch]
            ids, last = pad_prompts([bank.prompts[i] for i in idx], pad)
            valid = (torch.arange(ids.shape[1])[None, :] <= last[:, None]).float()
            resid = stopped_forward(loaded, ids).float().cpu()
            self.batches.append({
                "idx": idx, "resid": resid, "last": last, "valid": valid,
                "options": [bank.options[i] for i in idx],
                "answer": torch.tensor([bank.answer[i] for i in idx]),
                "domain": np.array([bank.domain[i] for i in idx]),
            })
            line.advance(len(idx))
        # The unmodified model's answers, from the same residuals every setting starts from: the baseline each
        # grid reports, and the answer a question keeps when an intervention leaves its prompt untouched.
        self.baseline_correct = np.zeros(len(bank), dtype=bool)
        self.baseline_p = np.zeros(len(bank), dtype=np.uint16)  # the correct option's probability, quantised
        for b in self.batches:
            self.baseline_correct[b["idx"]], self.baseline_p[b["idx"]] = self._answered(
                b, torch.arange(len(b["idx"])), b["resid"])

    @torch.no_grad()
    def _answered(self, b: dict[str, Any], rows: torch.Tensor, resid: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Whether questions ``rows`` of batch ``b`` are answered correctly from these layer-L residuals (argmax of
        the options' scores), and the softmax probability of the correct option over those scores (quantised)."""
        hidden = tail_hidden(self.loaded, resid)
        last = hidden[torch.arange(len(rows)), b["last"][rows]]
        scores = option_scores(self.loaded, last, [b["options"][int(r)] for r in rows]).cpu()
        answer = b["answer"][rows]
        p = torch.softmax(scores.double(), dim=-1).gather(1, answer[:, None])[:, 0]
        return (scores.argmax(dim=-1) == answer).numpy(), quantise_p(p.numpy())

    def _answers(self, b: dict[str, Any], i: int, rows: torch.Tensor, edited: torch.Tensor, intervention: Any,
                 memo: dict[tuple, tuple[bool, int]] | None) -> tuple[np.ndarray, np.ndarray]:
        """Whether the edited prompts ``rows`` of batch ``b`` (the ``i``-th) are answered correctly, and the correct
        option's quantised probability; prompts whose edit ``memo`` has seen keep its answer, the rest are re-run."""
        if memo is None or not hasattr(intervention, "edit_keys"):
            return self._answered(b, rows, edited[rows])
        keys = [(i, int(r), *k) for r, k in zip(rows, intervention.edit_keys(b["resid"], b["valid"], rows),
                                                strict=True)]
        new = [j for j, k in enumerate(keys) if k not in memo]
        if new:
            run = rows[new]
            answers, probs = self._answered(b, run, edited[run])
            for j, answer, p in zip(new, answers, probs, strict=True):
                memo[keys[j]] = (bool(answer), int(p))
        return (np.array([memo[k][0] for k in keys], dtype=bool),
                np.array([memo[k][1] for k in keys], dtype=np.uint16))

    @torch.no_grad()
    def accuracy(self, intervention: Any, memo: dict[tuple, tuple[bool, int]] | None = None) -> Outcome:
        """Which questions stay correct under ``intervention`` (bank order), how probable each correct option stays,
        and how hard it edits.

        Untouched questions keep the unmodified model's answer and probability (``baseline_correct``,
        ``baseline_p``), so only changed prompts are re-run. With a ``memo`` (one per SAE) and an intervention that
        names its edits (``edit_keys``), a prompt edited exactly as an earlier setting edited it keeps that setting's
        answer.
        With ``stop_retain_early``, once retain errors exceed what the retain bar allows the remaining
        retain prompts are skipped: the retain accuracy is then an upper bound (exact = False).
        """
        ucfg = self.cfg.unlearning
        # Skipping is safe once the setting fails the bar both where matched retain chooses (select retain
        # questions) and where the SAEBench score looks (all retain questions): neither can then pick it.
        retain, select_retain = self.domains == RETAIN, (self.domains == RETAIN) & self.is_select

        def failed(correct: np.ndarray) -> bool:
            return all(int((~correct[m]).sum()) > int(np.floor((1 - ucfg.retain_bar) * int(m.sum()) + 1e-9))
                       for m in (retain, select_retain))

        correct, prob = self.baseline_correct.copy(), self.baseline_p.copy()
        touched, ratios = 0, []
        for i, b in enumerate(self.batches):
            edited, changed = intervention.apply(b["resid"], b["valid"])
            if ucfg.stop_retain_early and failed(correct):
                changed = changed & torch.as_tensor(b["domain"] == FORGET)
            if not bool(changed.any()):
                continue
            rows = torch.nonzero(changed).flatten()
            touched += len(rows)
            ratios.append(edit_ratios(b["resid"][rows], edited[rows]))
            where = b["idx"][rows.numpy()]
            correct[where], prob[where] = self._answers(b, i, rows, edited, intervention, memo)
        exact = not (ucfg.stop_retain_early and failed(correct))
        ratio = float(torch.cat(ratios).mean()) if ratios and sum(len(r) for r in ratios) else float("nan")
        return Outcome(correct, touched, exact, ratio, prob)

    # -- unlearning -------------------------------------------------------------------------------
    def unlearning(self, sae_cfg: dict[str, Any], state: dict[str, np.ndarray]) -> dict[str, Any]:
        """SAEBench unlearning grid, the extended grid and the random-feature control of one SAE given by
        value (folded weights, raw activations): fold A's, features chosen on select documents' activations, and
        when cross-fitted fold B's too, chosen on test documents' (every grid row names its fold). The SAEBench
        score and the counts are fold A's."""
        key = eval_cache_key(sae_cfg, state, self.cfg, "unlearning")
        if key in self._results:
            return self._results[key]
        t0 = time.perf_counter()
        sae = sae_from_weights(sae_cfg, state)
        # One SAE's answers by edit, shared by both folds' grids and random controls.
        memo: dict[tuple, tuple[bool, int]] | None = {} if self.cfg.share_answers else None
        out = self._fold_grid(sae, "A", self.select_x, self.select_labels, memo)
        if self.test_x is not None:
            fold_b = self._fold_grid(sae, "B", self.test_x, self.test_labels, memo)
            for name in ("grid", "random_feature_grid"):
                if name in fold_b:
                    out[name] = out[name] + fold_b[name]
        out["eval_s"] = time.perf_counter() - t0
        self._results[key] = out
        return out

    def _fold_grid(self, sae: Any, fold: str, x: Any, labels: np.ndarray,
                   memo: dict[tuple, tuple[bool, int]] | None) -> dict[str, Any]:
        """One fold's grid (and random control), its features chosen on the firing frequencies of ``x``."""
        forget_freq, retain_freq = firing_frequencies(sae.encode, x, labels)
        if forget_freq.max() <= 0 and retain_freq.max() <= 0:
            raise DegenerateRunError("no SAE feature fires on forget or retain text: nothing to select, no score")
        settings = [{**s, "fold": fold} for s in self.cfg.unlearning.settings(sae.cfg.d_sae)]
        selections = {(s["retain_threshold"], s["n_features"]): select_features(
            forget_freq, retain_freq, s["retain_threshold"], s["n_features"]) for s in settings}
        result = self._clamp_grid(sae, settings, lambda s: selections[(s["retain_threshold"], s["n_features"])],
                                  memo)
        out = result.as_dict()
        if self.cfg.random_feature_control:
            out["random_feature_score"], out["random_feature_grid"] = self._random_control(
                sae, settings, forget_freq, retain_freq, memo)
        out["forget_freq_max"] = float(forget_freq.max())
        return out

    def _clamp_grid(self, sae: Any, settings: list[dict[str, Any]], features_for: Any,
                    memo: dict[tuple, tuple[bool, int]] | None = None) -> Any:
        """Clamp the features ``features_for(setting)`` names, for every setting; the grid records how many."""
        w_dec = sae.W_dec.detach()
        encode = BatchFeatures(sae.encode)  # every setting clamps the same question batches' features
        outcomes: dict[tuple[tuple[int, ...], float], Outcome] = {}

        def clamp(s: dict[str, Any]) -> SAEClamp:
            features = torch.as_tensor(features_for(s), dtype=torch.long)
            return SAEClamp(encode, w_dec, features, float(s["multiplier"]))

        def accuracy(c: SAEClamp) -> Outcome:
            # Thresholds often select the same features: the same clamp is answered once.
            key = (tuple(c.features.tolist()), c.multiplier)
            if key not in outcomes:
                outcomes[key] = self.accuracy(c, memo)
            return outcomes[key]

        result = run_grid(settings, clamp, accuracy, self.domains, self.is_select, self.baseline_correct,
                          self.cfg.unlearning.retain_bar, self.baseline_p)
        for g in result.grid:
            g["features_selected"] = int(len(features_for(g)))
            g["bank"] = self.bank.key
        result.extra["baseline"]["bank"] = self.bank.key
        return result

    def _random_control(self, sae: Any, settings: list[dict[str, Any]], forget_freq: np.ndarray,
                        retain_freq: np.ndarray, memo: dict[tuple, tuple[bool, int]] | None = None
                        ) -> tuple[float, list[dict[str, Any]]]:
        """The negative control: SAEBench's clamps on random live features (retain threshold ignored, so one
        threshold's settings cover it)."""
        rng = np.random.default_rng(self.cfg.seed)
        live = np.flatnonzero((forget_freq > 0) | (retain_freq > 0))
        counts = sorted({s["n_features"] for s in settings})
        randoms = {n: rng.choice(live, size=min(n, len(live)), replace=False) for n in counts}
        first = self.cfg.unlearning.retain_thresholds[0]
        chosen = [{**s, "retain_threshold": None} for s in settings
                  if s["grid"] == "saebench" and s["retain_threshold"] == first]
        result = self._clamp_grid(sae, chosen, lambda s: randoms[s["n_features"]], memo)
        return result.score, result.grid

    # -- controls -------------------------------------------------------------------------------------
    def controls(self) -> dict[str, Any]:
        """Positive control (difference-of-means direction, conditional removal) and its negative twin
        (a random direction through the same code): direction, center and thresholds from the select documents'
        activations (``select_x``), each grid's setting chosen on select questions and reported on test
        questions, like an SAE's. SAE-independent."""
        if "controls" in self._results:
            return self._results["controls"]
        t0 = time.perf_counter()
        labels = self.select_labels
        x = torch.as_tensor(np.asarray(self.select_x[np.arange(len(labels))]), dtype=torch.float32)
        mu_f, mu_r = x[labels == FORGET].mean(0), x[labels == RETAIN].mean(0)
        center = 0.5 * (mu_f + mu_r)
        dom = (mu_f - mu_r) / (mu_f - mu_r).norm()
        rand = torch.randn(dom.shape[0], generator=torch.Generator().manual_seed(self.cfg.seed))
        settings = [{"percentile": q, "strength": s} for q in self.cfg.control_percentiles
                    for s in self.cfg.control_strengths]
        n = 2 * len(settings)
        self._say(f"evaluation controls: {n} settings (positive and negative direction) on {len(self.domains)} "
                  "questions")
        line = ProgressLine(self.progress, "[hsae] evaluation controls", n, "settings")

        def counted(intervention: Any) -> Outcome:
            outcome = self.accuracy(intervention)
            line.advance()
            return outcome

        out: dict[str, Any] = {name: self._control_grid(direction, center, x[labels == RETAIN], settings, counted)
                               for name, direction in (("positive", dom), ("negative", rand / rand.norm()))}
        out["baseline"] = {"grid": [self.baseline_point()]}  # the unmodified model: every probability share's reference
        out["eval_s"] = time.perf_counter() - t0
        self._say(f"evaluation controls: {n} settings done in {format_duration(out['eval_s'])}")
        self._results["controls"] = out
        return out

    def _control_grid(self, direction: torch.Tensor, center: torch.Tensor, retain_x: torch.Tensor,
                      settings: list[dict[str, Any]], accuracy: Callable[[Any], Outcome]) -> dict[str, Any]:
        """One control's grid: conditional removal along ``direction`` past each retain-projection percentile."""
        retain_proj = ((retain_x - center) @ direction).numpy()
        thresholds = {q: float(np.percentile(retain_proj, q)) for q in self.cfg.control_percentiles}
        res = run_grid(settings, lambda s: ConditionalProjection(
            direction, center, thresholds[s["percentile"]], s["strength"]), accuracy, self.domains,
            self.is_select, self.baseline_correct, self.cfg.unlearning.retain_bar)
        for g in res.grid:
            g["bank"] = self.bank.key
        return res.as_dict()

    def baseline_point(self) -> dict[str, Any]:
        """The unmodified model's grid point: its outcomes and probabilities of the correct option on this bank."""
        point = baseline_point(self.baseline_correct, self.baseline_p, self.domains, self.is_select)
        return {**point, "bank": self.bank.key}

    # -- CE / KL --------------------------------------------------------------------------------------
    def _prepare_ce(self, tokens: np.ndarray, domains: np.ndarray) -> None:
        k = self.cfg.ce_contexts_per_domain
        self.ce_sets = {}
        for d in (FORGET, RETAIN):
            pick = np.flatnonzero(domains == d)[:k]
            if len(pick) == 0:
                continue
            ids = torch.as_tensor(tokens[pick], dtype=torch.long)
            resid = stopped_forward(self.loaded, ids).float().cpu()
            self.ce_sets[d] = {"ids": ids, "resid": resid}

    def _log_probs(self, resid: torch.Tensor) -> list[torch.Tensor]:
        """Next-token log-probabilities from positions 1..T-2 (position 0, BOS, is never edited)."""
        hidden = tail_hidden(self.loaded, resid)[:, 1:-1]
        return [full_log_probs(self.loaded, hidden[b]) for b in range(hidden.shape[0])]

    @staticmethod
    def _ce_kl(log_probs: list[torch.Tensor], ids: torch.Tensor, reference: list[torch.Tensor] | None
               ) -> tuple[float, float | None]:
        """Mean CE of the next tokens and mean KL(reference || log_probs) per token."""
        targets = ids[:, 2:]
        ce_sum, kl_sum, count = 0.0, 0.0, 0
        for b, logp in enumerate(log_probs):
            ce_sum += float(-logp.gather(1, targets[b].to(logp.device)[:, None]).sum())
            if reference is not None:
                ref = reference[b]
                kl_sum += float((ref.exp() * (ref - logp)).sum())
            count += targets.shape[1]
        return ce_sum / count, (kl_sum / count if reference is not None else None)

    def _ce_references(self, data: dict[str, Any]) -> None:
        """SAE-independent, computed once: the clean distributions (kept for every SAE's KL), the clean CE and
        the CE with the residual zeroed."""
        if "clean" in data:
            return
        resid, ids = data["resid"], data["ids"]
        data["clean_log_probs"] = self._log_probs(resid)
        zero = resid.clone()
        zero[:, 1:] = 0.0
        data["zero"] = self._ce_kl(self._log_probs(zero), ids, None)[0]
        data["clean"] = self._ce_kl(data["clean_log_probs"], ids, None)[0]  # last: "clean" marks it done

    def ce_scores(self, sae_cfg: dict[str, Any], state: dict[str, np.ndarray]) -> dict[str, Any]:
        """CE-loss score (CE_zero - CE_sae)/(CE_zero - CE_clean) and KL(clean || sae), per domain."""
        key = eval_cache_key(sae_cfg, state, self.cfg, "ce")
        if key in self._results:
            return self._results[key]
        sae = sae_from_weights(sae_cfg, state)
        out: dict[str, Any] = {}
        for d, data in self.ce_sets.items():
            name = "forget" if d == FORGET else "retain"
            resid, ids = data["resid"], data["ids"]
            self._ce_references(data)
            spliced = resid.clone()
            with torch.no_grad():
                spliced[:, 1:] = sae(resid[:, 1:])[0]
            ce_sae, kl = self._ce_kl(self._log_probs(spliced), ids, data["clean_log_probs"])
            denom = data["zero"] - data["clean"]
            out[f"ce_clean_{name}"] = data["clean"]
            out[f"ce_zero_{name}"] = data["zero"]
            out[f"ce_sae_{name}"] = ce_sae
            out[f"ce_score_{name}"] = (data["zero"] - ce_sae) / denom if denom else float("nan")
            out[f"kl_{name}"] = kl
        self._results[key] = out
        return out
