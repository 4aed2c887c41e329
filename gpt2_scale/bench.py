"""Training-step benchmark: times ``train.optimizer_step`` (the step the trainer runs, not a copy) per engine.

Each configuration reports ms/step, tokens/s, MFU against a datasheet peak and, on CUDA, against a bf16
8192³ matmul measured in the same run, peak memory, and the model-state bytes a rank holds
(``Strategy.state_bytes``). The seed baseline (``seed_step``) is the walk-through's plain loop, timed
side by side so ours/seed is a measured ratio.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gpt2_scale import distributed, memory, strategies
from gpt2_scale.config import Config, ConfigError, EngineSection, ModelSection, TrainSection, validate
from gpt2_scale.metrics import detect_peak_tflops, mfu
from gpt2_scale.model import GPT
from gpt2_scale.train import build_model, optimizer_step
from gpt2_scale.zoo import ModelConfig

SEED = "seed"  # the pseudo-engine of --compare-seed


@dataclass(frozen=True)
class BenchSpec:
    """One row of the table: what to run."""

    model: str
    engine: str  # an engine name, or SEED
    micro_batch: int
    seq_len: int
    accum: int = 1
    dtype: str = "auto"
    compile: bool | None = None  # None: on CUDA only, as the trainer
    activation_checkpointing: bool = False
    offload: bool = False
    warmup: int = 2
    steps: int = 5
    data: str | None = None  # a shard directory (tools/prepare_data.py); None = random tokens
    loss_chunk: int = 0  # engine.loss_chunk: tokens per chunk of the fused lm_head + cross-entropy; 0 = full logits

    def config(self, world: int) -> Config:
        cfg = Config(
            model=ModelSection(name=self.model),
            train=TrainSection(micro_batch=self.micro_batch, seq_len=self.seq_len,
                               total_batch_tokens=self.micro_batch * self.seq_len * world * self.accum),
            engine=EngineSection(name="ddp" if self.engine == SEED else self.engine, dtype=self.dtype, compile=self.compile,
                                 activation_checkpointing=self.activation_checkpointing, offload=self.offload,
                                 loss_chunk=self.loss_chunk),
        )
        validate(cfg)
        block = ModelConfig.from_name(self.model).block_size
        if self.seq_len > block:
            raise ConfigError(f"sequence length {self.seq_len} exceeds {self.model}'s context length {block}")
        return cfg


@dataclass(frozen=True)
class BenchResult:
    spec: BenchSpec
    world: int
    device: str
    ms_per_step: float  # slowest rank, mean over the timed steps
    tokens_per_s: float  # all ranks
    mfu: float | None  # against the datasheet (or --peak-tflops) peak
    mfu_matmul: float | None  # against the measured matmul rate
    peak: dict[str, int]  # allocated/reserved (CUDA) or rss (CPU), max over ranks
    state: memory.StateBytes | None  # rank 0's model states; None for the seed loop

    @property
    def tokens_per_s_per_rank(self) -> float:
        return self.tokens_per_s / self.world


def measure_matmul_tflops(device: torch.device, n: int = 8192, iters: int = 20) -> float | None:
    """Achieved bf16 TFLOP/s of an n x n x n matmul: a same-run ceiling for MFU (CUDA only)."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize(device)
    return 2 * n**3 * iters / (start.elapsed_time(end) / 1000) / 1e12


