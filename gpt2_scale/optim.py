"""AdamW parameter groups and the learning-rate schedule of GPT-2/GPT-3 (pure functions, cheap to test)."""

from __future__ import annotations

import math

import torch.nn as nn

from gpt2_scale.config import OptimSection


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay 2-D weights (matmuls and embeddings); never biases or LayerNorm gains.

    Names are sorted so every rank and every engine sees the parameters in the same order.
    """
    params = sorted((n, p) for n, p in model.named_parameters() if p.requires_grad)
    decay = [p for _, p in params if p.dim() >= 2]
    no_decay = [p for _, p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, cfg: OptimSection, max_steps: int) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at decay_steps (flat after)."""
    decay_steps = cfg.decay_steps or max_steps
    min_lr = cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= decay_steps:
        return min_lr
    progress = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)


def schedule_warning(cfg: OptimSection, max_steps: int) -> str | None:
    """A line for a schedule that does not fit the run: a recipe's warmup (715 steps for 124M) with a short
    --max-steps warms up for the whole run and never decays, rarely what a short run means; a cosine that ends
    before the run does (a run resumed with a larger --max-steps, a config.yaml reused with --config) trains its
    last steps at the final learning rate, which is better said than found in the curves."""
    decay_steps = cfg.decay_steps or max_steps
    if cfg.warmup_steps >= decay_steps:
        return (f"warning: optim.warmup_steps {cfg.warmup_steps} >= the schedule's length {decay_steps} (optim.decay_steps: the "
                "first --max-steps unless set), so the learning rate only warms up and never decays; for a short run pass a "
                "smaller --optim.warmup_steps")
    if decay_steps < max_steps:
        return (f"note: the cosine ends at step {decay_steps} (optim.decay_steps), before --max-steps {max_steps}: the last "
                f"{max_steps - decay_steps} steps train at the final learning rate {cfg.lr * cfg.min_lr_ratio:g}; pass "
                f"--optim.decay_steps={max_steps} to spread it over the whole run")
    return None
