"""GPT-2 Medium (350M) on FineWeb-Edu 10BT with DeepSpeed ZeRO-2, GPT-3 Table 2.1 settings of gpt3-350m: lr 3e-4, batch 2^19 tokens = 512 x 1024.

    deepspeed --num_gpus 8 recipes/350m.py        # or: torchrun --nproc_per_node 8 recipes/350m.py
    torchrun --nnodes 2 --nproc_per_node 8 --node-rank $i --rdzv-endpoint $HOST:29500 recipes/350m.py   # 2 nodes

Fits 8 x 80 GB: micro-batch 32 x 1024, 2 micro-steps per step, no activation checkpointing; compiled (the default
on CUDA) the estimate is 31.4 GiB per GPU
(python tools/estimate_memory.py --model gpt2-350m --engine zero2 --world 8 --micro-batch 32 --accumulation 2 --compile).
Settings shared by the size recipes are in gpt2_scale/recipes.py.
"""

from gpt2_scale.recipes import gpt2_size
from gpt2_scale.train import main

CONFIG = gpt2_size("gpt2-350m", engine="zero2", micro_batch=32)

if __name__ == "__main__":
    main(CONFIG)
