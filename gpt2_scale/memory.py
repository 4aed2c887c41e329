"""Per-rank memory: the ZeRO paper's model-state accounting, the predicted peak of a training step, and what a
rank holds.

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

The peak of a step is not the sum of everything: ``estimate`` takes the largest of four moments, each the
weights and optimizer state plus what lives then (``Estimate.phases``):

    forward    activations + copies of the weights + the loss being computed   (gradients: DDP's only)
    backward   activations + copies saved for backward + the loss's gradient   (the usual peak)
    gradients  activations + DeepSpeed's reduce buckets, allocated by the first gradients
    update     gradients + buckets

Gradients live through forward only where they are kept between steps: DDP's are views of its all-reduce
buckets, the other engines free theirs after the update (``zero_grad(set_to_none)``) unless accumulating, when
FSDP2 holds them whole: it reduce-scatters only after the last micro-batch.
The constants are eager PyTorch's, each measured in tests/test_memory.py (saved tensors, and the whole step's
peak against an allocation tracker on CPU). Compiled (``compiled``: torch.compile of any scope, on CUDA by default;
ZeRO-3's default compiles only the loss) the loss is one fused kernel each way: COMPILED_LOSS_BYTES. Compiled blocks
save within 6% of eager's (34.25, 32.19 and 64.25 bytes per B·T·d against 36, 32 and 64, measured on CPU), so the
estimate counts eager's for them.

Not counted: DDP's communication buckets, ZeRO-3's persistent (``stage3_param_persistence_threshold``) full
parameters, the CUDA context and the allocator's fragmentation: budget 1-3 GiB for them on a GPU.
"""

from __future__ import annotations

import resource
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from gpt2_scale.zoo import ModelConfig

GiB = 2**30


def compute_mode(engine: str, bf16: bool) -> str:
    """How forward computes: "fp32"; "autocast" (DDP: fp32 weights, autocast's bf16 copy of each weight cached for
    the forward); "bf16" (FSDP2's MixedPrecisionPolicy and DeepSpeed's bf16 cast the weights themselves)."""
    return "autocast" if bf16 and engine == "ddp" else "bf16" if bf16 else "fp32"


# Saved-for-backward bytes per token, per unit of n_embd, per layer, of gpt2_scale.model.Block; tests/test_memory.py
# measures them with saved_tensors_hooks. fp32: about 16 values (ln_1 in/out, q k v, attention out, its reshaped
# copy, residual, ln_2 out, 4·d MLP hidden, 4·d GELU out) x 4 bytes plus attention's small per-head terms.
# Autocast halves most of them but keeps the residual stream and LayerNorm fp32; bf16 weights make everything bf16.
BLOCK_BYTES = {"fp32": 64, "autocast": 36, "bf16": 32}
# With per-block checkpointing only each block's input stays: the residual stream (fp32 under autocast).
CHECKPOINTED_BLOCK_BYTES = {"fp32": 4, "autocast": 4, "bf16": 2}
# Bytes per logit (B·T·V) around the plain loss, as eager PyTorch runs it. While forward computes it: the logits
# (4 or 2 bytes), their fp32 copy (bf16 only) and the fp32 log-softmax. When backward starts: the saved
# log-softmax, nll_loss's dense fp32 gradient and the fp32 gradient of the logits, before it is cast back.
LOSS_FORWARD_BYTES = {"fp32": 8, "autocast": 10, "bf16": 10}
LOSS_BACKWARD_BYTES = 12
# Compiled, the loss saves only the logits (and a per-token logsumexp) and its backward writes the logits' gradient
# in their dtype in one pass: (in forward, at backward's start) = the logits, then the logits and their gradient.
COMPILED_LOSS_BYTES = {"fp32": (4, 8), "autocast": (2, 4), "bf16": (2, 4)}
# The fused loss (engine.loss_chunk, gpt2_scale/loss.py) holds as much for one chunk of tokens at a time (the
# chunk's logits, their fp32 copy and log-softmax, whose softmax becomes the gradient in place) plus an fp32
# weight-gradient accumulator of V·d.
CHUNK_BYTES = {"fp32": 8, "autocast": 10, "bf16": 10}
# DeepSpeed's defaults where its JSON is silent (deepspeed/runtime/zero/config.py).
DS_REDUCE_BUCKET_SIZE, DS_PREFETCH_BUCKET_SIZE = 500_000_000, 50_000_000


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


