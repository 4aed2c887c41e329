"""Per-rank memory: the ZeRO paper's model-state accounting, activations and logits, and what a rank holds.

Model states (Rajbhandari et al. 2020, section 3.1) for Ψ parameters trained with Adam; bytes per rank
at world size N, bf16 = 16-bit weights where the engine keeps them:

    engine  weights          gradients        optimizer (fp32 master + Adam m, v)
    ddp     4Ψ               4Ψ               8Ψ     autocast computes in bf16 but keeps fp32 weights: no master copy
    fsdp    4Ψ/N             4Ψ/N             8Ψ/N   FSDP2 shards fp32 weights; bf16 copies exist only while a block runs
    zero1   wΨ               wΨ/N *           12Ψ/N  w = 2 (bf16) or 4 (fp32); DeepSpeed keeps an fp32 master even for fp32
    zero2   wΨ               wΨ/N             12Ψ/N
    zero3   wΨ/N             wΨ/N             12Ψ/N

* Counted at the optimizer update, where ``Engine.state_bytes`` measures. The paper's ZeRO-1 holds wΨ
gradients; DeepSpeed 0.19's stage 1 reduce-scatters at the accumulation boundary and frees the gradients of
parameters other ranks own, so at the update it holds wΨ/N like stage 2 (it differs from stage 2 only while
accumulating, when it keeps full gradients). The estimator uses the larger wΨ for zero1.

With bf16 ZeRO-1/2/3 that is the paper's (2 + 2 + 12)Ψ with the stage's terms divided by N. Offload moves
the optimizer column to host memory (DeepSpeed ZeRO-Offload), or all three columns (FSDP2 CPUOffloadPolicy).

Not counted: communication buckets (DDP's and DeepSpeed's reduce buckets), ZeRO-3's prefetched and
persistent (``stage3_param_persistence_threshold``) full parameters, the CUDA context and the allocator's
fragmentation: budget 1-3 GiB for them on a GPU.
"""

from __future__ import annotations

import resource
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from gpt2_scale.zoo import ModelConfig

GiB = 2**30

# Saved-for-backward bytes per token, per unit of n_embd, per layer, of gpt2_scale.model.Block, measured with
# saved_tensors_hooks at B=8, T=256, d=128 on CPU (tests/test_memory.py re-measures them). fp32: about 16 values
# (ln_1 in/out, q k v, attention out, its reshaped copy, residual, ln_2 out, 4·d MLP hidden, 4·d GELU out) x 4
# bytes plus attention's small per-head terms. bf16 autocast halves most of them but keeps the residual stream
# and LayerNorm statistics fp32; it includes the per-layer bf16 weight casts (12·d² x 2 bytes, a few % at GPT-2 sizes).
BLOCK_BYTES = {False: 66, True: 38}
# With per-block checkpointing only each block's input stays: the fp32 residual stream (autocast keeps it fp32).
CHECKPOINTED_BLOCK_BYTES = 4
# Bytes per token per vocabulary entry around the loss: the saved log-softmax (fp32) plus, under bf16, the
# bf16 logits, then the fp32 gradient of the logits when backward starts. The fused loss (engine.loss_chunk,
# gpt2_scale/loss.py) holds as much for one chunk of tokens at a time: the chunk's logits, their fp32 copy and
# log-softmax (whose softmax becomes the gradient in place), plus an fp32 weight-gradient accumulator of V·d.
LOGIT_BYTES = {False: 4 + 4, True: 6 + 4}


