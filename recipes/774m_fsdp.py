"""GPT-2 Large (774M) on FineWeb-Edu 10BT with FSDP2, GPT-3 Table 2.1 settings of gpt3-760m: lr 2.5e-4, batch 2^19 tokens = 512 x 1024.

    torchrun --nproc_per_node 8 recipes/774m_fsdp.py
    torchrun --nnodes 2 --nproc_per_node 8 --node-rank $i --rdzv-endpoint $HOST:29500 recipes/774m_fsdp.py   # 2 nodes

Fits 8 x 80 GB: micro-batch 16 x 1024, 4 micro-steps per step, no activation checkpointing; compiled (the default
on CUDA) the estimate is 29.6 GiB per GPU
(python tools/estimate_memory.py --model gpt2-774m --engine fsdp --world 8 --micro-batch 16 --accumulation 4 --compile).
Settings shared by the size recipes are in gpt2_scale/recipes.py.
"""

from gpt2_scale.recipes import gpt2_size
from gpt2_scale.train import main

CONFIG = gpt2_size("gpt2-774m", engine="fsdp", micro_batch=16)

if __name__ == "__main__":
    main(CONFIG)