def activation_bytes(model: ModelConfig, micro_batch: int, seq_len: int, mode: str, checkpointing: bool) -> int:
    """Bytes saved for backward by the transformer blocks for one micro-batch.

    Without checkpointing every block keeps BLOCK_BYTES·B·T·d; with it each keeps only its input and one block
    at a time is recomputed with its full activations during backward.
    """
    per_block = micro_batch * seq_len * model.n_embd
    if checkpointing:
        return per_block * (model.n_layer * CHECKPOINTED_BLOCK_BYTES[mode] + BLOCK_BYTES[mode])
    return per_block * model.n_layer * BLOCK_BYTES[mode]


def loss_constants(mode: str, compiled: bool) -> tuple[int, int]:
    """Bytes per logit around the plain loss (in forward, at backward's start), eager or compiled."""
    return COMPILED_LOSS_BYTES[mode] if compiled else (LOSS_FORWARD_BYTES[mode], LOSS_BACKWARD_BYTES)


def loss_bytes(model: ModelConfig, micro_batch: int, seq_len: int, mode: str, loss_chunk: int = 0,
               compiled: bool = False) -> tuple[int, int]:
    """Bytes around the loss (while forward computes it, when backward starts): all B·T tokens' logits, or with
    ``loss_chunk`` one chunk's plus the V·d fp32 weight-gradient accumulator."""
    if loss_chunk:
        chunk = min(loss_chunk, micro_batch * seq_len) * model.vocab_size * CHUNK_BYTES[mode] + model.vocab_size * model.n_embd * 4
        return chunk, chunk
    logits = micro_batch * seq_len * model.vocab_size
    forward, backward = loss_constants(mode, compiled)
    return logits * forward, logits * backward


def weight_copy_bytes(model: ModelConfig, engine: str, mode: str, checkpointing: bool,
                      ds_config: dict | None = None) -> tuple[int, int]:
    """Copies of the weights besides the stored ones (in forward, when backward starts): autocast's bf16 copy of
    every weight, cached until forward ends and saved for backward unless the blocks are recomputed (the
    lm_head's stays saved); FSDP2's unsharded root (wte, wpe), which stays gathered from forward to backward;
    the parameters ZeRO-3 gathers ahead of use (``stage3_prefetch_bucket_size`` elements)."""
    if engine == "zero3":
        zero = (ds_config or {}).get("zero_optimization", {})
        prefetch = min(model.num_params(), int(zero.get("stage3_prefetch_bucket_size", DS_PREFETCH_BUCKET_SIZE)))
        return (prefetch * (4 if mode == "fp32" else 2),) * 2
    if mode == "autocast":
        psi = model.num_params()
        return 2 * psi, 2 * (model.vocab_size * model.n_embd if checkpointing else psi)
    if engine == "fsdp":
        root = (model.vocab_size + model.block_size) * model.n_embd * (4 if mode == "fp32" else 2)
        return root, root
    return 0, 0


def bucket_bytes(engine: str, bf16: bool, ds_config: dict | None, accumulation: int = 1) -> tuple[int, int]:
    """DeepSpeed's gradient buckets of ``reduce_bucket_size`` elements of the gradient dtype (held through the step,
    allocated by backward's first gradients): ZeRO-3 keeps one from setup on, ZeRO-1 one from the first
    micro-batch on while accumulating; otherwise ZeRO-1 and ZeRO-2 allocate theirs when gradients arrive, ZeRO-2
    two of them while it overlaps communication. Measured on CPU (tests/test_memory.py)."""
    if not engine.startswith("zero"):
        return 0, 0
    zero = (ds_config or {}).get("zero_optimization", {})
    bucket = int(zero.get("reduce_bucket_size", DS_REDUCE_BUCKET_SIZE)) * (2 if bf16 else 4)
    if engine == "zero3" or (engine == "zero1" and accumulation > 1):
        return bucket, 0
    return 0, bucket * (2 if engine == "zero2" and zero.get("overlap_comm", False) else 1)


def held_grad_bytes(num_params: int, engine: str, states: StateBytes, accumulation: int) -> int:
    """Gradients alive through forward: DDP's (views of its buckets), and every engine's while accumulating;
    FSDP2's whole (it skips the reduce-scatter until the last micro-batch and accumulates in fp32)."""
    if engine == "ddp":
        return states.grads
    if accumulation == 1:
        return 0
    return 4 * num_params if engine == "fsdp" else states.grads


