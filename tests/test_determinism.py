"""train.deterministic: the switch turns on PyTorch's deterministic algorithms and seeds every RNG.

That runs repeat bitwise under it, for every engine, is a property in test_equivalence.py.
"""

import os
import random

import numpy as np
import pytest
import torch

from gpt2_scale.determinism import make_deterministic


@pytest.fixture
def restore_determinism(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    previous = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    yield
    torch.use_deterministic_algorithms(previous[0])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = previous[1:]


def test_make_deterministic_sets_pytorch_flags_and_seeds(restore_determinism):
    make_deterministic(7)
    assert torch.are_deterministic_algorithms_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
    draws = random.random(), np.random.rand()
    make_deterministic(7)
    assert (random.random(), np.random.rand()) == draws
