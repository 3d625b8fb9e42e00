"""How large a cloze bank the held-out documents allow, and what the unmodified model answers of it.

    python bench/bank_size.py [--profile embedded]

Builds every cloze candidate of the profile's held-out documents (no candidate or bank cap), scores them with the
unmodified model (the bank's own filter, ``answers_correct``) and prints, per domain and role: held-out documents,
candidates, candidates answered correctly (the most a bank can hold) and the share; then what the profile's own
``BankConfig`` keeps. Nothing is cached or written.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import torch

from hsae.corpora import FORGET, RETAIN, load_corpus, split_documents
from hsae.evaluation.questions import answers_correct, bank_source
from hsae.models import load_model
from hsae.profiles import get_profile


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="embedded")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    profile = get_profile(args.profile)
    if profile.bank.kind != "cloze":
        raise SystemExit("bench/bank_size.py measures cloze banks (the letter bank is WMDP / MMLU's test sets)")
    h = profile.harvest
    dataset = load_corpus(h.corpus)
    _, heldout = split_documents(dataset, h.holdout_fraction, h.seed)
    uncapped = replace(profile.bank, candidates_per_domain=10**9, max_forget=10**9, max_retain=10**9)
    loaded = load_model(replace(h.model, source=profile.eval_model or h.model.source, dtype="auto"))
    t0 = time.perf_counter()
    bank, _ = bank_source(loaded, h.corpus, uncapped, h.holdout_fraction, h.seed)()
    t1 = time.perf_counter()
    correct = answers_correct(loaded, bank)
    t2 = time.perf_counter()
    domains, roles = np.asarray(bank.domain), np.asarray(bank.role)
    docs = np.asarray(heldout["domain"])
    print(f"{args.profile}: candidates built in {t1 - t0:.1f} s, scored in {t2 - t1:.1f} s "
          f"({len(bank) / max(t2 - t1, 1e-9):.0f} prompts/s)")
    print("| domain | held-out docs | role | candidates | answered correctly | share | bank cap |")
    print("|---|---|---|---|---|---|---|")
    caps = {FORGET: profile.bank.max_forget, RETAIN: profile.bank.max_retain}
    for d, name in ((FORGET, "forget"), (RETAIN, "retain")):
        for role in ("select", "test", "all"):
            m = (domains == d) & ((roles == role) if role != "all" else True)
            n, k = int(m.sum()), int(correct[m].sum())
            cap = caps[d] if role == "all" else ""
            print(f"| {name} | {int((docs == d).sum())} | {role} | {n} | {k} | {k / max(n, 1):.2f} | {cap} |")
    per_domain = {d: int((domains == d).sum()) for d in (FORGET, RETAIN)}
    print(f"the profile draws at most {profile.bank.candidates_per_domain} candidates per domain "
          f"(of {per_domain[FORGET]} forget / {per_domain[RETAIN]} retain that exist)")


if __name__ == "__main__":
    main()