@dataclass(frozen=True)
class Estimate:
    """What one rank holds at the moments one of which is a training step's peak, for one micro-batch per step
    and the loss as eager or compiled code computes it: forward computing the loss, backward starting at the loss,
    backward's first gradients reaching DeepSpeed's buckets, and the optimizer update."""

    states: StateBytes
    held_grads: int  # gradients alive through forward: DDP's bucket views, every engine's while accumulating
    activations: int
    weight_copies: tuple[int, int]  # (in forward, from backward's start on)
    loss: tuple[int, int]  # (in forward, at backward's start)
    buckets: tuple[int, int]  # DeepSpeed's (held through the step, allocated by backward's first gradients)

    @property
    def phases(self) -> dict[str, int]:
        held = self.states.params + self.states.optimizer + self.held_grads + self.buckets[0]
        in_backward = held + self.activations + self.weight_copies[1]
        return {
            "forward": held + self.activations + self.weight_copies[0] + self.loss[0],
            "backward": in_backward + self.loss[1],
            "gradients": in_backward + self.buckets[1],
            "update": self.states.total + sum(self.buckets),
        }

    @property
    def total(self) -> int:
        """The predicted peak: the largest of the moments."""
        return max(self.phases.values())


def estimate(model: ModelConfig, engine: str, world: int, micro_batch: int, seq_len: int, *, bf16: bool = True,
             checkpointing: bool = False, offload: bool = False, loss_chunk: int = 0, accumulation: int = 1,
             ds_config: dict | None = None, compiled: bool = False) -> Estimate:
    """Predicted peak bytes on one GPU (see the module docstring); ``ds_config`` is the DeepSpeed JSON of a ZeRO
    engine (its buckets; DeepSpeed's defaults where absent); ``compiled``: torch.compile on (the loss fused)."""
    states = expected_state_bytes(model.num_params(), engine, world, bf16, offload)
    mode = compute_mode(engine, bf16)
    return Estimate(
        states,
        held_grad_bytes(model.num_params(), engine, states, accumulation),
        activation_bytes(model, micro_batch, seq_len, mode, checkpointing),
        weight_copy_bytes(model, engine, mode, checkpointing, ds_config),
        loss_bytes(model, micro_batch, seq_len, mode, loss_chunk, compiled),
        bucket_bytes(engine, bf16, ds_config, accumulation),
    )


# What a GPU's memory holds besides the estimate when deciding what fits (the module docstring's 1-3 GiB).
RESERVE = 2 * GiB


def largest_micro_batch(peak: Callable[[int], int], budget: int, limit: int | None = None) -> int:
    """The largest power of two B (at most ``limit``) with ``peak(B) <= budget``, or 0 if not even 1 fits. Powers
    of two because a step's batch (2^19 tokens in the recipes) must split evenly into micro-batches and ranks;
    the peak grows with B, so the first one over the budget ends the search."""
    fits = 0
    while (limit is None or 2 * fits <= limit) and peak(max(1, 2 * fits)) <= budget:
        fits = max(1, 2 * fits)
    return fits


