"""Running rows: in this process's world (torchrun's, or one process), or each in a fresh spawned CPU world."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from gpt2_scale import distributed
from gpt2_scale.bench.rows import BenchResult, BenchSpec
from gpt2_scale.bench.timing import first_line, measure_matmul_tflops, run_row
from gpt2_scale.metrics import detect_peak_tflops


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
