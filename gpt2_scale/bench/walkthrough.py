"""The walk-through's own training loop (build-nanogpt), timed beside ours so ours/walk-through is a measured
ratio: its model (vocab 50304, whole-model compile, DDP), its AdamW, and its step with a ``.item()`` every step."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from gpt2_scale import distributed
from gpt2_scale.config import Config
from gpt2_scale.device import resolve
from gpt2_scale.model import GPT
from gpt2_scale.zoo import ModelConfig


def walkthrough_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches, lr: float, device: torch.device) -> float:
    """One step of the walk-through's loop (build-nanogpt): bf16 autocast, loss / accumulation, DDP sync
    on the last micro-step, all-reduced loss, clip 1.0, fused AdamW, and the loss's ``.item()`` every step."""
    batches = list(batches)
    optimizer.zero_grad()
    loss_accum = torch.zeros((), device=device)
    for i, (x, y) in enumerate(batches):
        x, y = x.to(device), y.to(device)
        model.require_backward_grad_sync = i == len(batches) - 1
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            _, loss = model(x, y)
        loss = loss / len(batches)
        loss_accum += loss.detach()
        loss.backward()
    dist.all_reduce(loss_accum)  # the walk-through's ReduceOp.AVG, which gloo lacks
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return loss_accum.item() / dist.get_world_size()


def walkthrough_runner(cfg: Config, env: distributed.DistEnv) -> Callable[[list], object]:
    """The walk-through's model: vocab 50304, whole-model torch.compile, DDP, its AdamW (decay on 2-D weights, fused on CUDA)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gpt2_scale.optim import param_groups

    torch.set_float32_matmul_precision("high")  # the walk-through's own TF32 line, kept as it wrote it (run_one set ours)
    model = GPT(ModelConfig.from_name(cfg.model.name, pad_vocab=True)).to(env.device)
    if resolve("train", env.device, cfg.engine).compile is not None:  # compile on, as ours: the walk-through compiles the whole model
        model = torch.compile(model)
    model = DDP(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=6e-4, betas=(0.9, 0.95), eps=1e-8,
                                  fused=env.device.type == "cuda" or None)
    return lambda batches: walkthrough_step(model, optimizer, batches, 6e-4, env.device)
