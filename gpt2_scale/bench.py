"""Training-step benchmark: times ``step.optimizer_step`` (the step the trainer runs, not a copy) per row, a row
being an engine and config overrides (``BenchSpec``; ``sweep`` varies one key at a time from a base row).

Each row reports ms/step, tokens/s, MFU against a datasheet peak and, on CUDA, against a bf16
8192³ matmul measured in the same run, peak memory, and the model-state bytes a rank holds
(``Strategy.state_bytes``). The seed baseline (``seed_step``) is the walk-through's plain loop, timed
side by side so ours/seed is a measured ratio.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gpt2_scale import distributed, memory, strategies
from gpt2_scale.config import Config, ConfigError, set_value, validate
from gpt2_scale.device import enable_tf32, resolve
from gpt2_scale.metrics import detect_peak_tflops, mfu
from gpt2_scale.model import GPT
from gpt2_scale.step import optimizer_step
from gpt2_scale.train import build_model
from gpt2_scale.zoo import ModelConfig

SEED = "seed"  # the pseudo-engine of --compare-seed


# Config keys the bench owns: a row's engine, total batch and device come from its own flags.
BENCH_OWNED = {"engine.name": "--engines", "train.total_batch_tokens": "--accum", "engine.device": "--device",
               "data.dir": "--data"}


def override(cfg: Config, key: str, value: str) -> None:
    """``config.set_value``, which refuses unknown keys and values of the wrong type, minus the bench's own keys."""
    if key in BENCH_OWNED:
        raise ConfigError(f"{key} is set by the bench; use {BENCH_OWNED[key]}")
    set_value(cfg, key, value)


@dataclass(frozen=True)
class BenchSpec:
    """One row of the table: an engine and the config overrides it runs with.

    The Config is the one source of truth for the model, micro-batch, sequence length, dtype, compile ... :
    ``overrides`` (every row's settings) then ``varied`` (what this row changes from the base row) are applied
    to ``Config()`` with ``config.set_value``; the total batch follows from them and ``accum``."""

    engine: str  # an engine name, or SEED
    overrides: tuple[tuple[str, str], ...] = ()  # (dotted config key, value as text)
    varied: tuple[tuple[str, str], ...] = ()
    accum: int = 1
    warmup: int = 2
    steps: int = 5
    data: str | None = None  # a shard directory (tools/prepare_data.py); None = random tokens

    @property
    def name(self) -> str:
        """The engine and what differs from its base row: ``ddp compile_mode=reduce-overhead``."""
        return " ".join([self.engine] + [f"{key.partition('.')[2]}={value}" for key, value in self.varied])

    def config(self, world: int) -> Config:
        cfg = Config()
        for key, value in self.overrides + self.varied:
            override(cfg, key, value)
        cfg.engine.name = "ddp" if self.engine == SEED else self.engine
        cfg.train.total_batch_tokens = cfg.train.micro_batch * cfg.train.seq_len * world * self.accum
        validate(cfg)
        block = ModelConfig.from_name(cfg.model.name).block_size
        if cfg.train.seq_len > block:
            raise ConfigError(f"sequence length {cfg.train.seq_len} exceeds {cfg.model.name}'s context length {block}")
        return cfg


def sweep(base: BenchSpec, engines: list[str], vary: list[tuple[str, list[str]]], compare_seed: bool = False) -> list[BenchSpec]:
    """Per engine its base row, then one row per value of each ``vary`` key with only that key changed (one
    lever at a time, not every combination); the seed loop last, with the base settings."""
    specs = []
    for engine in engines:
        specs.append(dataclasses.replace(base, engine=engine))
        specs += [dataclasses.replace(base, engine=engine, varied=((key, value),)) for key, values in vary for value in values]
    return specs + ([dataclasses.replace(base, engine=SEED)] if compare_seed else [])


