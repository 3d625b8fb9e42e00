"""The activation stream on the embedded model: K trials on one streamed budget, at once and with a late joiner.

    python bench/stream.py [--k 4] [--blocks 4] [--cache DIR] [--skip-cache]

Runs the real driver (``tune/ablate.py``, K relu trials of different seeds, no evaluation) three times:

1. ``--activations stream``, all K at once: prints the LM tokens the server computed for training divided
   by the tokens one trial trains on (one LM pass for the whole sweep is 1.0; the goal is <= 1.1), the
   server's peak memory next to the window's share of it, and the trials' training speed;
2. ``--activations stream`` with K - 1 slots: the K-th trial starts when another has finished, at the
   stream's batch 0 like the others (``stream_join = "first"``), so the window recomputes its blocks: the
   ratio says what a late joiner costs;
3. ``--activations cache`` with the same steps: the trials' training speed from the disk cache (skipped
   with ``--skip-cache``).

The budget is ``--blocks`` stream blocks (256 contexts x 127 rows, cut into 1,024-row batches) per trial.
A warm ``--cache`` (the main job's) skips the held-out harvest and the model conversion.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

from hsae.profiles import PROFILES

ROOT = Path(__file__).resolve().parent.parent


def sweep(out: Path, k: int, tokens: int, activations: str, slots: int) -> tuple[pd.DataFrame, str]:
    out.parent.mkdir(parents=True, exist_ok=True)
    space = out.parent / "relu.yaml"
    space.write_text("description: relu seeds for the stream bench\ntrials:\n  - variant: relu\n")
    cmd = [sys.executable, str(ROOT / "tune" / "ablate.py"), "--space", str(space), "--seeds", str(k),
           "--tokens", str(tokens), "--activations", activations, "--max-concurrent", str(slots), "--no-eval",
           "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return pd.read_parquet(out / "trials.parquet"), done.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=4, help="concurrent trials")
    p.add_argument("--blocks", type=int, default=4, help="stream blocks per trial")
    p.add_argument("--cache", default=None, help="HSAE_CACHE to use (a warm one skips the conversion)")
    p.add_argument("--skip-cache", action="store_true", help="skip the cache-mode run (the speed comparison)")
    args = p.parse_args()
    if args.k < 2:
        sys.exit(f"--k must be >= 2 (a late joiner needs another trial before it), got {args.k}")
    if args.cache:
        os.environ["HSAE_CACHE"] = args.cache
    profile = PROFILES["embedded"]
    per_block = profile.stream.block_contexts * (profile.harvest.ctx_len - 1) // profile.train.batch_size
    steps = args.blocks * per_block
    tokens = steps * profile.train.batch_size
    with tempfile.TemporaryDirectory(prefix="hsae-bench-stream-") as tmp:
        streamed, printed = sweep(Path(tmp) / "stream" / "out", args.k, tokens, "stream", slots=args.k)
        late, late_printed = sweep(Path(tmp) / "late" / "out", args.k, tokens, "stream", slots=args.k - 1)
        cached = None if args.skip_cache else sweep(Path(tmp) / "cache" / "out", args.k, tokens, "cache", args.k)[0]
    line = stream_line(printed)
    peak_mb = float(re.search(r"server peak memory (\d+) MB", line).group(1))
    d_in = int(streamed["cfg_d_in"].iloc[0])  # the served model's width
    window_rows = profile.stream.window_blocks * profile.stream.block_contexts * (profile.harvest.ctx_len - 1)
    window_mb = window_rows * d_in * 4 / 2**20
    print(f"{args.k} relu trials x {steps} steps x {profile.train.batch_size} = {tokens:,} tokens each")
    print(f"all at once ({args.k} slots): {line}")
    print(f"server peak memory: {peak_mb:.0f} MB, of which the window ({profile.stream.window_blocks} blocks) "
          f"holds at most {window_mb:.0f} MB; the rest is the model and the held-out rows")
    if cached is not None:
        speed_stream, speed_cache = streamed["tokens_per_s"].mean(), cached["tokens_per_s"].mean()
        print(f"trial training speed: {speed_stream:,.0f} tokens/s streamed vs {speed_cache:,.0f} from the cache "
              f"(ratio {speed_stream / speed_cache:.2f}; the LM shares the same cores while it streams)")
    print(f"with a late joiner ({args.k - 1} slots): {stream_line(late_printed)}")
    for name, rows in (("all at once", streamed), ("late joiner", late)):
        starts = sorted(int(v) for v in rows["stream_start_batch"])
        print(f"{name}: stream_join {sorted(set(rows['stream_join']))}, start batches {starts}")
    print(f"lm_tokens_ratio: {streamed['stream_lm_tokens'].max() / tokens:.3f} (all at once), "
          f"{late['stream_lm_tokens'].max() / tokens:.3f} (with a late joiner)")


def stream_line(printed: str) -> str:
    """The driver's stream summary line (tune.ablate.format_stream)."""
    return next(x for x in printed.splitlines() if x.startswith("[hsae] stream:"))


if __name__ == "__main__":
    main()
