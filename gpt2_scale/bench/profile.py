"""Where a row's step time goes: torch.profiler over a few more optimizer steps after the timed ones.

Each profiled row writes ``<dir>/<row>.txt``: the time per step by kind of work (matmuls, attention, compiled
fusions, communication, copies, the optimizer), then the ops or kernels that took the most. It also writes
``<dir>/<row>.trace.json.gz``, a trace for chrome://tracing or Perfetto. On CUDA the time is the GPU kernels' time,
and the idle share is the wall time the GPU did no work. On CPU the time is the ops' own CPU time on all threads.
The profiled steps are not the timed ones: the profiler slows the host.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity

# What a kernel or op is, by its name (lowercased), first match wins: cuBLAS/CUTLASS GEMMs and aten matmuls;
# FlashAttention / SDPA; Inductor's Triton kernels; NCCL or gloo collectives; copies; fused/foreach Adam.
KINDS = (
    ("communication", ("nccl", "gloo", "c10d::", "all_reduce", "allreduce", "reduce_scatter", "all_gather", "broadcast")),
    ("attention", ("flash", "fmha", "scaled_dot_product", "efficient_attention", "cudnn_attn")),
    ("matmul", ("gemm", "cutlass", "nvjet", "xmma", "aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("compiled", ("triton",)),
    ("copy", ("memcpy", "memset", "aten::copy_", "aten::_to_copy", "aten::cat", "aten::fill_", "aten::zero_")),
)


def kind(name: str) -> str:
    lowered = name.lower()
    return next((k for k, needles in KINDS if any(n in lowered for n in needles)), "other")


def file_name(row: str) -> str:
    """A row's name as a file name: ``ddp compile_mode=reduce-overhead`` -> ``ddp_compile_mode-reduce-overhead``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", row.replace(" ", "_")).strip("-") or "row"


def summary(events, on_device: bool, steps: int, wall_ms: float, top: int = 30) -> str:
    """Per kind, then the ``top`` ops or kernels by their own time, all per step (``events``: key_averages())."""
    if on_device:  # kernels only: a CPU op's device time is its kernels', which are events of their own
        # and not the ranges a module or a user names on the GPU's timeline (DDP's forward, 43 of its 146 ms on an
        # H100), which span kernels already counted
        timed = [(e.key, e.self_device_time_total, e.count) for e in events
                 if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    else:
        timed = [(e.key, e.self_cpu_time_total, e.count) for e in events]
    timed.sort(key=lambda t: -t[1])
    total_us = sum(us for _, us, _ in timed)
    by_kind: dict[str, float] = {}
    for name, us, _ in timed:
        by_kind[kind(name)] = by_kind.get(kind(name), 0.0) + us
    what = "GPU kernel time" if on_device else "CPU time (all threads)"
    lines = [f"{steps} profiled steps, {wall_ms / steps:,.1f} ms wall per step; {what} per step: {total_us / 1000 / steps:,.1f} ms",
             "", f"{'kind':<14} {'ms/step':>9} {'share':>7}"]
    for name, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        lines.append(f"{name:<14} {us / 1000 / steps:>9,.2f} {100 * us / max(total_us, 1e-9):>6.1f}%")
    if on_device:
        idle_ms = max(wall_ms - total_us / 1000, 0.0)
        lines.append(f"{'(GPU idle)':<14} {idle_ms / steps:>9,.2f} {100 * idle_ms / max(wall_ms, 1e-9):>6.1f}% of wall")
    lines += ["", f"top {top} by own time, per step:", f"{'ms/step':>9} {'calls':>7}  {'kind':<13} name"]
    lines += [f"{us / 1000 / steps:>9,.3f} {count / steps:>7,.0f}  {kind(name):<13} {name[:120]}" for name, us, count in timed[:top]]
    return "\n".join(lines) + "\n"


def profile_steps(step: Callable[[], object], steps: int, device: torch.device, directory: Path | None, row: str) -> None:
    """Run ``step`` ``steps`` times under the profiler and write the summary and the trace into ``directory``
    (every rank steps, for the collectives; only the one given a directory writes)."""
    on_device = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if on_device:
            torch.cuda.synchronize(device)
        wall_ms = 1000 * (time.perf_counter() - t0)
    if directory is None:
        return
    directory.mkdir(parents=True, exist_ok=True)
    name = file_name(row)
    (directory / f"{name}.txt").write_text(f"profile of row {row!r}\n" + summary(prof.key_averages(), on_device, steps, wall_ms))
    prof.export_chrome_trace(str(directory / f"{name}.trace.json.gz"))
