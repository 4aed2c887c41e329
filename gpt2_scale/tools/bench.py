"""Time optimizer steps of a model under one or more engines and print one Markdown table row per engine.

    python tools/bench.py --model gpt2-tiny --engines ddp,fsdp,zero1,zero2,zero3 --world 2 \
        --micro-batch 4 --seq-len 128                                   # CPU: spawns 2 gloo ranks per engine
    torchrun --nproc_per_node 8 tools/bench.py --model gpt2-124m --engines ddp,fsdp --micro-batch 64 \
        --seq-len 1024 --accum 1 --compare-walkthrough                  # GPUs: ours and the walk-through's loop side by side
    python tools/bench.py --model gpt2-124m --engines ddp --micro-batch 16 --set engine.dtype=bf16 \
        --vary engine.compile_scope=block,model --vary train.micro_batch=32,64 --json bench.json   # one lever per row

Rows: per engine, its base row, then one row per --vary value with only that key changed (not every
combination); --set KEY=VALUE (any config key, see gpt2_scale/config.py) applies to every row. A row whose
configuration fails (out of memory, a compile error, a refused combination) is reported as failed and the
sweep goes on; bad input (an unknown key, a value of the wrong type) exits 2 before anything runs.

Columns: ms/step (slowest rank), tokens/s per rank and total, MFU against --peak-tflops or the detected
GPU's datasheet peak and against a bf16 8192³ matmul timed in the same run (CUDA), peak memory (CUDA max
allocated / reserved, CPU process peak RSS) next to tools/estimate_memory.py's estimate, and the model-state
bytes rank 0 holds. --profile DIR adds, per row, where the step's time goes (gpt2_scale/bench/profile.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from gpt2_scale import bench
from gpt2_scale.bench.profile import file_name
from gpt2_scale.config import ENGINES, Config, ConfigError
from gpt2_scale.device import resolve_device
from gpt2_scale.errors import quiet_when_the_reader_left
from gpt2_scale.fileio import write_atomic
from gpt2_scale.tools.args import check_replaceable, engine_list, non_negative, positive, positive_float, starts_with


def assignment(text: str, flag: str) -> tuple[str, list[str]]:
    """``KEY=VALUE`` (--set) or ``KEY=V1,V2,...`` (--vary), each value checked against the key's config field."""
    key, eq, values = text.partition("=")
    key, values = key.strip(), [v.strip() for v in (values.split(",") if flag == "--vary" else [values]) if v.strip()]
    if not eq or "." not in key or not values:
        example = "engine.compile_mode=reduce-overhead" + (",max-autotune" if flag == "--vary" else "")
        raise ConfigError(f"{flag} {text!r}: expected SECTION.KEY={'V1,V2,...' if flag == '--vary' else 'VALUE'}, e.g. {flag} {example}")
    for value in values:
        try:
            bench.override(Config(), key, value)
        except ConfigError as e:
            raise ConfigError(f"{flag} {text}: {e}") from None
    return key, values


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[bench.BenchSpec]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2-124m")
    p.add_argument("--engines", type=engine_list, default="ddp", help=f"comma-separated: {','.join(ENGINES)}")
    p.add_argument("--micro-batch", type=positive, default=16)
    p.add_argument("--seq-len", type=positive, default=1024)
    p.add_argument("--accum", type=positive, default=1, help="micro-steps per optimizer step")
    p.add_argument("--warmup", type=non_negative, default=3)
    p.add_argument("--steps", type=positive, default=10)
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="auto: on CUDA only")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--offload", action="store_true")
    p.add_argument("--loss-chunk", type=non_negative, help="tokens per chunk of the fused lm_head + cross-entropy (engine.loss_chunk)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every row, e.g. engine.compile_scope=model (repeatable)")
    p.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="one more row per value, changing only KEY from the base row (repeatable; one lever at a time)")
    p.add_argument("--json", metavar="PATH", help="also write every row, the device, versions and date as JSON, rewritten as "
                   "each row finishes (\"complete\" says whether every row planned is in)")
    p.add_argument("--data", help="a token shard directory; default random tokens")
    p.add_argument("--profile", metavar="DIR", help="after each row's timed steps, profile 3 more into DIR: where the "
                   "time goes by kind (matmul, attention, communication ...), the top kernels, and a trace")
    p.add_argument("--world", type=positive, default=1, help="spawn this many CPU ranks (without torchrun)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--peak-tflops", type=positive_float, help="per-device peak for MFU; default: the detected GPU's datasheet")
    p.add_argument("--compare-walkthrough", "--compare-seed", action="store_true", dest="compare_walkthrough",
                   help="also time the walk-through's own loop (build-nanogpt), for ours/walk-through ratios")
    args = p.parse_args(argv)
    engines = args.engines
    if args.world > 1 and "WORLD_SIZE" in os.environ:
        raise ConfigError("--world spawns its own ranks; under torchrun leave it out")
    if args.world > 1 and args.device == "cuda":
        raise ConfigError("--world spawns CPU ranks; for GPUs launch with torchrun --nproc_per_node N")
    for flag, value in (("--json", args.json), ("--profile", args.profile), ("--data", args.data)):
        if value == "":
            raise ConfigError(f"{flag} is empty (an unset shell variable?); name a path, or leave {flag} out")
    if args.data:
        from gpt2_scale.data.loader import read_manifest

        read_manifest(args.data)  # a DataError naming what is missing, before any row runs
    if args.json and (os.path.isdir(args.json) or not os.path.isdir(os.path.dirname(os.path.abspath(args.json)))):
        raise ConfigError(f"--json {args.json}: not a file in an existing directory; name one, the rows are written there as they finish")
    if args.json:
        check_replaceable(args.json, is_bench_json, "an earlier bench's --json", "--json")
    if args.profile and os.path.exists(args.profile) and not os.path.isdir(args.profile):
        raise ConfigError(f"--profile {args.profile} is a file; name a directory for the profiles")
    if args.profile:
        try:  # now, not after the first row's timed steps
            os.makedirs(args.profile, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--profile {args.profile}: {e.strerror}; name a directory for the profiles") from None
    resolve_device(args.device, "train")  # a device that is not here: its ValueError is the tool's one error line
    # The convenience flags are config overrides like --set ones (which come after them, so win).
    overrides = [("model.name", args.model), ("train.micro_batch", str(args.micro_batch)), ("train.seq_len", str(args.seq_len))]
    flags = {"engine.dtype": (args.dtype, "auto"), "engine.compile": ({"on": "true", "off": "false"}.get(args.compile), None),
             "engine.activation_checkpointing": ("true" if args.activation_checkpointing else None, None),
             "engine.offload": ("true" if args.offload else None, None),
             "engine.loss_chunk": (None if args.loss_chunk is None else str(args.loss_chunk), None)}
    overrides += [(key, value) for key, (value, unset) in flags.items() if value != unset]
    overrides += [(key, values[0]) for key, values in (assignment(text, "--set") for text in args.set)]
    vary = [assignment(text, "--vary") for text in args.vary]
    base = bench.BenchSpec(engines[0], tuple(overrides), accum=args.accum, warmup=args.warmup, steps=args.steps, data=args.data,
                           profile=args.profile)
    specs = bench.sweep(base, engines, vary, args.compare_walkthrough)
    names = [spec.name for spec in specs]
    if twice := sorted({name for name in names if names.count(name) > 1}):  # the same row again: its profile overwritten
        raise ConfigError(f"the rows {', '.join(twice)} would run twice; give each engine and --vary value once")
    for name in names if args.profile else ():
        stem = Path(args.profile) / file_name(name)
        check_replaceable(f"{stem}.txt", starts_with(b"profile of row "), "an earlier row's profile", "--profile")
        check_replaceable(f"{stem}.trace.json.gz", starts_with(b"\x1f\x8b"), "an earlier row's trace (gzip)", "--profile")
    world = args.world if args.world > 1 else int(os.environ.get("WORLD_SIZE", "1"))
    for spec in specs:  # every row's config is valid (names, types, sizes, enough --data for its batch) before anything runs
        try:
            cfg = spec.config(world)
            if args.data:
                from gpt2_scale.data import TokenLoader

                TokenLoader(args.data, "train", cfg.train.micro_batch, cfg.train.seq_len, world_size=world)
        except ValueError as e:
            raise ConfigError(f"row {spec.name!r}: {e}") from None
    return args, specs


def is_bench_json(path: Path) -> bool:
    """Whether ``path`` is a file --json wrote (report.to_json): it may be rewritten."""
    try:
        written = json.loads(path.read_bytes())
    except ValueError:
        return False
    return isinstance(written, dict) and isinstance(written.get("rows"), list) and "rows_planned" in written


@quiet_when_the_reader_left
def main(argv: list[str] | None = None) -> int:
    try:
        args, specs = parse(argv)
    except ValueError as e:  # ConfigError, unknown model
        print(f"error: {e}", file=sys.stderr)
        return 2
    command = sys.argv[:1] + (sys.argv[1:] if argv is None else argv)
    done: list[bench.BenchResult] = []

    def on_result(result: bench.BenchResult) -> None:  # rank 0, after each row: progress, and the JSON kept current
        done.append(result)
        outcome = f"failed: {result.error}" if result.error else f"{result.ms_per_step:,.1f} ms/step"
        print(f"bench: row {len(done)}/{len(specs)} {result.spec.name}: {outcome}", file=sys.stderr, flush=True)
        if args.json:
            write_atomic(args.json, json.dumps(bench.to_json(done, command, planned=len(specs)), indent=2) + "\n")

    if args.world > 1:
        results = bench.spawn_cpu(specs, args.world, args.peak_tflops, on_result)
    else:
        results = bench.run_all(specs, args.device, args.peak_tflops, on_result)
    if int(os.environ.get("RANK", "0")) == 0:
        print(bench.table(results), flush=True)
    return 1 if all(r.error for r in results) else 0  # nothing measured: a script must not read the table as results


if __name__ == "__main__":
    sys.exit(main())
