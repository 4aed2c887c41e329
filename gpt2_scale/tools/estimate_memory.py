"""Predicted per-GPU memory of a training run: model states (ZeRO accounting) + activations + logits.

    python tools/estimate_memory.py --model gpt2-xl --engine zero3 --world 8 --micro-batch 16 --seq-len 1024 \
        [--activation-checkpointing] [--offload] [--dtype fp32] [--loss-chunk 4096]

The formulas and their constants are in gpt2_scale/memory.py.
"""

from __future__ import annotations

import argparse
import sys

from gpt2_scale import memory
from gpt2_scale.config import ENGINES
from gpt2_scale.tools.args import non_negative, positive
from gpt2_scale.zoo import ModelConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2-124m", help="a zoo name (gpt2-124m ... gpt2-xl, gpt3-*)")
    parser.add_argument("--engine", default="ddp", choices=ENGINES)
    parser.add_argument("--world", type=positive, default=1, help="data-parallel ranks (GPUs)")
    parser.add_argument("--micro-batch", type=positive, default=16)
    parser.add_argument("--seq-len", type=positive, default=1024)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--offload", action="store_true", help="optimizer state on the host (fsdp: all model states)")
    parser.add_argument("--no-pad-vocab", action="store_true", help="50257 rows instead of 50304")
    parser.add_argument("--loss-chunk", type=non_negative, default=0,
                        help="tokens per chunk of the fused lm_head + cross-entropy (engine.loss_chunk); 0 = full logits")
    args = parser.parse_args(argv)
    try:
        model = ModelConfig.from_name(args.model, pad_vocab=not args.no_pad_vocab)
        if args.seq_len > model.block_size:
            raise ValueError(f"--seq-len {args.seq_len} exceeds {model.name}'s context length {model.block_size}")
        print(memory.explain(model, args.engine, args.world, args.micro_batch, args.seq_len, bf16=args.dtype == "bf16",
                             checkpointing=args.activation_checkpointing, offload=args.offload, loss_chunk=args.loss_chunk))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
