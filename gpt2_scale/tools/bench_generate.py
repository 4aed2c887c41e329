"""Micro-benchmark: generation speed with and without the KV cache.

    python tools/bench_generate.py --model gpt2-124m --device cpu --prompt-len 16 --repeats 3

Greedy decoding of --new-tokens tokens after a random prompt, from a randomly initialised model;
the median of --repeats timed runs per mode (after one short warm-up), and the speed-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from gpt2_scale.device import resolve_device
from gpt2_scale.errors import quiet_when_the_reader_left
from gpt2_scale.generate import generate
from gpt2_scale.memory import is_out_of_memory
from gpt2_scale.model import GPT
from gpt2_scale.tools.args import positive, random_seed
from gpt2_scale.zoo import ModelConfig


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_generate(model, idx, new_tokens, use_cache, repeats, device) -> tuple[float, torch.Tensor]:
    generate(model, idx, min(new_tokens, 8), temperature=0, use_cache=use_cache)  # warm-up
    times, out = [], None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = generate(model, idx, new_tokens, temperature=0, use_cache=use_cache)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


@quiet_when_the_reader_left
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2-124m", help="zoo name (random init)")
    p.add_argument("--device", default="cpu", help="auto | cpu | cuda | mps")
    p.add_argument("--prompt-len", type=positive, default=16)
    p.add_argument("--new-tokens", type=positive, default=200)
    p.add_argument("--batch-size", type=positive, default=1)
    p.add_argument("--repeats", type=positive, default=3, help="timed runs per mode; the median is reported")
    p.add_argument("--seed", type=random_seed, default=0)
    args = p.parse_args(argv)
    try:
        device = resolve_device(args.device)
        config = ModelConfig.from_name(args.model)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    torch.manual_seed(args.seed)
    model = GPT(config).to(device).eval()
    results = {}
    try:
        idx = torch.randint(0, config.vocab_size, (args.batch_size, args.prompt_len), device=device)
        for label, use_cache in (("no cache", False), ("kv cache", True)):
            results[label] = time_generate(model, idx, args.new_tokens, use_cache, args.repeats, device)
    except RuntimeError as e:
        if not is_out_of_memory(e):
            raise
        print(f"error: out of memory on {device} generating a batch of {args.batch_size} x {args.prompt_len + args.new_tokens} "
              "tokens; lower --batch-size or --new-tokens", file=sys.stderr)
        return 1

    total = args.prompt_len + args.new_tokens
    print(
        f"model {config.name} ({model.num_params() / 1e6:.1f}M params), device {device}, "
        f"threads {torch.get_num_threads()}, batch {args.batch_size}, prompt {args.prompt_len}, "
        f"new tokens {args.new_tokens}, median of {args.repeats}"
    )
    if total > config.block_size:
        print(f"note: {total} tokens exceed the context of {config.block_size}; past it both modes recompute")
    print(f"{'mode':<10} {'seconds':>9} {'tokens/s':>10}")
    for label, (seconds, _) in results.items():
        print(f"{label:<10} {seconds:>9.3f} {args.batch_size * args.new_tokens / seconds:>10.1f}")
    speedup = results["no cache"][0] / results["kv cache"][0]
    same = torch.equal(results["no cache"][1], results["kv cache"][1])
    print(f"speed-up {speedup:.2f}x; greedy outputs identical: {'yes' if same else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
