"""FSDP2: each transformer block and the root sharded with ``fully_shard``; DCP checkpoints."""

from __future__ import annotations

import warnings

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
)
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from gpt2_scale.config import ConfigError
from gpt2_scale.engines.base import Engine, adamw, prepare_model
from gpt2_scale.model import GPT
from gpt2_scale.optim import param_groups


class FSDPEngine(Engine):
    def setup(self, model: GPT) -> None:
        if self.runtime.compile == "model" and self.cfg.engine.activation_checkpointing:
            # Each block's FSDP hooks are dynamo-disabled; inside the checkpoint region that whole-model compile
            # traces they cannot graph-break, so dynamo skips all of GPT.forward and the model runs uncompiled.
            raise ConfigError(
                "engine.compile_scope=model with engine.activation_checkpointing under fsdp: torch.compile skips the "
                "whole forward (FSDP2's per-block hooks cannot run inside a compiled checkpoint region), so nothing would "
                "be compiled; use engine.compile_scope=block (each block compiled, checkpointed around it)"
            )
        prepare_model(model, self.cfg.engine, self.runtime)
        # bf16 compute with fp32 gradient reduction; fp32 sharded master weights either way.
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.bf16 else MixedPrecisionPolicy()
        kwargs = dict(mp_policy=mp, offload_policy=CPUOffloadPolicy() if self.cfg.engine.offload else None)
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        for block in model.transformer.h:
            fully_shard(block, **kwargs)
        # The root owns wte and lm_head: the tied weight is one sharded parameter, so tying holds.
        fully_shard(model, **kwargs)
        # torch 2.13 warns at every forward that the root returns a view (the logits without the padded vocabulary
        # rows), whose in-place change would skip a hook; nothing changes the outputs in place (the loop reads the
        # loss, and the harness checks FSDP's gradients against one process).
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPGPT\) returned a view tensor", category=UserWarning)
        self.model = self.module = model
        device = torch.device("cpu") if self.cfg.engine.offload else self.env.device
        self.optimizer = adamw(param_groups(model, self.cfg.optim.weight_decay), self.cfg, device)

    def _set_sync(self, sync: bool) -> None:
        self.model.set_requires_gradient_sync(sync)

    def close(self) -> None:
        """``fully_shard`` turned the model itself into the engine: its FSDP state, parameter groups and DTensor
        parameters hold the device mesh and process groups. Take the groups off them, so that a caller still
        holding the model (a traceback on the error path does) does not keep them alive past
        ``distributed.shutdown()``; the model is not usable for training after this."""
        model = getattr(self, "model", None)
        if model is not None:
            _drop_process_groups(model)
        super().close()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return {k: v.float() for k, v in get_model_state_dict(self.model, options=options).items()}


def _drop_process_groups(model: torch.nn.Module) -> None:
    """Remove every ProcessGroup reachable from ``model`` through torch.distributed's own objects (FSDP states,
    parameter groups, mesh infos, device meshes, DTensor specs) and their containers."""
    from torch.distributed import ProcessGroup

    seen: set[int] = set()
    todo: list[object] = [m._get_fsdp_state() for m in model.modules() if hasattr(m, "_get_fsdp_state")]
    todo += [p._spec for p in model.parameters() if hasattr(p, "_spec")]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, dict):
            for key in [k for k, v in obj.items() if isinstance(v, ProcessGroup)]:
                del obj[key]
            todo += obj.values()
        elif isinstance(obj, (list, tuple, set)):
            todo += obj
        elif type(obj).__module__.startswith("torch.distributed"):
            fields = dict(vars(obj)) if hasattr(obj, "__dict__") else {}
            for cls in type(obj).__mro__:  # dataclasses with slots, DTensorSpec among them
                fields.update({n: getattr(obj, n) for n in getattr(cls, "__slots__", ()) if isinstance(n, str) and hasattr(obj, n)})
            for name, value in fields.items():
                if isinstance(value, ProcessGroup):
                    try:
                        object.__setattr__(obj, name, None)
                    except (AttributeError, TypeError):
                        pass
                else:
                    todo.append(value)
