"""Predicted per-GPU peak memory of a training run: model states (ZeRO accounting), activations, the loss, copies of
the weights and DeepSpeed's buckets, at the moment of the step that holds the most.

    python tools/estimate_memory.py --model gpt2-xl --engine zero3 --world 8 --micro-batch 16 --seq-len 1024 \
        [--activation-checkpointing] [--offload] [--dtype fp32] [--loss-chunk 4096] [--accumulation 4] [--ds-config F]
        [--compile]
    python tools/estimate_memory.py --model gpt2-xl --engine fsdp --activation-checkpointing --fit 79.6
        # the largest power-of-two micro-batch predicted to fit a GPU of 79.6 GiB (nvidia-smi's memory.total / 1024)

The formulas and their constants are in gpt2_scale/memory.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gpt2_scale import memory
from gpt2_scale.config import ENGINES, Config, EngineSection
from gpt2_scale.errors import quiet_when_the_reader_left
from gpt2_scale.tools.args import gib, non_negative, positive
from gpt2_scale.zoo import ModelConfig


@quiet_when_the_reader_left
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2-124m", help="a zoo name (gpt2-124m ... gpt2-xl, gpt3-*)")
    parser.add_argument("--engine", default="ddp", choices=ENGINES)
    parser.add_argument("--world", type=positive, default=1, help="data-parallel ranks (GPUs)")
    parser.add_argument("--micro-batch", type=positive, help="sequences per GPU per micro-step (default 16)")
    parser.add_argument("--seq-len", type=positive, default=1024)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--offload", action="store_true", help="optimizer state on the host (fsdp: all model states)")
    parser.add_argument("--no-pad-vocab", action="store_true", help="50257 rows instead of 50304")
    parser.add_argument("--loss-chunk", type=non_negative, default=0,
                        help="tokens per chunk of the fused lm_head + cross-entropy (engine.loss_chunk); 0 = full logits")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile on, as the trainer does on CUDA (ZeRO-3: the loss only): the loss fused")
    parser.add_argument("--accumulation", type=positive, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--ds-config", type=Path, help="the DeepSpeed JSON of a zero engine (default: the shipped one)")
    parser.add_argument("--fit", type=gib, metavar="GIB",
                        help="in place of --micro-batch: the largest power of two predicted to fit a GPU of GIB GiB")
    parser.add_argument("--reserve", type=gib, metavar="GIB",
                        help="with --fit: GiB the estimate leaves out (CUDA context, DDP's buckets, fragmentation); default 2")
    args = parser.parse_args(argv)
    if args.fit is not None and args.micro_batch is not None:
        parser.error("give --micro-batch or --fit, not both")
    if args.reserve is not None and args.fit is None:
        parser.error("--reserve goes with --fit (it is what --fit leaves out of the GPU's memory)")
    if args.fit is not None and args.reserve is not None and args.reserve >= args.fit:
        parser.error(f"--reserve ({args.reserve / 2**30:g} GiB) leaves nothing of --fit ({args.fit / 2**30:g} GiB); reserve less than the GPU has")
    if args.ds_config is not None and not args.engine.startswith("zero"):
        parser.error(f"--ds-config goes with a zero engine; --engine {args.engine} reads no DeepSpeed JSON")
    args.reserve = memory.RESERVE if args.reserve is None else args.reserve
    try:
        model = ModelConfig.from_name(args.model, pad_vocab=not args.no_pad_vocab)
        if problem := model.context_problem(args.seq_len, "--seq-len"):
            raise ValueError(problem)
        options = dict(bf16=args.dtype == "bf16", checkpointing=args.activation_checkpointing, offload=args.offload,
                       loss_chunk=args.loss_chunk, accumulation=args.accumulation, ds_config=_ds_config(args),
                       compiled=args.compile)
        micro_batch = args.micro_batch or 16
        if args.fit is not None:
            micro_batch = _fit(model, args, options)
            if not micro_batch:
                return 1
        print(memory.explain(model, args.engine, args.world, micro_batch, args.seq_len, **options))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _fit(model: ModelConfig, args: argparse.Namespace, options: dict) -> int:
    """Print the --fit line (parsed by tools/gpu_session.sh) and return its micro-batch, 0 if none fits."""
    def peak(b: int) -> int:
        return memory.estimate(model, args.engine, args.world, b, args.seq_len, **options).total

    budget = args.fit - args.reserve
    fits = memory.largest_micro_batch(peak, budget)
    room = f"{args.fit / memory.GiB:.1f} GiB less {args.reserve / memory.GiB:.1f} GiB reserved"
    if not fits:
        print(f"error: no micro-batch fits: even 1 needs {peak(1) / memory.GiB:.2f} GiB of {room}; try --activation-checkpointing, "
              "--loss-chunk 4096, --offload, or a larger --world with a sharding engine", file=sys.stderr)
        return 0
    print(f"micro-batch {fits}: the largest power of two predicted to fit {room} "
          f"({peak(fits) / memory.GiB:.2f} GiB; {2 * fits} would need {peak(2 * fits) / memory.GiB:.2f} GiB)")
    return fits


def _ds_config(args: argparse.Namespace) -> dict | None:
    """The DeepSpeed JSON the run would use: --ds-config, or the shipped one for the engine and offload."""
    if not args.engine.startswith("zero"):
        return None
    from gpt2_scale.engines.deepspeed import default_ds_config_path, read_ds_config, resolve_overlap_comm  # DeepSpeed: only to train

    path = args.ds_config or default_ds_config_path(Config(engine=EngineSection(name=args.engine, offload=args.offload)))
    return resolve_overlap_comm(read_ds_config(path, "--ds-config"), args.world)


if __name__ == "__main__":
    sys.exit(main())