@dataclass(frozen=True)
class BenchResult:
    """A timed row, or one whose configuration failed (``error``: its first line; the numbers are None)."""

    spec: BenchSpec
    cfg: Config  # what it ran with
    world: int
    device: str  # the GPU's name, or "cpu"
    ms_per_step: float | None = None  # slowest rank, mean over the timed steps
    tokens_per_s: float | None = None  # all ranks
    mfu: float | None = None  # against the datasheet (or --peak-tflops) peak
    mfu_matmul: float | None = None  # against the measured matmul rate
    peak: dict[str, int] = dataclasses.field(default_factory=dict)  # allocated/reserved (CUDA) or rss (CPU), max over ranks
    state: memory.StateBytes | None = None  # rank 0's model states; None for the seed loop
    error: str | None = None

    @property
    def tokens_per_s_per_rank(self) -> float | None:
        return None if self.tokens_per_s is None else self.tokens_per_s / self.world


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
        from pathlib import Path

        from gpt2_scale.data import TokenLoader

        loader = TokenLoader(Path(data), "train", B, T, env.rank, env.world_size, seed=1337)
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


def _seed_runner(cfg: Config, env: distributed.DistEnv) -> Callable[[list], object]:
    """The seed's model: vocab 50304, whole-model torch.compile, DDP, its AdamW (decay on 2-D weights, fused on CUDA)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gpt2_scale.optim import param_groups

    torch.set_float32_matmul_precision("high")  # the walk-through's own TF32 line, kept as it wrote it (run_one set ours)
    model = GPT(ModelConfig.from_name(cfg.model.name, pad_vocab=True)).to(env.device)
    if resolve("train", env.device, cfg.engine).compile is not None:  # compile on, as ours: the seed always compiles the whole model
        model = torch.compile(model)
    model = DDP(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=6e-4, betas=(0.9, 0.95), eps=1e-8,
                                  fused=env.device.type == "cuda" or None)
    return lambda batches: seed_step(model, optimizer, batches, 6e-4, env.device)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def run_one(spec: BenchSpec, env: distributed.DistEnv, peak_tflops: float | None, matmul_tflops: float | None) -> BenchResult:
    """Warm up, time ``spec.steps`` optimizer steps, then count model states on one more step."""
    cfg = spec.config(env.world_size)
    B, T = cfg.train.micro_batch, cfg.train.seq_len
    torch.manual_seed(cfg.train.seed)
    enable_tf32(env.device)  # as the trainer
    model_cfg = ModelConfig.from_name(cfg.model.name, pad_vocab=spec.engine == SEED or cfg.model.pad_vocab)
    batches = token_batches(cfg, spec.data, env, model_cfg.vocab_size)
    take = lambda: [next(batches) for _ in range(spec.accum)]  # noqa: E731
    strategy = None
    try:  # the engine is closed however the row ends: a failed row must not leave its groups' references behind
        if spec.engine == SEED:
            step = _seed_runner(cfg, env)
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
    finally:
        if strategy is not None:
            strategy.close()
        strategy = step = work = None  # the seed loop's DDP model lives in ``step``
    ms = 1000 * stats[0].item() / spec.steps
    tokens_per_s = B * T * spec.accum * env.world_size / (ms / 1000)
    flops = model_cfg.flops_per_token(T)
    per_rank = tokens_per_s / env.world_size
    _release()
    return BenchResult(spec, cfg, env.world_size, device_name(env.device), ms, tokens_per_s, mfu(per_rank, flops, peak_tflops),
                       mfu(per_rank, flops, matmul_tflops), dict(zip(peak, (int(v) for v in stats[1:].tolist()))), state)


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


def run_all(specs: list[BenchSpec], device: str = "auto", peak_tflops: float | None = None,
            on_result: Callable[[BenchResult], None] | None = None) -> list[BenchResult]:
    """Every spec in this process's world (torchrun's, or a one-process group); results on every rank.
    ``on_result`` is called on rank 0 after each row (progress, a JSON file kept up to date)."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    env = distributed.init(device)
    try:
        peak = peak_tflops or detect_peak_tflops(env.device)
        matmul = measure_matmul_tflops(env.device)
        results = []
        for spec in specs:
            results.append(run_row(spec, env, peak, matmul))
            if on_result is not None and env.is_main:
                on_result(results[-1])
        return results
    finally:
        distributed.shutdown()


