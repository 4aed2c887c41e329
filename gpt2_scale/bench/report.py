"""The results as a Markdown table (with ours/walk-through ratios) and as JSON (with the device and versions)."""

from __future__ import annotations

import dataclasses

import torch

from gpt2_scale.bench.rows import WALKTHROUGH, BenchResult

COLUMNS = ("row", "world", "B", "T", "accum", "ms/step", "tok/s/rank", "tok/s", "MFU", "MFU vs matmul",
           "peak mem", "estimate", "weights", "grads", "optimizer", "states")


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
    estimate = mib(r.estimate)
    if r.estimate and "allocated" in r.peak:  # CUDA's allocated bytes are what the estimator predicts (not CPU's RSS)
        estimate += f" (peak/estimate {r.peak['allocated'] / r.estimate:.2f})"
    st = r.state
    states = [mib(st.params), mib(st.grads), mib(st.optimizer), mib(st.total)] if st else ["-"] * 4
    return head + [f"{r.ms_per_step:,.1f}", f"{r.tokens_per_s_per_rank:,.0f}", f"{r.tokens_per_s:,.0f}", pct(r.mfu),
                   pct(r.mfu_matmul), peak, estimate] + states


def table(results: list[BenchResult]) -> str:
    """A Markdown table, one row per configuration, the settings every row shares, and ours/walk-through ratios when
    the walk-through's loop was timed."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(row(r)) + " |" for r in results]
    if results and results[0].spec.overrides:
        lines.append("\nevery row: " + ", ".join(f"{k}={v}" for k, v in results[0].spec.overrides))
    walk = next((r for r in results if r.spec.engine == WALKTHROUGH and r.error is None), None)
    if walk is not None:
        ratios = [f"{r.spec.name} {r.tokens_per_s / walk.tokens_per_s:.2f}x" for r in results if r is not walk and r.error is None]
        lines.append("\nours/walk-through tokens/s: " + ", ".join(ratios))
    return "\n".join(lines)


def to_json(results: list[BenchResult], command: list[str] | None = None, planned: int | None = None) -> dict:
    """Every row, machine-readable: what ran (engine, overrides, the full config) and what was measured; with
    ``planned``, how many rows the sweep has and whether all are in (a sweep cut short leaves a partial file)."""
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
        "estimate_bytes": r.estimate, "error": r.error, "config": r.cfg.to_dict(),
    } for r in results]
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": results[0].device if results else None,
        "torch": torch.__version__, "cuda": torch.version.cuda, "deepspeed": ds_version,
        "command": command, "every_row": dict(results[0].spec.overrides) if results else {},
        "rows_planned": planned, "complete": None if planned is None else len(results) == planned, "rows": rows,
    }
