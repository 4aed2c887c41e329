"""One switch for bitwise-repeatable runs where the libraries allow it (``--train.deterministic=true``).

Costs: cuBLAS uses a fixed workspace and deterministic kernels, and some ops (e.g. scatter-add
backward) fall back to slower deterministic versions or raise if they have none.

On CPU, PyTorch's own kernels give the same bits run after run for a fixed thread count, and the
training step is repeatable without the switch (tests/test_determinism.py). The exception is the BLAS
under every matmul (Intel MKL in the x86 wheels), which promises identical results across runs only in
its "conditional numerical reproducibility" mode: otherwise its kernel choice may depend on memory
alignment and on how many threads it takes. The switch turns that mode on (``MKL_CBWR=AUTO,STRICT``).
MKL reads the setting at its first call, so it takes effect only when the switch runs before the first
matmul of the process, as it does at the start of training; an ``MKL_CBWR`` already set is kept.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def make_deterministic(seed: int) -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # must be set before cuBLAS starts
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")  # must be set before MKL's first call
    torch.use_deterministic_algorithms(True, warn_only=False)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    random.seed(seed)
    np.random.seed(seed)


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed the RNGs a training step may draw from with a function of (seed, step, rank) alone.

    The model has no dropout and the data order is a function of (data.seed, epoch), so today's steps draw
    nothing; this is the rule for anything that does (dropout, stochastic rounding, noise). With it a
    checkpoint carries no RNG state, and a run resumed at step k on any number of ranks draws exactly what a
    fresh process at step k would: the same as the uninterrupted run at the same world size."""
    mixed = np.random.SeedSequence([seed, step, rank]).generate_state(2, np.uint32)
    torch.manual_seed(int(mixed[0]) << 32 | int(mixed[1]))  # every device's generator too
    random.seed(int(mixed[0]))
    np.random.seed(mixed)
