"""A persistent world of CPU worker processes that run equivalence cases sent to them.

Starting processes, importing torch and DeepSpeed and joining a gloo group costs seconds; a case on
a tiny model costs far less. So a pool joins its group once and then loops on a queue of cases,
which lets property tests draw dozens of examples. A failed case takes the pool down (the other
ranks may be stuck in a collective); the next ``run`` starts a fresh one.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gpt2_scale.harness.case import Case
from gpt2_scale.harness.run import Result, run_engine


class WorkerError(RuntimeError):
    """A case failed on a worker (the message holds the worker's traceback), or a worker died or hung."""


class WorkerPool:
    def __init__(self, world_size: int, timeout_s: float = 600.0) -> None:
        self.world_size, self.timeout_s = world_size, timeout_s
        self._procs: list[mp.Process] = []

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        ctx = mp.get_context("spawn")
        self._dir = Path(tempfile.mkdtemp(prefix=f"gpt2-scale-pool{self.world_size}-"))
        self._inboxes = [ctx.Queue() for _ in range(self.world_size)]
        self._outbox = ctx.Queue()
        self._procs = [
            ctx.Process(target=_worker, args=(rank, self.world_size, str(self._dir), self._inboxes[rank], self._outbox), daemon=True)
            for rank in range(self.world_size)
        ]
        for p in self._procs:
            p.start()

    def run(self, case: Case) -> Result:
        """Run one case on every rank; rank 0's Result."""
        if case.world_size != self.world_size:
            raise ValueError(f"case.world_size={case.world_size} but this pool has {self.world_size} ranks")
        if not self._procs:
            self.start()
        for inbox in self._inboxes:
            inbox.put(case)
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                status, payload = self._outbox.get(timeout=1.0)
                break
            except queue.Empty:
                dead = [f"rank {r} (exit code {p.exitcode})" for r, p in enumerate(self._procs) if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    self.close()
                    raise WorkerError(f"{', '.join(dead)} died" if dead else f"no result within {self.timeout_s:.0f}s") from None
        if status != "ok":
            self.close()
            raise WorkerError(payload)
        return payload

    def close(self) -> None:
        """Stop the workers: politely, then by terminating the ones that do not leave (stuck in a collective)."""
        for inbox, p in zip(self._inboxes if self._procs else [], self._procs):
            if p.is_alive():
                inbox.put(None)
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join()
        if self._procs:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._procs = []


def _worker(rank: int, world_size: int, root: str, inbox, outbox) -> None:
    torch.set_num_threads(1)  # one core per rank; more only oversubscribes a CI machine
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    from gpt2_scale import distributed

    # A file store: no port to agree on.
    dist.init_process_group("gloo", init_method=f"file://{root}/group", rank=rank, world_size=world_size)
    env = distributed.init("cpu")
    while (case := inbox.get()) is not None:
        try:
            result = run_engine(case, env, Path(root) / "case")
        except BaseException:
            outbox.put(("error", f"rank {rank}: {case}\n{traceback.format_exc()}"))
            return
        if result is not None:
            outbox.put(("ok", result))
    distributed.shutdown()
