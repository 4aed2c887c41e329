"""What one equivalence case is, the data it trains on, and how a rank's share of that data is cut.

A case fixes the model, the total batch and its split (micro-batch x accumulation x world size),
the optimizer settings and the engine. The data depends only on the seed and the total batch,
never on the split, so two cases that split the same batch differently train on the same tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from gpt2_scale.config import ENGINES, CheckpointSection, Config, EngineSection, LogSection, ModelSection, OptimSection, TrainSection
from gpt2_scale.zoo import ModelConfig

Batch = tuple[torch.Tensor, torch.Tensor]  # inputs, targets: (B, T) each


@dataclass(frozen=True)
class Case:
    model: ModelConfig
    engine: str
    world_size: int = 1
    micro_batch: int = 2  # sequences per rank per micro-step
    accum: int = 1  # micro-steps per optimizer step
    seq_len: int = 16
    steps: int = 2
    lr: float = 1e-3  # peak; step i uses lr * (i + 1) / steps, so set_lr is exercised too
    grad_clip: float = 1.0  # 0 disables
    weight_decay: float = 0.1
    dtype: str = "fp32"  # fp32 | bf16
    seed: int = 0  # initial weights and tokens
    run_dir: str | None = None  # where stop_at writes its checkpoint and resume reads it (shared by every rank)
    stop_at: int | None = None  # train this many steps, save a checkpoint into run_dir and return their losses only
    resume: bool = False  # start from run_dir's checkpoint, whatever engine, world size and split wrote it
    fault: Literal["drop_adam_moments", "restart_data"] | None = None  # a planted resume bug the harness must catch
    export_to: str | None = None  # load the final checkpoint's full weights under this engine, return its logits
    deterministic: bool = False  # train.deterministic: PyTorch's deterministic algorithms for this run
    loss_chunk: int = 0  # engine.loss_chunk: > 0 trains with the fused chunked lm_head + cross-entropy

    def __post_init__(self) -> None:
        for engine in (self.engine, self.export_to or self.engine):
            if engine not in ENGINES:
                raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"dtype must be fp32 or bf16, got {self.dtype!r}")
        for name in ("world_size", "micro_batch", "accum", "seq_len", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.loss_chunk < 0:
            raise ValueError(f"loss_chunk must be >= 0, got {self.loss_chunk}")
        if self.seq_len > self.model.block_size:
            raise ValueError(f"seq_len {self.seq_len} exceeds the model's context length {self.model.block_size}")
        if self.stop_at is not None and not 0 < self.stop_at < self.steps:
            raise ValueError(f"stop_at must be in [1, steps - 1], got {self.stop_at}")
        if (self.stop_at is not None or self.resume) and not self.run_dir:
            raise ValueError("stop_at and resume need a run_dir")

    @property
    def total_sequences(self) -> int:
        return self.micro_batch * self.accum * self.world_size

    def lr_at(self, step: int) -> float:
        return self.lr * (step + 1) / self.steps

    def replace(self, **changes) -> Case:
        return dataclasses.replace(self, **changes)


def run_config(case: Case, engine: str | None = None, device: str = "cpu") -> Config:
    """The run Config an Engine is built from; it agrees with the case on everything an engine reads."""
    return Config(
        model=ModelSection(name=case.model.name, pad_vocab=case.model.pad_vocab),
        train=TrainSection(
            micro_batch=case.micro_batch,
            seq_len=case.seq_len,
            total_batch_tokens=case.total_sequences * case.seq_len,
            max_steps=case.steps,
            seed=case.seed,
        ),
        optim=OptimSection(lr=case.lr, warmup_steps=0, weight_decay=case.weight_decay, grad_clip=case.grad_clip),
        engine=EngineSection(name=engine or case.engine, dtype=case.dtype, compile=False, device=device, loss_chunk=case.loss_chunk),
        log=LogSection(tensorboard=False),
        checkpoint=CheckpointSection(keep=1),
    )


def tokens(case: Case) -> torch.Tensor:
    """Every token of the run: (steps, total sequences, seq_len + 1), from the seed and the total batch only."""
    gen = torch.Generator().manual_seed(case.seed)
    return torch.randint(0, case.model.vocab_size, (case.steps, case.total_sequences, case.seq_len + 1), generator=gen)


def eval_batch(case: Case) -> torch.Tensor:
    """A fixed batch whose logits compare models after training."""
    gen = torch.Generator().manual_seed(case.seed + 1)
    return torch.randint(0, case.model.vocab_size, (2, case.seq_len), generator=gen)


def rank_batches(step_tokens: torch.Tensor, micro_batch: int, accum: int, world_size: int, rank: int) -> list[Batch]:
    """This rank's micro-batches of one optimizer step.

    As the data loader does: micro-step i covers the i-th block of micro_batch x world_size
    sequences, and rank r takes the r-th micro_batch of them.
    """
    per_step = micro_batch * world_size
    out = []
    for i in range(accum):
        start = i * per_step + rank * micro_batch
        rows = step_tokens[start : start + micro_batch]
        out.append((rows[:, :-1], rows[:, 1:]))
    return out
