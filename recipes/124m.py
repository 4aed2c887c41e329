"""GPT-2 124M on FineWeb-Edu 10B, the seed walk-through's run, under DeepSpeed ZeRO-1 (`--engine zero2|zero3|ddp|fsdp` to switch).

    deepspeed recipes/124m.py            # all local GPUs
    python recipes/124m.py               # one process

Max LR 6e-4, warmup 715 steps, 19,073 steps of 2^19 tokens (one epoch of sample-10BT), B=64 x T=1024
per GPU (fits 80 GB; use --micro-batch 32 or 16 on 40 GB cards: accumulation grows to keep 2^19).
Needs the shards: python tools/prepare_data.py fineweb-edu --out data/fineweb-edu-10BT
"""

from gpt2_scale.recipes import fineweb_edu
from gpt2_scale.train import main

CONFIG = fineweb_edu("gpt2-124m", engine="zero1", micro_batch=64, lr=6e-4)

if __name__ == "__main__":
    main(CONFIG)
