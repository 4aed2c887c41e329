"""Time optimizer steps of a model under one or more engines and print one Markdown table row per engine.

    python tools/bench.py --model gpt2-tiny --engines ddp,fsdp,zero1,zero2,zero3 --world 2 \
        --micro-batch 4 --seq-len 128                                   # CPU: spawns 2 gloo ranks per engine
    torchrun --nproc_per_node 8 tools/bench.py --model gpt2-124m --engines ddp,fsdp --micro-batch 64 \
        --seq-len 1024 --accum 1 --compare-seed                         # GPUs: ours and the seed loop side by side

Columns: ms/step (slowest rank), tokens/s per rank and total, MFU against --peak-tflops or the detected
GPU's datasheet peak and against a bf16 8192³ matmul timed in the same run (CUDA), peak memory (CUDA max
allocated / reserved, CPU process peak RSS), and the model-state bytes rank 0 holds.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpt2_scale import bench  # noqa: E402
from gpt2_scale.config import ENGINES, ConfigError  # noqa: E402


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[bench.BenchSpec]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2-124m")
    p.add_argument("--engines", default="ddp", help=f"comma-separated: {','.join(ENGINES)}")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--accum", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="auto: on CUDA only")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--offload", action="store_true")
    p.add_argument("--loss-chunk", type=int, default=0,
                   help="tokens per chunk of the fused lm_head + cross-entropy (engine.loss_chunk); 0 = full logits")
    p.add_argument("--data", help="a token shard directory; default random tokens")
    p.add_argument("--world", type=int, default=1, help="spawn this many CPU ranks (without torchrun)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--peak-tflops", type=float, help="per-device peak for MFU; default: the detected GPU's datasheet")
    p.add_argument("--compare-seed", action="store_true", help="also time the seed walk-through's loop")
    args = p.parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in engines if e not in ENGINES]
    if bad or not engines:
        raise ConfigError(f"--engines: unknown {', '.join(bad) or '(none given)'}; valid: {', '.join(ENGINES)}")
    for name in ("micro_batch", "seq_len", "accum", "steps", "world"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        raise ConfigError("--warmup must be >= 0")
    if args.world > 1 and "WORLD_SIZE" in os.environ:
        raise ConfigError("--world spawns its own ranks; under torchrun leave it out")
    if args.world > 1 and args.device == "cuda":
        raise ConfigError("--world spawns CPU ranks; for GPUs launch with torchrun --nproc_per_node N")
    if args.data and not os.path.isdir(args.data):
        raise ConfigError(f"--data {args.data}: not a directory (make one with tools/prepare_data.py)")
    compile_ = {"auto": None, "on": True, "off": False}[args.compile]
    base = bench.BenchSpec(args.model, engines[0], args.micro_batch, args.seq_len, args.accum, args.dtype, compile_,
                           args.activation_checkpointing, args.offload, args.warmup, args.steps, args.data, args.loss_chunk)
    specs = [bench.with_engine(base, e) for e in engines] + ([bench.with_engine(base, bench.SEED)] if args.compare_seed else [])
    for spec in specs:
        spec.config(args.world)  # validates model name, sizes
    return args, specs


def main(argv: list[str] | None = None) -> int:
    try:
        args, specs = parse(argv)
    except ValueError as e:  # ConfigError, unknown model
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.world > 1:
        results = bench.spawn_cpu(specs, args.world, args.peak_tflops)
    else:
        results = bench.run_all(specs, args.device, args.peak_tflops)
    if int(os.environ.get("RANK", "0")) == 0:
        print(bench.table(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
