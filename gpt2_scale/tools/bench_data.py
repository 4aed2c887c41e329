"""Data throughput: tokenization tokens/s per worker, and TokenLoader tokens/s against a raw memmap copy.

    python tools/bench_data.py                       # B=16, T=1024, the embedded corpus repeated 40 times

Both loaders read one epoch of the same train shards from fresh memory maps (best of 5, in turns).
The ceiling is the simplest possible loader (nanoGPT's): one contiguous memmap slice per batch,
cast to int64, x and y overlapping views of it. The loader passes when it is within 2x of that
ceiling and at least 50x faster than a 124M training step on one H100 consumes tokens (~500K/s).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gpt2_scale.data import TokenLoader, default_source, prepare_shards, read_manifest
from gpt2_scale.errors import quiet_when_the_reader_left
from gpt2_scale.tokenizer import get_tokenizer
from gpt2_scale.tools.args import positive

H100_124M_TOKENS_PER_S = 500_000


def tokenize_rate(out: Path, repeat: int, workers: int) -> float:
    """Tokens/s of prepare_shards over the embedded corpus repeated, shards written included."""
    docs = list(default_source()[1])
    source = ({"kind": "bench", "repeat": repeat}, itertools.chain.from_iterable(itertools.repeat(docs, repeat)))
    get_tokenizer()  # loaded before the clock, as forked workers inherit it: else 1 worker pays ~0.5 s that N do not
    t0 = time.perf_counter()
    m = prepare_shards(source, out, shard_tokens=1_000_000, workers=workers, progress=False)
    return (m["tokens"]["train"] + m["tokens"]["val"]) / (time.perf_counter() - t0)


def loader_rate(data_dir: Path, B: int, T: int) -> float:
    """One epoch of train batches through a fresh loader (fresh memory maps, like a new run)."""
    loader = TokenLoader(data_dir, "train", B, T, seed=0)
    t0 = time.perf_counter()
    for _ in range(loader.batches_per_epoch):
        loader.next_batch()
    return loader.batches_per_epoch * B * T / (time.perf_counter() - t0)


def raw_copy_rate(data_dir: Path, B: int, T: int) -> float:
    """The same tokens as contiguous B*T+1 slices, read in file order: nanoGPT's loader, the ceiling."""
    n, tokens = B * T + 1, 0
    t0 = time.perf_counter()
    for shard in read_manifest(data_dir)["shards"]["train"]:
        mm = np.memmap(data_dir / shard["file"], dtype=np.uint16, mode="r")
        for o in range(0, len(mm) - n + 1, B * T):
            buf = torch.from_numpy(mm[o : o + n].astype(np.int64))
            _x, _y = buf[:-1].view(B, T), buf[1:].view(B, T)  # what the loader hands out
            tokens += B * T
    if not tokens:
        raise ValueError(f"no train shard holds B*T+1 = {n} tokens; raise --repeat")
    return tokens / (time.perf_counter() - t0)


def best_interleaved(fs: list, *args, repeats: int = 5) -> list[float]:
    """Best of `repeats` for each function, run in turns so a busy machine slows them alike."""
    rates = [[f(*args) for f in fs] for _ in range(repeats)]
    return [max(r) for r in zip(*rates)]


@quiet_when_the_reader_left
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=positive, default=16)
    parser.add_argument("--seq-len", type=positive, default=1024)
    parser.add_argument("--repeat", type=positive, default=40, help="copies of the embedded corpus (~139K tokens each)")
    parser.add_argument("--workers", type=positive, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    B, T = args.batch_size, args.seq_len

    with tempfile.TemporaryDirectory() as tmp:
        try:
            one = tokenize_rate(Path(tmp) / "w1", args.repeat, workers=1)
            many = tokenize_rate(Path(tmp) / "wn", args.repeat, workers=args.workers)
            loader, ceiling = best_interleaved([loader_rate, raw_copy_rate], Path(tmp) / "wn", B, T)
        except (ValueError, OSError) as e:  # a batch larger than the data: the loader's advice, in this tool's flags
            print(f"error: {e} (here: a larger --repeat, or a smaller --batch-size or --seq-len)", file=sys.stderr)
            return 2
    need = 50 * H100_124M_TOKENS_PER_S
    print(f"tokenize, 1 worker:          {one / 1e6:8.2f} M tokens/s")
    per_worker = many / args.workers / 1e6
    print(f"tokenize, {args.workers} workers:         {many / 1e6:8.2f} M tokens/s ({per_worker:.2f} per worker)")
    print(f"TokenLoader B={B} T={T}:    {loader / 1e6:8.1f} M tokens/s")
    print(f"raw memmap copy (ceiling):   {ceiling / 1e6:8.1f} M tokens/s")
    print(f"loader / ceiling: {loader / ceiling:.2f} (target >= 0.5: {'ok' if loader >= ceiling / 2 else 'MISSED'})")
    print(f"loader / 124M-on-H100 need: {loader / H100_124M_TOKENS_PER_S:.0f}x (target >= 50x: "
          f"{'ok' if loader >= need else 'MISSED'})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
