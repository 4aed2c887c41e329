"""The Engine interface the training loop talks to; engines differ only behind it."""

from __future__ import annotations

import contextlib
import dataclasses
from abc import ABC, abstractmethod
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from gpt2_scale.config import Config, EngineSection
from gpt2_scale.device import Runtime, compile_options, resolve
from gpt2_scale.distributed import DistEnv
from gpt2_scale.engines import layout
from gpt2_scale.loss import chunk_loss, cross_entropy
from gpt2_scale.memory import Estimate, GiB, StateBytes, estimate, held_bytes, tensors_in, too_large
from gpt2_scale.model import GPT, Options
from gpt2_scale.zoo import ModelConfig


def prepare_model(model: GPT, engine: EngineSection, runtime: Runtime, compile_model: bool = True) -> None:
    """Apply the run's engine settings to the model, in place, before any engine wraps it: the one place that does.

    The model's ``Options`` (activation checkpointing, the fused loss's chunk, attention's kernel, compiled loss functions), then
    torch.compile, as torchtitan's ``parallelize`` applies activation checkpointing and compile before FSDP.
    Compiling in place (``nn.Module.compile``, not ``torch.compile(module)``) keeps parameter and state-dict names
    those of the plain model (no ``_orig_mod.``), so checkpoints do not depend on it. Scope "block" compiles each
    transformer block and the two loss functions (outside the blocks but B·T·V wide: the loss of the full logits
    and the fused loss's per-chunk softmax); scope "loss" those two functions only; scope "model" the whole GPT,
    unless ``compile_model`` is False because the engine compiles it itself (DeepSpeed: ``engine.compile()``, after
    its hooks exist).
    """
    options = Options(activation_checkpointing=engine.activation_checkpointing, loss_chunk=engine.loss_chunk, attention=engine.attention)
    compile_kwargs = compile_options(engine)
    if runtime.compile == "block":
        for block in model.transformer.h:
            block.compile(**compile_kwargs)
    if runtime.compile in ("block", "loss"):
        options = dataclasses.replace(options, cross_entropy=torch.compile(cross_entropy, **compile_kwargs),
                                      chunk_loss=torch.compile(chunk_loss, **compile_kwargs))
    elif runtime.compile == "model" and compile_model:
        model.compile(**compile_kwargs)
    model.options = options


