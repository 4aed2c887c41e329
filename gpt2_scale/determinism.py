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
