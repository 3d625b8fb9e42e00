"""Small shared pieces for the tests: quick synthetic training at test-friendly sizes, and the evaluator
built the way a sweep builds it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from hsae.config import SAEConfig, TrainConfig
from hsae.train import ArrayBatches, Trainer, to_batch

D_IN, D_SAE, BATCH = 32, 256, 256

# Group counts that divide a 64-feature dictionary; everything else at the defaults (contract and export tests).
TINY_PARAMS = {
    "fixed_ortho": {"n_groups": 8},
    "adaptive_ortho": {"n_groups": 8},
    "enhanced_adaptive": {"n_groups": 8},
    "static_hier": {"n_groups_l1": 4, "n_groups_l2": 4},
    "dynamic_hier": {"n_groups_l1": 4, "n_groups_l2": 4},
    "contrastive_hier": {"n_groups_l1": 4, "n_groups_l2": 4},
    "topk": {"k": 8},
    "matryoshka_batchtopk": {"k": 8},
}

# Group counts that fit a 256-feature dictionary at test size; everything else stays at paper defaults.
SMALL_PARAMS = {
    "fixed_ortho": {"n_groups": 8},
    "adaptive_ortho": {"n_groups": 8, "regroup_every": 50},
    "enhanced_adaptive": {"n_groups": 16, "regroup_every": 25},
    "static_hier": {"n_groups_l1": 4, "n_groups_l2": 4},
    "dynamic_hier": {"n_groups_l1": 4, "n_groups_l2": 4, "refresh_every": 25},
    "contrastive_hier": {"n_groups_l1": 4, "n_groups_l2": 4, "refresh_every": 25},
    "topk": {"k": 16},
    "matryoshka_batchtopk": {"k": 16},
}


def train_small(data, variant, steps=200, lr=3e-3, checkpoint_dir=None, checkpoint_every=0,
                on_progress=None, log_every=50, guard=True, **params):
    cfg = SAEConfig(variant, D_IN, D_SAE, {**SMALL_PARAMS.get(variant, {}), **params})
    tcfg = TrainConfig(steps=steps, batch_size=BATCH, lr=lr, log_every=log_every,
                       checkpoint_every=checkpoint_every)
    trainer = Trainer(cfg, tcfg, on_progress=on_progress, checkpoint_dir=checkpoint_dir)
    n_train = len(data.x) - 2048
    source = ArrayBatches(data.x[:n_train], data.labels[:n_train], BATCH, tcfg.seed)
    result = trainer.fit(source, eval_batch=to_batch(data.x[n_train:], data.labels[n_train:]), guard=guard)
    return trainer, result


def served_evaluator(profile: str, root: Path, **overrides: Any) -> Any:
    """The evaluator of a sweep on ``profile`` (``overrides``: its fields), built by ``ActivationServer``
    itself (a plain object here, not an actor; Ray must be initialised for its ``ray.put``): the corpus
    split by document first, the question bank from held-out documents only, firing frequencies and control
    directions from held-out content activations. A regression in that split reaches every test using it."""
    return served(profile, root, **overrides).evaluator()


def served(profile: str, root: Path, **overrides: Any) -> Any:
    """The activation server of a sweep on ``profile`` (``overrides``: its fields), as a plain object."""
    from hsae.profiles import get_profile
    from hsae.server import ActivationServer

    chosen = get_profile(profile, **overrides)
    eval_cfg, bank_cfg = chosen.eval, chosen.bank
    return ActivationServer(chosen.harvest, cache_root=str(root), eval_cfg=eval_cfg, bank_cfg=bank_cfg)


def assert_evaluation_held_out(evaluator: Any, profile: str, root: Path, **overrides: Any) -> None:
    """Nothing ``evaluator`` measures with comes from a document SAEs train on: every question's document is
    held out, and every activation row it selects features and fits controls on (both folds') is a held-out (eval)
    row."""
    from hsae.activations import harvest
    from hsae.corpora import load_corpus, split_table
    from hsae.profiles import get_profile

    cfg = get_profile(profile, **overrides).harvest
    split = split_table(load_corpus(cfg.corpus), cfg.holdout_fraction, cfg.seed)
    heldout = set(split.loc[split["part"] == "heldout", "doc_id"])
    trained_on = {q["doc_id"] for q in evaluator.bank.text} - heldout
    assert not trained_on, f"questions from training documents: {sorted(trained_on)[:5]}"
    eval_x, _ = harvest(cfg, root=root, progress=None).arrays("eval")
    eval_rows = {np.asarray(row).tobytes() for row in eval_x[np.arange(len(eval_x))]}
    for name, x, labels in (("select", evaluator.select_x, evaluator.select_labels),
                            ("test", evaluator.test_x, evaluator.test_labels)):  # fold A's and fold B's
        rows = np.asarray(x[np.arange(len(labels))])
        outside = sum(row.tobytes() not in eval_rows for row in rows)
        assert len(rows) > 0 and outside == 0, f"{outside} of {len(rows)} {name} selection rows are not held out"


def small_space(name: str) -> str:
    """The path of one of the tests' small space files (tests/spaces/<name>.yaml): sweeps that test the machinery
    keep their trial counts whatever the shipped spaces of that name train."""
    return str(Path(__file__).parent / "spaces" / f"{name}.yaml")


def killed_after_rows(cmd: list[str], env: dict[str, str], rows: Path, pattern: str, at_least: int,
                      log_path: Path, cwd: Path) -> dict[str, Any]:
    """Start the sweep ``cmd`` in its own process group, SIGKILL the group (driver and Ray: an OOM killer or a lost
    node) once ``at_least`` trial rows match ``pattern`` under ``rows``, and return each row's ``finished_at`` by
    trial id: what a ``--resume`` must not redo."""
    import pandas as pd

    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 400
        while len(list(rows.glob(pattern))) < at_least:
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return {p.stem: pd.read_parquet(p)["finished_at"].iloc[0] for p in rows.glob(pattern)}
