"""Timing one row: warm up, time ``step.optimizer_step`` (the trainer's step, not a copy), measure peak memory
and model states; a row that fails on any rank becomes a failed row on every rank."""

from __future__ import annotations

import gc
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from gpt2_scale import distributed, engines, memory
from gpt2_scale.bench.profile import profile_steps
from gpt2_scale.bench.rows import WALKTHROUGH, BenchResult, BenchSpec
from gpt2_scale.bench.walkthrough import walkthrough_runner
from gpt2_scale.config import Config
from gpt2_scale.device import enable_tf32
from gpt2_scale.errors import UserError
from gpt2_scale.metrics import mfu
from gpt2_scale.step import optimizer_step
from gpt2_scale.train import build_model
from gpt2_scale.zoo import ModelConfig

PROFILE_STEPS = 3  # profiled after the timed steps (--profile): enough for a steady state, small traces


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


def token_batches(cfg: Config, data: str | None, env: distributed.DistEnv, vocab_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (x, y) micro-batches for this rank: random tokens, or the train split of ``data``."""
    B, T = cfg.train.micro_batch, cfg.train.seq_len
    if data:
        from gpt2_scale.data import TokenLoader

        loader = TokenLoader(Path(data), "train", B, T, env.rank, env.world_size, seed=1337)
        while True:
            yield loader.next_batch()
    gen = torch.Generator().manual_seed(1000 + env.rank)
    while True:
        tokens = torch.randint(0, vocab_size, (B, T + 1), generator=gen)
        yield tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def run_one(spec: BenchSpec, env: distributed.DistEnv, peak_tflops: float | None, matmul_tflops: float | None) -> BenchResult:
    """Warm up, time ``spec.steps`` optimizer steps, then count model states on one more step."""
    cfg = spec.config(env.world_size)
    B, T = cfg.train.micro_batch, cfg.train.seq_len
    torch.manual_seed(cfg.train.seed)
    enable_tf32(env.device)  # as the trainer
    model_cfg = ModelConfig.from_name(cfg.model.name, pad_vocab=spec.engine == WALKTHROUGH or cfg.model.pad_vocab)
    batches = token_batches(cfg, spec.data, env, model_cfg.vocab_size)
    take = lambda: [next(batches) for _ in range(spec.accum)]  # noqa: E731
    engine = None
    try:  # the engine is closed however the row ends: a failed row must not leave its groups' references behind
        if spec.engine == WALKTHROUGH:
            step = walkthrough_runner(cfg, env)
        else:
            engine = engines.build(cfg, env)
            engine.setup(build_model(cfg).to(env.device))

            def step(micro_batches):
                loss, _ = optimizer_step(engine, micro_batches, cfg.optim.lr, env.device)
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
        state = memory.measure_state_bytes(engine, lambda: step(take())) if engine is not None else None
        estimate = engine.memory_estimate().total if engine is not None else None
        if spec.profile:
            directory = Path(spec.profile) if env.is_main else None
            profile_steps(lambda: torch.as_tensor(step(take())), PROFILE_STEPS, env.device, directory, spec.name)
        stats = torch.tensor([elapsed.item()] + [float(v) for v in peak.values()], dtype=torch.float64, device=env.device)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    finally:
        if engine is not None:
            engine.close()
        engine = step = work = None  # the walk-through's DDP model lives in ``step``
    ms = 1000 * stats[0].item() / spec.steps
    tokens_per_s = B * T * spec.accum * env.world_size / (ms / 1000)
    flops = model_cfg.flops_per_token(T)
    per_rank = tokens_per_s / env.world_size
    _release()
    return BenchResult(spec, cfg, env.world_size, device_name(env.device), ms, tokens_per_s, mfu(per_rank, flops, peak_tflops),
                       mfu(per_rank, flops, matmul_tflops), dict(zip(peak, (int(v) for v in stats[1:].tolist()))), state, estimate)


def _release() -> None:
    """Free what a row left (compiled code, CUDA graph pools, cached blocks) before the next row."""
    torch._dynamo.reset()  # else the next row reuses (or skips) this row's compiled GPT.forward
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def run_row(spec: BenchSpec, env: distributed.DistEnv, peak_tflops: float | None, matmul_tflops: float | None) -> BenchResult:
    """``run_one``, or a failed row when it raises (out of memory, a compile error, a refused combination) on any
    rank: the ranks exchange their errors, so all of them record the failure and go on to the next row together.

    A failure on every rank at the same point (the usual case: the same config, shapes and code everywhere)
    is recovered; one rank failing while the others wait in a collective cannot be, and ends at the process
    group's timeout."""
    result, error = None, None
    try:
        result = run_one(spec, env, peak_tflops, matmul_tflops)
    except UserError as e:  # a setting this row cannot run with: its line says which
        error = first_line(e)
        print(f"bench: row {spec.name!r} failed on rank {env.rank}: {e}", file=sys.stderr, flush=True)
    except Exception as e:  # noqa: BLE001 - any failure of a configuration is a row, not the end of the sweep
        error = first_line(e)
        print(f"bench: row {spec.name!r} failed on rank {env.rank}:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
    if error is not None:
        _release()  # the traceback is gone: the failed engine's tensors can be freed now
    errors = [error] * env.world_size
    if env.world_size > 1:
        dist.all_gather_object(errors, error)
    failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
    if not failed:
        return result
    rank, error = failed[0]
    return BenchResult(spec, spec.config(env.world_size), env.world_size, device_name(env.device),
                       error=error if rank == 0 else f"rank {rank}: {error}")
