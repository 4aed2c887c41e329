"""One optimizer step, the same function for the training loop, the equivalence harness and the benchmark.

It lives apart from the loop so that what the harness proves and what the bench times is the step the
trainer runs, not a copy of it, and so that none of them has to import the trainer to get it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from gpt2_scale import distributed
from gpt2_scale.engines.base import Engine

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, targets), each (micro_batch, seq_len)


def optimizer_step(engine: Engine, batches: Iterable[Batch], lr: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over this rank's micro-batches: returns (loss averaged over micro-batches and
    ranks, global gradient norm before clipping), both still on the device.

    Each micro-batch loss is scaled by 1/accumulation so the summed gradients are the mean over the
    whole batch; gradients are synchronized on the last micro-batch only.
    """
    batches = list(batches)
    engine.set_lr(lr)
    loss_sum = torch.zeros((), device=device)
    for i, (x, y) in enumerate(batches):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss_sum += engine.micro_step(x, y, 1.0 / len(batches), sync=i == len(batches) - 1)
    norm = engine.step()
    return distributed.all_reduce_mean(loss_sum / len(batches)), norm