def token_batches(spec: BenchSpec, env: distributed.DistEnv, vocab_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (x, y) micro-batches for this rank: random tokens, or the train split of ``spec.data``."""
    B, T = spec.micro_batch, spec.seq_len
    if spec.data:
        from pathlib import Path

        from gpt2_scale.data import TokenLoader

        loader = TokenLoader(Path(spec.data), "train", B, T, env.rank, env.world_size, seed=1337)
        while True:
            yield loader.next_batch()
    gen = torch.Generator().manual_seed(1000 + env.rank)
    while True:
        tokens = torch.randint(0, vocab_size, (B, T + 1), generator=gen)
        yield tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def seed_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches, lr: float, device: torch.device) -> float:
    """One step of the seed walk-through's loop (build-nanogpt): bf16 autocast, loss / accumulation, DDP sync
    on the last micro-step, all-reduced loss, clip 1.0, fused AdamW, and the loss's ``.item()`` every step."""
    batches = list(batches)
    optimizer.zero_grad()
    loss_accum = torch.zeros((), device=device)
    for i, (x, y) in enumerate(batches):
        x, y = x.to(device), y.to(device)
        model.require_backward_grad_sync = i == len(batches) - 1
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            _, loss = model(x, y)
        loss = loss / len(batches)
        loss_accum += loss.detach()
        loss.backward()
    dist.all_reduce(loss_accum)  # the seed's ReduceOp.AVG, which gloo lacks
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return loss_accum.item() / dist.get_world_size()


def _seed_runner(spec: BenchSpec, env: distributed.DistEnv, compile_: bool) -> Callable[[list], object]:
    """The seed's model: vocab 50304, whole-model torch.compile, DDP, its AdamW (decay on 2-D weights, fused on CUDA)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gpt2_scale.optim import param_groups

    torch.set_float32_matmul_precision("high")  # TF32
    model = GPT(ModelConfig.from_name(spec.model, pad_vocab=True)).to(env.device)
    if compile_:
        model = torch.compile(model)
    model = DDP(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=6e-4, betas=(0.9, 0.95), eps=1e-8,
                                  fused=env.device.type == "cuda" or None)
    return lambda batches: seed_step(model, optimizer, batches, 6e-4, env.device)


def run_one(spec: BenchSpec, env: distributed.DistEnv, peak_tflops: float | None, matmul_tflops: float | None) -> BenchResult:
    """Warm up, time ``spec.steps`` optimizer steps, then count model states on one more step."""
    cfg = spec.config(env.world_size)
    torch.manual_seed(cfg.train.seed)
    if env.device.type == "cuda":  # as the trainer
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model_cfg = ModelConfig.from_name(spec.model, pad_vocab=spec.engine != SEED and cfg.model.pad_vocab)
    batches = token_batches(spec, env, model_cfg.vocab_size)
    take = lambda: [next(batches) for _ in range(spec.accum)]  # noqa: E731
    strategy = None
    if spec.engine == SEED:
        compile_ = spec.compile if spec.compile is not None else env.device.type == "cuda"
        step = _seed_runner(spec, env, compile_)
    else:
        strategy = strategies.build(cfg, env)
        strategy.setup(build_model(cfg).to(env.device))

        def step(micro_batches):
            loss, _ = optimizer_step(strategy, micro_batches, cfg.optim.lr, env.device)
            return loss

    for _ in range(spec.warmup):
        torch.as_tensor(step(take())).item()
    memory.reset_peak_memory(env.device)
    work = [take() for _ in range(spec.steps)]  # data loading stays outside the timed region
    distributed.barrier()
    t0 = time.perf_counter()
    for micro_batches in work:
        loss = step(micro_batches)
    torch.as_tensor(loss).item()  # waits for the device
    elapsed = torch.tensor(time.perf_counter() - t0, dtype=torch.float64)
    peak = memory.peak_memory(env.device)
    state = memory.measure_state_bytes(strategy, lambda: step(take())) if strategy is not None else None
    stats = torch.tensor([elapsed.item()] + [float(v) for v in peak.values()], dtype=torch.float64, device=env.device)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    ms = 1000 * stats[0].item() / spec.steps
    tokens_per_s = spec.micro_batch * spec.seq_len * spec.accum * env.world_size / (ms / 1000)
    flops = model_cfg.flops_per_token(spec.seq_len)
    per_rank = tokens_per_s / env.world_size
    del strategy, step
    gc.collect()
    if env.device.type == "cuda":
        torch.cuda.empty_cache()
    return BenchResult(spec, env.world_size, env.device.type, ms, tokens_per_s, mfu(per_rank, flops, peak_tflops),
                       mfu(per_rank, flops, matmul_tflops), dict(zip(peak, (int(v) for v in stats[1:].tolist()))), state)


def run_all(specs: list[BenchSpec], device: str = "auto", peak_tflops: float | None = None) -> list[BenchResult]:
    """Every spec in this process's world (torchrun's, or a one-process group); results on every rank."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    env = distributed.init(device)
    try:
        peak = peak_tflops or detect_peak_tflops(env.device)
        matmul = measure_matmul_tflops(env.device)
        return [run_one(spec, env, peak, matmul) for spec in specs]
    finally:
        distributed.shutdown()


def _spawned(rank: int, world: int, port: int, specs: list[BenchSpec], peak_tflops: float | None, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    results = run_all(specs, "cpu", peak_tflops)
    if rank == 0:
        queue.put(results)


def spawn_cpu(specs: list[BenchSpec], world: int, peak_tflops: float | None = None) -> list[BenchResult]:
    """Each spec in a fresh CPU world of ``world`` processes, so each row's peak RSS is its own."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = []
    for spec in specs:
        queue = ctx.SimpleQueue()
        mp.start_processes(_spawned, args=(world, distributed.free_port(), [spec], peak_tflops, queue), nprocs=world,
                           start_method="spawn")
        results += queue.get()
    return results


COLUMNS = ("engine", "world", "B", "T", "accum", "ms/step", "tok/s/rank", "tok/s", "MFU", "MFU vs matmul",
           "peak mem", "weights", "grads", "optimizer", "states")


def row(r: BenchResult) -> list[str]:
    def mib(n: int | None) -> str:
        return "-" if n is None else f"{n / 2**20:,.1f} MiB"

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    s = r.spec
    name = (s.engine + (" +ckpt" if s.activation_checkpointing else "") + (" +offload" if s.offload else "")
            + (f" +loss_chunk={s.loss_chunk}" if s.loss_chunk else ""))
    peak = " / ".join(f"{k} {mib(v)}" for k, v in r.peak.items())
    st = r.state
    states = [mib(st.params), mib(st.grads), mib(st.optimizer), mib(st.total)] if st else ["-"] * 4
    return [name, str(r.world), str(s.micro_batch), str(s.seq_len), str(s.accum), f"{r.ms_per_step:,.1f}",
            f"{r.tokens_per_s_per_rank:,.0f}", f"{r.tokens_per_s:,.0f}", pct(r.mfu), pct(r.mfu_matmul), peak] + states


def table(results: list[BenchResult]) -> str:
    """A Markdown table, one row per configuration, plus ours/seed ratios when the seed was timed."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(row(r)) + " |" for r in results]
    seed = next((r for r in results if r.spec.engine == SEED), None)
    if seed is not None:
        ratios = [f"{r.spec.engine} {r.tokens_per_s / seed.tokens_per_s:.2f}x" for r in results if r is not seed]
        lines.append("\nours/seed tokens/s: " + ", ".join(ratios))
    return "\n".join(lines)


def with_engine(spec: BenchSpec, engine: str) -> BenchSpec:
    """The spec under another engine; the seed loop always takes the walk-through's full-logits loss."""
    return dataclasses.replace(spec, engine=engine, loss_chunk=0 if engine == SEED else spec.loss_chunk)
