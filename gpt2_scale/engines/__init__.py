"""Engines behind one interface: ``build(cfg, env)`` picks DDP, FSDP2 or DeepSpeed ZeRO-1/2/3."""

from pathlib import Path

import torch

from gpt2_scale.config import Config
from gpt2_scale.distributed import DistEnv
from gpt2_scale.engines import layout, legacy
from gpt2_scale.engines.base import Engine


def build(cfg: Config, env: DistEnv) -> Engine:
    name = cfg.engine.name
    if name == "ddp":
        from gpt2_scale.engines.ddp import DDPEngine as cls
    elif name == "fsdp":
        from gpt2_scale.engines.fsdp import FSDPEngine as cls
    else:  # zero1 | zero2 | zero3 (validated by the config)
        from gpt2_scale.engines.deepspeed import ZeROEngine as cls
    return cls(cfg, env)


def read_full_weights(path: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights by parameter name from a checkpoint of any engine and layout; needs no process group."""
    return layout.read_full_weights(path) if layout.is_elastic(path) else legacy.read_full_weights(path)


__all__ = ["Engine", "build", "read_full_weights"]
