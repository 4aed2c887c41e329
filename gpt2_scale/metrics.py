"""What a run reports: one stdout line per step, ``metrics.jsonl`` and TensorBoard scalars (rank 0 only).

MFU (model FLOPs utilization) = achieved training FLOP/s per GPU / the GPU's peak, where the training
FLOPs per token are 6·N + 12·n_layer·n_embd·T (N = parameters without position embeddings; the second
term is attention's score and value matmuls; PaLM paper, appendix B).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from gpt2_scale.fileio import write_atomic

METRICS = "metrics.jsonl"  # in the run directory, one JSON record per line

# Dense bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "A10G": 125.0, "L4": 121.0, "4090": 165.0}


def detect_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def mfu(tokens_per_s_per_device: float, flops_per_token: int, peak_tflops: float | None) -> float | None:
    if not peak_tflops:
        return None
    return tokens_per_s_per_device * flops_per_token / (peak_tflops * 1e12)


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    h, rem = divmod(int(seconds), 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


class MetricsLogger:
    """Appends one JSON object per record to run_dir/metrics.jsonl and mirrors numbers to TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        self.file = open(run_dir / METRICS, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, record["step"])

    def print(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()


def logged_training(run_dir: Path) -> bool:
    """Whether ``run_dir/metrics.jsonl`` shows a step trained: a training step's record (one per log.log_every steps),
    or any record past step 0 (an evaluation there follows trained steps). A line cut off by a kill is none."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return False
    for line in path.read_bytes().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and ("train_loss" in record or (type(record.get("step")) is int and record["step"] > 0)):
            return True
    return False


def attempt_name(name: str, attempt: int) -> str:
    """``metrics.jsonl`` -> ``metrics.attempt-3.jsonl``: where attempt 3's records went when they were set aside."""
    stem, dot, suffix = name.partition(".")
    return f"{stem}.attempt-{attempt}{dot}{suffix}"


def next_attempt(run_dir: Path) -> int:
    """The first attempt number not used yet by a set-aside file in ``run_dir``."""
    used = [p.name.split(".")[1].removeprefix("attempt-") for p in Path(run_dir).glob("*.attempt-*.*")]
    return 1 + max((int(n) for n in used if n.isdigit()), default=0)


def split_records(lines: list[bytes], from_step: int) -> tuple[list[bytes], list[bytes]]:
    """(kept, lost): the lines of records of steps before ``from_step``, and every other line: records of steps
    ``from_step`` and later, and lines that are no record (a write cut off by a kill), each ending in a newline."""
    kept, lost = [], []
    for line in lines:
        try:
            record = json.loads(line)
            step = record["step"] if isinstance(record, dict) else None
        except (ValueError, KeyError):
            step = None
        good = isinstance(step, int) and not isinstance(step, bool) and step < from_step and line.endswith(b"\n")
        (kept if good else lost).append(line if line.endswith(b"\n") else line + b"\n")
    return kept, lost


def set_aside(run_dir: Path, from_step: int, attempt: int) -> int:
    """Move the records of steps ``from_step`` and later out of ``run_dir/metrics.jsonl`` into
    ``metrics.attempt-{attempt}.jsonl``, before a run that starts at ``from_step`` appends; the number moved.

    A job restarted from the checkpoint of step s (``--checkpoint.auto_resume``, ``--resume`` after a kill) trains
    steps s, s+1, ... again, and what an earlier attempt logged for them (it died before its next checkpoint)
    describes training that was lost. Moving those records aside, rather than appending and asking every reader
    to keep the last record per step, keeps ``metrics.jsonl`` one history in step order, so every reader is right
    without knowing about restarts (tests/launch.metrics, baselines, a user's pandas or jq), and the side file
    keeps what was lost. The side file is written before metrics.jsonl is replaced, both atomically: a kill in
    between leaves the records in both places, never in neither. TensorBoard's events are left as they are."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return 0
    kept, lost = split_records(path.read_bytes().splitlines(keepends=True), from_step)
    if lost:
        write_atomic(path.with_name(attempt_name(METRICS, attempt)), b"".join(lost))
        write_atomic(path, b"".join(kept))
    return len(lost)


def step_line(r: dict, max_steps: int, eta_s: float) -> str:
    parts = [f"step {r['step']:>6}/{max_steps}", f"loss {r['train_loss']:.4f}", f"lr {r['lr']:.2e}", f"norm {r['grad_norm']:.3f}"]
    parts += [f"{r['ms_per_step']:.0f} ms", f"{r['tokens_per_s']:,.0f} tok/s"]
    if r.get("mfu") is not None:
        parts.append(f"mfu {100 * r['mfu']:.1f}%")
    parts.append(f"eta {format_eta(eta_s)}")
    return " | ".join(parts)
