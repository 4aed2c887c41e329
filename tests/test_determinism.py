"""train.deterministic: the switch turns on PyTorch's deterministic algorithms and seeds every RNG.

That runs repeat bitwise under it, for every engine, is a property in test_equivalence.py.
"""

import os
import random

import numpy as np
import pytest
import torch

from gpt2_scale.determinism import make_deterministic, seed_step


@pytest.fixture
def restore_determinism(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.delenv("MKL_CBWR", raising=False)
    previous = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    yield
    torch.use_deterministic_algorithms(previous[0])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = previous[1:]


def test_make_deterministic_sets_pytorch_flags_and_seeds(restore_determinism):
    make_deterministic(7)
    assert torch.are_deterministic_algorithms_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert os.environ["MKL_CBWR"] == "AUTO,STRICT"
    assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
    draws = random.random(), np.random.rand()
    make_deterministic(7)
    assert (random.random(), np.random.rand()) == draws


def _three_steps(threads: int) -> tuple[list[float], torch.Tensor]:
    from gpt2_scale.model import GPT
    from gpt2_scale.zoo import ModelConfig

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        model = GPT(ModelConfig(2, 2, 32, block_size=32, vocab_size=97))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.randint(0, 97, (4, 33), generator=torch.Generator().manual_seed(1))
        losses = []
        for _ in range(3):
            _, loss = model(x[:, :-1], x[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses, model.lm_head.weight.detach().clone()
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("threads", [1, 2])
def test_the_cpu_training_step_repeats_bitwise_without_the_switch(threads):
    (a_losses, a_weights), (b_losses, b_weights) = _three_steps(threads), _three_steps(threads)
    assert a_losses == b_losses and torch.equal(a_weights, b_weights)


def test_a_steps_random_draws_depend_on_seed_step_and_rank_alone():
    """seed_step: what a step draws is fixed by (seed, step, rank), whatever ran before in the process, so a
    checkpoint carries no RNG state and a resumed run draws what the uninterrupted one did."""

    def draws(seed, step, rank, noise=0):
        torch.rand(noise), random.random(), np.random.rand()  # whatever the process drew before
        seed_step(seed, step, rank)
        return torch.rand(4).tolist(), random.random(), np.random.rand()

    assert draws(0, 7, 1) == draws(0, 7, 1, noise=5)
    others = [draws(1, 7, 1), draws(0, 8, 1), draws(0, 7, 0)]
    assert all(other[0] != draws(0, 7, 1)[0] for other in others)