class Engine(ABC):
    """Wraps a model and its optimizer for one engine.

    The loop calls ``micro_step`` once per micro-batch (``sync`` only on the last one of an optimizer
    step) and ``step`` once per optimizer step.
    """

    # Gradients freed after each step (the usual); DDP keeps them as views of its all-reduce buckets instead.
    zero_grads_to_none = True
    ds_config: dict | None = None  # the DeepSpeed JSON a ZeRO engine runs with (its buckets count in memory)

    def __init__(self, cfg: Config, env: DistEnv) -> None:
        self.cfg, self.env = cfg, env
        self.runtime = resolve("train", env.device, cfg.engine)  # dtype and compile scope, "auto" decided
        self.bf16 = self.runtime.bf16
        self.model: nn.Module  # what the loop calls forward on
        self.module: GPT  # the GPT inside (sharded for fsdp/zero3), for evaluation and sampling
        self.optimizer: torch.optim.Optimizer

    @abstractmethod
    def setup(self, model: GPT) -> None:
        """Wrap the model (already on env.device) and build its optimizer."""

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context forward passes run in (bf16 autocast where the engine does not cast itself)."""
        return contextlib.nullcontext()

    def micro_step(self, x: torch.Tensor, y: torch.Tensor, loss_scale: float, sync: bool) -> torch.Tensor:
        """Forward and backward one micro-batch; gradients are reduced across ranks only when ``sync``."""
        self._set_sync(sync)
        with self.autocast():
            loss = self.model(x, y)[1]  # not the logits: held through backward they would cost B·T·V·2 bytes
        self._backward(loss * loss_scale)
        return loss.detach()

    @abstractmethod
    def _set_sync(self, sync: bool) -> None: ...

    def _backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> torch.Tensor:
        """Clip to cfg.optim.grad_clip (global norm across shards), step, zero grads; returns the norm before clipping."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = global_grad_norm(grads)
        if self.cfg.optim.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(self.model.parameters(), self.cfg.optim.grad_clip, norm, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=self.zero_grads_to_none)
        return norm

    def state_bytes(self) -> StateBytes:
        """Bytes of weights, gradients and optimizer state this rank holds now (local shards only); the
        benchmark and the memory tests call it between backward and step. DeepSpeed overrides it."""
        params = list(self.model.parameters())
        return StateBytes(
            held_bytes(params), held_bytes(p.grad for p in params), held_bytes(tensors_in(list(self.optimizer.state.values())))
        )

    def memory_estimate(self, micro_batch: int | None = None) -> Estimate:
        """tools/estimate_memory.py's prediction for this engine's settings, compiled or not, or for another
        micro-batch with the same total batch."""
        cfg, world = self.cfg, self.env.world_size
        micro_batch = micro_batch or cfg.train.micro_batch
        return estimate(
            ModelConfig.from_name(cfg.model.name, pad_vocab=cfg.model.pad_vocab), cfg.engine.name, world,
            micro_batch, cfg.train.seq_len, bf16=self.bf16, checkpointing=cfg.engine.activation_checkpointing,
            offload=cfg.engine.offload, loss_chunk=cfg.engine.loss_chunk,
            accumulation=max(1, cfg.train.total_batch_tokens // (micro_batch * cfg.train.seq_len * world)),
            ds_config=self.ds_config, compiled=self.runtime.compile is not None)

    def memory_report(self, device_bytes: int | None) -> str:
        """The trainer's opening line on memory: the estimated peak and, where it exceeds ``device_bytes`` (a GPU's
        total; None elsewhere), the micro-batch or setting to change."""
        line = (f"estimated peak memory per rank: {self.memory_estimate().total / GiB:.2f} GiB "
                "(the terms: tools/estimate_memory.py)")
        warning = device_bytes and too_large(lambda b: self.memory_estimate(b).total, self.cfg.train.micro_batch, device_bytes)
        return f"{line}\n{warning}" if warning else line

    def close(self) -> None:
        """Release the engine: its hooks, buffers and every reference it holds to a process group.

        Every way out of a run calls it (success, error, signal), before ``distributed.shutdown()``, which can
        only free (and join the threads of) groups nothing holds any more; as must a caller that builds another
        engine in the same process. It runs no collective (after an error a peer may be gone), may be called
        twice, and leaves the engine unusable. Engines that attach state to the model override it to take
        that off as well, and call this."""
        self.model = self.module = self.optimizer = None  # type: ignore[assignment]

    def save(self, path: Path) -> None:
        """Write weights and Adam state under ``path`` in the engines' common layout (every rank calls).

        This is the torch-native engines' way, through DCP's state-dict API; ZeRO overrides it."""
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=layout.FLAT)
        dcp.save({"model": model_sd, "optimizer": layout.adam_only(optim_sd)}, checkpoint_id=path)

    def load(self, path: Path) -> None:
        """Restore a checkpoint of that layout, whatever engine and world size wrote it (every rank calls)."""
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=layout.FLAT)  # Adam's state created
        state = {"model": model_sd, "optimizer": layout.adam_only(optim_sd)}
        dcp.load(state, storage_reader=layout.reader(path))  # reads just this rank's shards
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict={**optim_sd, **state["optimizer"]}, options=layout.FLAT)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Unsharded fp32 weights by parameter name, on CPU (every rank calls; complete on rank 0).

        This is the unsharded case; sharding engines override it to gather."""
        return {k: v.detach().float().cpu() for k, v in self.module.state_dict().items()}


def global_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all gradients, accumulated in fp64 as DeepSpeed does, so every engine reports the same
    number (an fp32 sum over millions of elements drifts by ~1e-5 relative). Sharded (DTensor) gradients
    give a norm over the whole model."""
    norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads])
    norm = torch.linalg.vector_norm(norms)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    return norm.float()


def adamw(params, cfg: Config, device: torch.device) -> torch.optim.AdamW:
    """torch AdamW with GPT-3's betas/eps; the fused kernel on CUDA."""
    o = cfg.optim
    return torch.optim.AdamW(
        params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=device.type == "cuda" or None
    )
