"""Progress text: durations, ETAs, the rate limit of long loops, and the lines the bank and controls print."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

from hsae.progress import ProgressLine, eta_text, format_duration


def test_format_duration_switches_units_at_a_minute_and_an_hour():
    assert format_duration(0) == "0 s"
    assert format_duration(40) == "40 s"
    assert format_duration(59.4) == "59 s"
    assert format_duration(59.6) == "1 min 0 s"  # rounded first, so never "60 s"
    assert format_duration(60) == "1 min 0 s"
    assert format_duration(190) == "3 min 10 s"
    assert format_duration(3599) == "59 min 59 s"
    assert format_duration(3600) == "1 h 00 min"
    assert format_duration(3900) == "1 h 05 min"
    assert format_duration(-3) == "0 s"
    assert format_duration(math.nan) == "?"


def test_eta_text_extrapolates_the_rate_so_far():
    assert eta_text(0, 100, 10.0) == ""  # nothing done: no rate, no promise
    assert eta_text(25, 100, 10.0) == "ETA 30 s"
    assert eta_text(10, 20, 190.0) == "ETA 3 min 10 s"
    assert eta_text(1, 2, 3900.0) == "ETA 1 h 05 min"
    assert eta_text(100, 100, 10.0) == "ETA 0 s"


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize("seconds_per_item, expected_at", [
    (0.01, []),  # a short loop: silent
    (1.0, [30, 60, 90]),  # 30 s comes later than 10%: a line every 30 s
    (100.0, [10, 20, 30, 40, 50, 60, 70, 80, 90]),  # 10% comes later than 30 s: a line every 10%
])
def test_progress_line_prints_when_both_ten_percent_and_thirty_seconds_have_passed(seconds_per_item, expected_at):
    clock, lines, at = FakeClock(), [], []
    line = ProgressLine(lines.append, "[hsae] work", 100, "items", clock=clock)
    for _ in range(100):
        clock.t += seconds_per_item
        line.advance()
        if len(lines) > len(at):
            at.append(line.done)
    assert at == expected_at  # never at the end: the caller says it is done in its own words
    for text in lines:
        assert text.startswith("[hsae] work: ") and "/100 items" in text and "items/s" in text and "ETA" in text
    ProgressLine(None, "silent", 10, "items", every_s=0).advance(5)  # None: no callback, no error


def test_bank_and_controls_say_what_they_do_with_an_eta(tmp_path, monkeypatch):
    """The question bank and the controls report through the progress callback, a few lines each (the 30 s
    floor is lifted here so a tiny model's second-long loops still print)."""
    import hsae.evaluation.evaluator as evaluator_mod
    import hsae.evaluation.questions as questions_mod
    from hsae.activations import HarvestConfig, harvest
    from hsae.corpora import CorpusSpec, load_corpus
    from hsae.evaluation.evaluator import EvalConfig, Evaluator
    from hsae.evaluation.questions import BankConfig, build_bank, cloze_source
    from hsae.evaluation.unlearning import UnlearningConfig
    from hsae.models import ModelSpec, load_model

    eager = functools.partial(ProgressLine, every_s=0.0)
    monkeypatch.setattr(questions_mod, "ProgressLine", eager)
    monkeypatch.setattr(evaluator_mod, "ProgressLine", eager)
    cfg = HarvestConfig(model=ModelSpec("tiny"), corpus=CorpusSpec("toy"), ctx_len=32, n_ctxs=16, n_eval_ctxs=8,
                        shard_ctxs=16)
    h = harvest(cfg, root=tmp_path, progress=None)
    loaded = load_model(cfg.model)
    bank_cfg = BankConfig(max_forget=1000, max_retain=1000)
    lines: list[str] = []
    bank = build_bank(loaded, bank_cfg, cloze_source(loaded.tokenizer, load_corpus(cfg.corpus), bank_cfg),
                      {"test": "progress"}, progress=lines.append, root=tmp_path)
    assert any("question bank: building the cloze bank" in s for s in lines)
    scored = [s for s in lines if "question bank scoring: " in s]
    assert scored and all("ETA" in s and "prompts/s" in s for s in scored)
    assert len(scored) <= 9  # at most one line per 10% (none at the end), never one per batch of prompts
    assert "questions kept" in lines[-1]
    # ... with the share of the candidates the unmodified model answers correctly, per domain, and the caps.
    assert "answered correctly" in lines[-1] and "cap 1000" in lines[-1]
    for name, domain in (("forget", 1), ("retain", 0)):
        made = bank.candidates[name]
        assert made["candidates"] >= made["answered"] == bank.count(domain)  # caps of 1000: every one kept

    lines.clear()
    x, labels = h.arrays("eval")
    small = EvalConfig(unlearning=UnlearningConfig(min_forget_questions=10, min_retain_questions=10),
                       ce_contexts_per_domain=1)
    ev = Evaluator(loaded, bank, x, labels, np.load(h.dir / "tokens_eval.npy"), np.load(h.dir / "domains_eval.npy"),
                   small, progress=lines.append)
    residuals = [s for s in lines if s.startswith("[hsae] question residuals: ")]
    assert residuals and len(residuals) == len(lines) and all(f"/{len(bank)} prompts" in s for s in residuals)
    lines.clear()
    ev.controls()
    n = 2 * len(small.control_percentiles) * len(small.control_strengths)
    assert lines[0].startswith(f"[hsae] evaluation controls: {n} settings")
    settings = [s for s in lines if s.startswith("[hsae] evaluation controls: ") and "settings/s" in s]
    assert 1 <= len(settings) <= 10 and all("ETA" in s for s in settings)
    assert "done in" in lines[-1]
    lines.clear()
    ev.controls()  # cached: no work, no lines
    assert lines == []
