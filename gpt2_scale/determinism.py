"""One switch for bitwise-repeatable runs where PyTorch allows it (``--train.deterministic=true``).

Costs: cuBLAS uses a fixed workspace and deterministic kernels, and some ops (e.g. scatter-add
backward) fall back to slower deterministic versions or raise if they have none. On CPU the
training step is already deterministic; the switch then only seeds Python's and numpy's RNGs.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def make_deterministic(seed: int) -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # must be set before cuBLAS starts
    torch.use_deterministic_algorithms(True, warn_only=False)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    random.seed(seed)
    np.random.seed(seed)
