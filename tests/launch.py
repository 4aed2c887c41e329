"""Run recipes the way users do (torchrun, the deepspeed launcher, plain python) from tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from gpt2_scale.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
# A tiny model and batch that any engine trains in seconds on CPU.
TINY = ["--model", "gpt2-tiny", "--micro-batch", "2", "--seq-len", "32", "--log.sample_every=0",
        "--log.tensorboard=false", "--log.log_every=1", "--log.hellaswag_every=0", "--log.val_tokens=128"]


def env() -> dict:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # keep the caller's (carried wheels)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def command(script: str, args: list[str], nproc: int = 1, launcher: str = "torchrun", max_restarts: int = 0) -> list[str]:
    """The command line that runs ``script``; under torchrun, ``max_restarts`` is its --max-restarts (a failed worker
    makes it restart every worker with the same arguments, up to that many times)."""
    path = str(REPO / script)
    if launcher == "python":
        return [sys.executable, path, *args]
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port", str(free_port()), path, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--max-restarts", str(max_restarts),
            "--master_port", str(free_port()), path, *args]


def run(script: str, args: list[str], nproc: int = 1, launcher: str = "torchrun", timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command(script, args, nproc, launcher), env=env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def run_module(module: str, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m module args`` as a user runs it."""
    return subprocess.run([sys.executable, "-m", module, *args], env=env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> str:
    """A launched run's stdout, once it exited 0 (else its output's tail, to see why)."""
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def metrics(run_dir: Path, key: str = "train_loss") -> list[float]:
    """``key`` of every record in metrics.jsonl, in order. A resumed run has already moved what a lost attempt logged
    past its checkpoint to a side file (metrics.set_aside), so this is one value per step, as an uninterrupted run's."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def spawned_world(worker, nprocs: int, tmp: Path):
    """Run ``worker(rank, port, tmp)`` on ``nprocs`` spawned ranks (a process group and DeepSpeed's global state
    stay out of pytest's process); rank 0 saves its results to tmp/results.pt, which is returned.

    A file, not a queue: a pipe blocks on large payloads while the parent waits in join."""
    import torch
    import torch.multiprocessing as mp

    mp.start_processes(worker, args=(free_port(), str(tmp)), nprocs=nprocs, start_method="spawn")
    return torch.load(Path(tmp) / "results.pt", weights_only=False)
