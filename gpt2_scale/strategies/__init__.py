"""Engines behind one interface: ``build(cfg, env)`` picks DDP, FSDP2 or DeepSpeed ZeRO-1/2/3."""

from gpt2_scale.config import Config
from gpt2_scale.distributed import DistEnv
from gpt2_scale.strategies.base import Strategy


def build(cfg: Config, env: DistEnv) -> Strategy:
    name = cfg.engine.name
    if name == "ddp":
        from gpt2_scale.strategies.ddp import DDPStrategy as cls
    elif name == "fsdp":
        from gpt2_scale.strategies.fsdp import FSDPStrategy as cls
    else:  # zero1 | zero2 | zero3 (validated by the config)
        from gpt2_scale.strategies.deepspeed import DeepSpeedStrategy as cls
    return cls(cfg, env)


def weights_reader(engine: str):
    """A function checkpoint_dir -> full fp32 state dict for checkpoints of ``engine``; needs no process group."""
    if engine == "ddp":
        from gpt2_scale.strategies.ddp import read_full_weights
    elif engine == "fsdp":
        from gpt2_scale.strategies.fsdp import read_full_weights
    else:
        from gpt2_scale.strategies.deepspeed import read_full_weights
    return read_full_weights


__all__ = ["Strategy", "build", "weights_reader"]
