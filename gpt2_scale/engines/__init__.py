"""Engines behind one interface: ``build(cfg, env)`` picks DDP, FSDP2 or DeepSpeed ZeRO-1/2/3."""

from gpt2_scale.config import Config
from gpt2_scale.distributed import DistEnv
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


def weights_reader(engine: str):
    """A function checkpoint_dir -> full fp32 state dict for checkpoints of ``engine``; needs no process group."""
    if engine == "ddp":
        from gpt2_scale.engines.ddp import read_full_weights
    elif engine == "fsdp":
        from gpt2_scale.engines.fsdp import read_full_weights
    else:
        from gpt2_scale.engines.deepspeed import read_full_weights
    return read_full_weights


__all__ = ["Engine", "build", "weights_reader"]