@dataclass(frozen=True)
class StateBytes:
    params: int
    grads: int
    optimizer: int  # master weights (where kept apart from the weights) and Adam's moments

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def expected_state_bytes(num_params: int, engine: str, world: int, bf16: bool, offload: bool = False,
                         at_update: bool = False) -> StateBytes:
    """Model-state bytes one rank holds on its device, by the table in the module docstring; ``at_update``
    gives DeepSpeed ZeRO-1's gradients at the optimizer update instead of while accumulating."""
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    psi, n = num_params, world
    if engine == "ddp":
        if offload:
            raise ValueError("ddp has no offload; use zero1/2/3 or fsdp")
        return StateBytes(4 * psi, 4 * psi, 8 * psi)
    if engine == "fsdp":
        return StateBytes(0, 0, 0) if offload else StateBytes(4 * psi // n, 4 * psi // n, 8 * psi // n)
    if engine in ("zero1", "zero2", "zero3"):
        stage, w = int(engine[-1]), 2 if bf16 else 4
        params = w * psi // (n if stage == 3 else 1)
        grads = w * psi // (n if stage >= 2 or at_update else 1)
        return StateBytes(params, grads, 0 if offload else 12 * psi // n)
    raise ValueError(f"unknown engine {engine!r}; valid: ddp, fsdp, zero1, zero2, zero3")


def activation_bytes(model: ModelConfig, micro_batch: int, seq_len: int, bf16: bool, checkpointing: bool) -> int:
    """Bytes saved for backward by the transformer blocks for one micro-batch.

    Without checkpointing every block keeps BLOCK_BYTES·B·T·d; with it each keeps only its input and one block
    at a time is recomputed with its full activations during backward.
    """
    per_block = micro_batch * seq_len * model.n_embd
    if checkpointing:
        return per_block * (model.n_layer * CHECKPOINTED_BLOCK_BYTES + BLOCK_BYTES[bf16])
    return per_block * model.n_layer * BLOCK_BYTES[bf16]


def logits_bytes(model: ModelConfig, micro_batch: int, seq_len: int, bf16: bool, loss_chunk: int = 0) -> int:
    """Bytes around the loss: all B·T tokens' logits, or with ``loss_chunk`` one chunk's plus the V·d fp32
    weight-gradient accumulator."""
    if loss_chunk:
        return min(loss_chunk, micro_batch * seq_len) * model.vocab_size * LOGIT_BYTES[bf16] + model.vocab_size * model.n_embd * 4
    return micro_batch * seq_len * model.vocab_size * LOGIT_BYTES[bf16]


@dataclass(frozen=True)
class Estimate:
    states: StateBytes
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.states.total + self.activations + self.logits


def estimate(model: ModelConfig, engine: str, world: int, micro_batch: int, seq_len: int, *, bf16: bool = True,
             checkpointing: bool = False, offload: bool = False, loss_chunk: int = 0) -> Estimate:
    """Predicted peak bytes on one GPU: model states + activations + logits (see the module docstring)."""
    return Estimate(
        expected_state_bytes(model.num_params(), engine, world, bf16, offload),
        activation_bytes(model, micro_batch, seq_len, bf16, checkpointing),
        logits_bytes(model, micro_batch, seq_len, bf16, loss_chunk),
    )


# --- what a rank actually holds ---


def held_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind ``tensors``: views into one flat buffer count the buffer once,
    a DTensor counts its local shard."""
    storages: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        if hasattr(t, "to_local"):  # DTensor: only the shard this rank stores
            t = t.to_local()
        storage = t.untyped_storage()
        if storage.nbytes():
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def tensors_in(obj) -> list[torch.Tensor]:
    """Every tensor in nested dicts / lists / tuples (optimizer state, DeepSpeed's partition lists)."""
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in tensors_in(item)]
    return []


def measure_state_bytes(engine, step: Callable[[], object]) -> StateBytes:
    """Run ``step`` (one call of step.optimizer_step) and count, between the last backward and the
    optimizer update, what ``engine.state_bytes()`` reports: the moment gradients exist and, after the
    first step, the optimizer state too."""
    seen: list[StateBytes] = []
    original = engine.step

    def counting_step():
        seen.append(engine.state_bytes())
        return original()

    engine.step = counting_step
    try:
        step()
    finally:
        del engine.step  # back to the class's method
    return seen[0]


def peak_memory(device: torch.device) -> dict[str, int]:
    """Peak bytes so far: the CUDA caching allocator's max allocated/reserved, or on CPU the process peak RSS."""
    if device.type == "cuda":
        return {"allocated": torch.cuda.max_memory_allocated(device), "reserved": torch.cuda.max_memory_reserved(device)}
    return {"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # KiB on Linux


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


_STATE_FORMULAS = {  # (weights, gradients, optimizer) per rank, w = bytes per weight
    "ddp": ("4Ψ", "4Ψ", "8Ψ"),
    "fsdp": ("4Ψ/N", "4Ψ/N", "8Ψ/N"),
    "zero1": ("wΨ", "wΨ", "12Ψ/N"),
    "zero2": ("wΨ", "wΨ/N", "12Ψ/N"),
    "zero3": ("wΨ/N", "wΨ/N", "12Ψ/N"),
}


def explain(model: ModelConfig, engine: str, world: int, micro_batch: int, seq_len: int, *, bf16: bool = True,
            checkpointing: bool = False, offload: bool = False, loss_chunk: int = 0) -> str:
    """The estimate with each term's formula and numbers, for tools/estimate_memory.py."""
    est = estimate(model, engine, world, micro_batch, seq_len, bf16=bf16, checkpointing=checkpointing, offload=offload,
                   loss_chunk=loss_chunk)
    psi, L, d, V = model.num_params(), model.n_layer, model.n_embd, model.vocab_size
    w = 2 if bf16 and engine.startswith("zero") else 4
    formulas = list(_STATE_FORMULAS[engine])
    if offload:
        formulas = ["on host"] * 3 if engine == "fsdp" else formulas[:2] + ["on host"]
    a = BLOCK_BYTES[bf16]
    act = f"B·T·d·(L·{CHECKPOINTED_BLOCK_BYTES} + {a})" if checkpointing else f"B·T·d·L·{a}"
    logit = LOGIT_BYTES[bf16]
    if loss_chunk:
        logits = (f"c·V·{logit} + V·d·4", "one chunk's logits + fp32 weight-gradient accumulator")
    else:
        logits = (f"B·T·V·{logit}", "saved log-softmax + logits gradient")
    g = lambda n: f"{n / GiB:8.2f} GiB"  # noqa: E731
    s = est.states
    lines = [
        f"{model.name}: Ψ = {psi:,} parameters, L = {L}, d = {d}, V = {V}; engine {engine}, N = {world}, "
        f"B = {micro_batch}, T = {seq_len}, {'bf16' if bf16 else 'fp32'}, w = {w}"
        + (", activation checkpointing" if checkpointing else "") + (", offload" if offload else "")
        + (f", fused loss in chunks of c = {min(loss_chunk, micro_batch * seq_len)} tokens" if loss_chunk else ""),
        f"  weights      {formulas[0]:<22} {g(s.params)}",
        f"  gradients    {formulas[1]:<22} {g(s.grads)}",
        f"  optimizer    {formulas[2]:<22} {g(s.optimizer)}   fp32 master + Adam m, v",
        f"  activations  {act:<22} {g(est.activations)}",
        f"  logits       {logits[0]:<22} {g(est.logits)}   {logits[1]}",
        f"  total        {'':<22} {g(est.total)}   per GPU, plus 1-3 GiB of CUDA context, buckets and fragmentation",
    ]
    return "\n".join(lines)
