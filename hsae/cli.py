"""`hsae-train`: train one SAE and save it (hsae format + SAELens export + metrics.json).

Data: ``embedded`` (Gemma-3-270M layer-13 activations on Wikipedia summaries, harvested once and
cached), ``tiny`` (a random tiny Gemma-2 on a toy corpus) or ``synthetic`` (a known sparse
dictionary); ``--model`` reads any causal LM instead (hub id or local folder), on ``--corpus``.
Every value is validated before any compute starts; bad input exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from hsae.activations import HarvestConfig, harvest
from hsae.atomic import atomic_write_text
from hsae.config import SAEConfig, TrainConfig
from hsae.corpora import CORPORA, CorpusSpec
from hsae.export import export_saelens, save_sae
from hsae.models import ModelSpec, describe_model
from hsae.synthetic import sparse_dictionary_data
from hsae.train import ArrayBatches, Batch, DegenerateRunError, Progress, Trainer, TrainResult, to_batch
from hsae.variants import VARIANTS


def parse_params(items: list[str]) -> dict:
    """``key=value`` pairs; values parsed as JSON where possible (numbers, lists), else strings."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--param expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hsae-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="relu", help=f"one of {sorted(VARIANTS)}")
    p.add_argument("--data", default="embedded", choices=["embedded", "tiny", "synthetic"])
    p.add_argument("--model", default=None, help="any causal LM: a hub id or a local directory (default: --data's)")
    p.add_argument("--corpus", default=None, choices=list(CORPORA),
                   help="text to harvest (default: embedded for --data embedded, else toy)")
    p.add_argument("--forget-corpus", default=None, help="corpus wmdp: the bio forget corpus (hub id or local copy)")
    p.add_argument("--retain-corpus", default=None, help="corpus wmdp: WikiText (hub id or local copy)")
    p.add_argument("--layer", type=int, default=None, help="residual layer to read (default: the model's)")
    p.add_argument("--n-ctxs", type=int, default=256, help="contexts of 128 tokens to harvest for training")
    p.add_argument("--d-sae", type=int, default=None, help="dictionary size (default 8 x d_in)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="variant parameter, e.g. --param alpha=0.2 (repeatable)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default="runs/latest", help="output directory")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="auto", help="where the SAE trains: auto (a GPU if there is one), cpu, cuda[:N]")
    return p


def corpus_spec(args: argparse.Namespace) -> CorpusSpec:
    name = args.corpus or ("embedded" if args.data == "embedded" and not args.model else "toy")
    sources = {k: v for k, v in (("forget", args.forget_corpus), ("retain", args.retain_corpus)) if v}
    return CorpusSpec(name, **sources)


# The synthetic data's width: a property of that generated data set, not of any model.
SYNTHETIC_D_IN = 64


def plan(args: argparse.Namespace) -> tuple[HarvestConfig | None, SAEConfig, TrainConfig, Path]:
    """Every value validated (the model's width read from the model) before any compute."""
    harvest_cfg, d_in = None, SYNTHETIC_D_IN
    if args.data != "synthetic" or args.model:
        corpus = corpus_spec(args)
        harvest_cfg = HarvestConfig(model=ModelSpec(args.model or args.data, layer=args.layer), corpus=corpus,
                                    n_ctxs=args.n_ctxs, n_eval_ctxs=32, seed=args.seed)
        d_in = describe_model(harvest_cfg.model).d_model
    sae_cfg = SAEConfig(args.variant, d_in, args.d_sae or 4 * d_in, parse_params(args.param))
    train_cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                            checkpoint_every=max(args.steps // 4, 1), device=args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return harvest_cfg, sae_cfg, train_cfg, out


def load_data(harvest_cfg: HarvestConfig | None, train_cfg: TrainConfig) -> tuple[Any, Any, Batch]:
    """Training rows, their labels, and a held-out evaluation batch."""
    if harvest_cfg is None:
        data = sparse_dictionary_data(train_cfg.batch_size * 16 + 4096, d=SYNTHETIC_D_IN,
                                      n_atoms=4 * SYNTHETIC_D_IN, seed=train_cfg.seed)
        return data.x[:-4096], data.labels[:-4096], to_batch(data.x[-4096:], data.labels[-4096:])
    acts = harvest(harvest_cfg)
    train_x, train_y = acts.arrays("train")
    return train_x, train_y, to_batch(*acts.arrays("eval"))


def train_with_progress(sae_cfg: SAEConfig, train_cfg: TrainConfig, out: Path, data: tuple[Any, Any, Batch]
                        ) -> TrainResult:
    """Train (resuming from out/checkpoints if a previous run left some) with a progress bar."""
    train_x, train_y, eval_batch = data
    bar = tqdm(total=train_cfg.steps, desc=f"train {sae_cfg.variant}", unit="step")

    def on_progress(progress: Progress) -> None:
        bar.n = progress.step
        bar.set_postfix(loss=f"{progress.record['loss']:.4f}", l0=f"{progress.record['l0']:.1f}")
        bar.refresh()

    trainer = Trainer(sae_cfg, train_cfg, on_progress=on_progress, checkpoint_dir=out / "checkpoints")
    try:
        return trainer.fit(ArrayBatches(train_x, train_y, train_cfg.batch_size, train_cfg.seed), eval_batch)
    finally:
        bar.close()


def save_outputs(result: TrainResult, out: Path, harvest_cfg: HarvestConfig | None) -> dict[str, Any]:
    """hsae format, SAELens export and metrics.json; returns the summary written."""
    save_sae(result.sae, out / "sae", scale=result.scale)
    model_name = f"synthetic-d{SYNTHETIC_D_IN}" if harvest_cfg is None else harvest_cfg.model.source
    layer = 0 if harvest_cfg is None else harvest_cfg.model.layer
    export_saelens(result.sae, out / "saelens", scale=result.scale, model_name=model_name, hook_layer=layer)
    summary = {"variant": result.sae.cfg.variant, "steps": result.steps, "tokens": result.tokens,
               "wall_s": result.wall_s, "tokens_per_s": result.tokens_per_s,
               "device": str(next(result.sae.parameters()).device), **result.metrics}
    atomic_write_text(out / "metrics.json", json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        harvest_cfg, sae_cfg, train_cfg, out = plan(args)
    except (ValueError, OSError) as exc:
        print(f"hsae-train: error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    try:
        result = train_with_progress(sae_cfg, train_cfg, out, load_data(harvest_cfg, train_cfg))
    except DegenerateRunError as exc:
        print(f"hsae-train: degenerate run, no scores written: {exc}", file=sys.stderr)
        return 1
    summary = save_outputs(result, out, harvest_cfg)
    for key in ("steps", "explained_variance", "l0", "dead_fraction", "inter_group_correlation", "tokens_per_s"):
        print(f"{key:>24s}: {summary[key]:.4g}")
    print(f"saved to {out}/ (sae/, saelens/, metrics.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
