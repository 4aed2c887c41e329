"""GPT-2 XL (1558M) on FineWeb-Edu 10BT with DeepSpeed ZeRO-2, GPT-3 Table 2.1 settings of gpt3-1.3b: lr 2e-4, batch 2^20 tokens = 1024 x 1024.

    deepspeed --num_gpus 8 recipes/1558m.py        # or: torchrun --nproc_per_node 8 recipes/1558m.py
    torchrun --nnodes 2 --nproc_per_node 8 --node-rank $i --rdzv-endpoint $HOST:29500 recipes/1558m.py   # 2 nodes

Fits 8 x 80 GB: micro-batch 8 x 1024, 16 micro-steps per step, no activation checkpointing; compiled (the default
on CUDA) the estimate is 25.7 GiB per GPU
(python tools/estimate_memory.py --model gpt2-1558m --engine zero2 --world 8 --micro-batch 8 --accumulation 16 --compile).

On one 80 GB GPU (ZeRO-Offload: Adam state and fp32 master on the host, 128 micro-steps, ~25 GB host RAM):

    python recipes/1558m.py --engine.offload=true

(the compiled estimate 26.1 GiB:
tools/estimate_memory.py --model gpt2-1558m --engine zero2 --world 1 --micro-batch 8 --offload --accumulation 128 --compile)

Settings shared by the size recipes are in gpt2_scale/recipes.py.
"""

from gpt2_scale.recipes import gpt2_size
from gpt2_scale.train import main

CONFIG = gpt2_size("gpt2-1558m", engine="zero2", micro_batch=8)

if __name__ == "__main__":
    main(CONFIG)