def too_large(peak: Callable[[int], int], micro_batch: int, device_bytes: int, reserve: int = RESERVE) -> str | None:
    """The trainer's warning when the estimate for ``micro_batch`` exceeds the device less ``reserve``: what to
    change. A warning, not a refusal: the estimate is within ~10%, not exact."""
    budget, need = device_bytes - reserve, peak(micro_batch)
    if need <= budget:
        return None
    fits = largest_micro_batch(peak, budget, limit=micro_batch)
    change = (f"--train.micro_batch={fits} (the largest power of two predicted to fit; accumulation keeps the batch)"
              if fits else "--engine.activation_checkpointing=true, --engine.loss_chunk=4096, --engine.offload=true "
              "or more ranks with a sharding engine")
    return (f"warning: the estimated peak, {need / GiB:.2f} GiB, exceeds this GPU's {device_bytes / GiB:.1f} GiB "
            f"less {reserve / GiB:.0f} GiB reserved: expect an out-of-memory error; try {change}")


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


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a device running out of memory: CUDA's OutOfMemoryError, or the CPU allocator's
    RuntimeError (a request larger than the machine can give)."""
    return isinstance(error, torch.OutOfMemoryError) or (isinstance(error, RuntimeError) and "can't allocate memory" in str(error))


def peak_memory(device: torch.device) -> dict[str, int]:
    """Peak bytes so far: the CUDA caching allocator's max allocated/reserved, or on CPU the process peak RSS."""
    if device.type == "cuda":
        return {"allocated": torch.cuda.max_memory_allocated(device), "reserved": torch.cuda.max_memory_reserved(device)}
    return {"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # KiB on Linux


def host_available_bytes() -> int | None:
    """The host memory a new process may use without swapping (Linux's MemAvailable); None where it is not known."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def device_bytes(device: torch.device) -> int | None:
    """A GPU's total memory, what ``too_large`` weighs the estimate against; None for the CPU."""
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


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
            checkpointing: bool = False, offload: bool = False, loss_chunk: int = 0, accumulation: int = 1,
            ds_config: dict | None = None, compiled: bool = False) -> str:
    """The estimate with each term's formula and numbers, then the moments, for tools/estimate_memory.py."""
    est = estimate(model, engine, world, micro_batch, seq_len, bf16=bf16, checkpointing=checkpointing, offload=offload,
                   loss_chunk=loss_chunk, accumulation=accumulation, ds_config=ds_config, compiled=compiled)
    psi, L, d, V = model.num_params(), model.n_layer, model.n_embd, model.vocab_size
    mode = compute_mode(engine, bf16)
    w = 2 if bf16 and engine.startswith("zero") else 4
    formulas = list(_STATE_FORMULAS[engine])
    if offload:
        formulas = ["on host"] * 3 if engine == "fsdp" else formulas[:2] + ["on host"]
    a = BLOCK_BYTES[mode]
    act = f"B·T·d·(L·{CHECKPOINTED_BLOCK_BYTES[mode]} + {a})" if checkpointing else f"B·T·d·L·{a}"
    if loss_chunk:
        loss = (f"c·V·{CHUNK_BYTES[mode]} + V·d·4", "one chunk's logits + fp32 weight-gradient accumulator")
    else:
        forward, backward = loss_constants(mode, compiled)
        loss = (f"B·T·V·{forward} / {backward}", "in forward / at backward's start" + (", fused by compile" if compiled else ""))
    g = lambda n: f"{n / GiB:8.2f} GiB"  # noqa: E731
    s = est.states
    lines = [
        f"{model.name}: Ψ = {psi:,} parameters, L = {L}, d = {d}, V = {V}; engine {engine}, N = {world}, "
        f"B = {micro_batch}, T = {seq_len}, {mode}, w = {w}"
        + (", compiled" if compiled else "") + (", activation checkpointing" if checkpointing else "") + (", offload" if offload else "")
        + (f", {accumulation} micro-batches per step" if accumulation > 1 else "")
        + (f", fused loss in chunks of c = {min(loss_chunk, micro_batch * seq_len)} tokens" if loss_chunk else ""),
        f"  weights      {formulas[0]:<24} {g(s.params)}",
        f"  gradients    {formulas[1]:<24} {g(s.grads)}"
        + ("   live through forward" if est.held_grads else "   freed between steps"),
        f"  optimizer    {formulas[2]:<24} {g(s.optimizer)}   fp32 master + Adam m, v",
        f"  activations  {act:<24} {g(est.activations)}",
        f"  loss         {loss[0]:<24} {g(est.loss[0])} / {est.loss[1] / GiB:.2f} GiB   {loss[1]}",
    ]
    if any(est.weight_copies):
        what = {"ddp": "autocast's bf16 copies (saved unless checkpointing)", "fsdp": "FSDP2's unsharded wte, wpe",
                "zero3": "ZeRO-3's prefetched parameters"}[engine]
        lines.append(f"  copies       {'':<24} {g(est.weight_copies[0])} / {est.weight_copies[1] / GiB:.2f} GiB   {what}")
    if any(est.buckets):
        lines.append(f"  buckets      {'reduce_bucket_size·w':<24} {g(sum(est.buckets))}   DeepSpeed's gradient buckets")
    lines.append("  moments      " + ", ".join(f"{name} {v / GiB:.2f}" for name, v in est.phases.items()) + " GiB")
    lines.append(f"  peak         {'':<24} {g(est.total)}   per GPU, plus 1-3 GiB of CUDA context, DDP's buckets and fragmentation")
    return "\n".join(lines)