def _spawned(rank: int, world: int, port: int, specs: list[BenchSpec], peak_tflops: float | None, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    results = run_all(specs, "cpu", peak_tflops)
    if rank == 0:
        queue.put(results)


def spawn_cpu(specs: list[BenchSpec], world: int, peak_tflops: float | None = None,
              on_result: Callable[[BenchResult], None] | None = None) -> list[BenchResult]:
    """Each spec in a fresh CPU world of ``world`` processes, so each row's peak RSS is its own. A world that
    dies (a crashed rank) is recorded as a failed row and the next spec still runs."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = []
    for spec in specs:
        queue = ctx.SimpleQueue()
        try:
            mp.start_processes(_spawned, args=(world, distributed.free_port(), [spec], peak_tflops, queue), nprocs=world,
                               start_method="spawn")
            results += queue.get()
        except Exception as e:  # noqa: BLE001
            results.append(BenchResult(spec, spec.config(world), world, "cpu", error=first_line(e)))
        if on_result is not None:
            on_result(results[-1])
    return results


COLUMNS = ("row", "world", "B", "T", "accum", "ms/step", "tok/s/rank", "tok/s", "MFU", "MFU vs matmul",
           "peak mem", "weights", "grads", "optimizer", "states")


def row(r: BenchResult) -> list[str]:
    def mib(n: int | None) -> str:
        return "-" if n is None else f"{n / 2**20:,.1f} MiB"

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    s = r.spec
    head = [s.name, str(r.world), str(r.cfg.train.micro_batch), str(r.cfg.train.seq_len), str(s.accum)]
    if r.error is not None:
        return head + ["failed: " + r.error.replace("|", "\\|")] + [""] * (len(COLUMNS) - len(head) - 1)
    peak = " / ".join(f"{k} {mib(v)}" for k, v in r.peak.items())
    st = r.state
    states = [mib(st.params), mib(st.grads), mib(st.optimizer), mib(st.total)] if st else ["-"] * 4
    return head + [f"{r.ms_per_step:,.1f}", f"{r.tokens_per_s_per_rank:,.0f}", f"{r.tokens_per_s:,.0f}", pct(r.mfu),
                   pct(r.mfu_matmul), peak] + states


def table(results: list[BenchResult]) -> str:
    """A Markdown table, one row per configuration, the settings every row shares, and ours/seed ratios when
    the seed was timed."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(row(r)) + " |" for r in results]
    if results and results[0].spec.overrides:
        lines.append("\nevery row: " + ", ".join(f"{k}={v}" for k, v in results[0].spec.overrides))
    seed = next((r for r in results if r.spec.engine == SEED and r.error is None), None)
    if seed is not None:
        ratios = [f"{r.spec.name} {r.tokens_per_s / seed.tokens_per_s:.2f}x" for r in results if r is not seed and r.error is None]
        lines.append("\nours/seed tokens/s: " + ", ".join(ratios))
    return "\n".join(lines)


def to_json(results: list[BenchResult], command: list[str] | None = None) -> dict:
    """Every row, machine-readable: what ran (engine, overrides, the full config) and what was measured."""
    import datetime
    from importlib import metadata

    try:
        ds_version = metadata.version("deepspeed")
    except metadata.PackageNotFoundError:
        ds_version = None
    rows = [{
        "name": r.spec.name, "engine": r.spec.engine, "varied": dict(r.spec.varied), "world": r.world,
        "micro_batch": r.cfg.train.micro_batch, "seq_len": r.cfg.train.seq_len, "accum": r.spec.accum,
        "warmup": r.spec.warmup, "steps": r.spec.steps, "ms_per_step": r.ms_per_step, "tokens_per_s": r.tokens_per_s,
        "tokens_per_s_per_rank": r.tokens_per_s_per_rank, "mfu": r.mfu, "mfu_vs_matmul": r.mfu_matmul, "peak_bytes": r.peak,
        "state_bytes": None if r.state is None else {**dataclasses.asdict(r.state), "total": r.state.total},
        "error": r.error, "config": r.cfg.to_dict(),
    } for r in results]
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": results[0].device if results else None,
        "torch": torch.__version__, "cuda": torch.version.cuda, "deepspeed": ds_version,
        "command": command, "every_row": dict(results[0].spec.overrides) if results else {}, "rows": rows,
    }
