import math

import pytest
import torch

from gpt2_scale import GPT, ModelConfig
from gpt2_scale.model import KVCache


def tiny(**kw):
    return ModelConfig.from_name("gpt2-tiny", **kw)


def test_forward_shapes_and_initial_loss_near_uniform():
    torch.manual_seed(0)
    model = GPT(tiny())
    idx, targets = torch.randint(0, 50257, (2, 2, 16))
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 16, 50257)
    assert abs(loss.item() - math.log(50257)) < 0.5  # std 0.02 init gives near-uniform predictions


def test_weights_are_tied_and_init_follows_gpt2():
    torch.manual_seed(0)
    model = GPT(ModelConfig(12, 4, 256, block_size=64, vocab_size=1000))
    assert model.lm_head.weight is model.transformer.wte.weight
    proj = model.transformer.h[0].attn.c_proj.weight.std().item()
    fc = model.transformer.h[0].mlp.c_fc.weight.std().item()
    assert abs(fc - 0.02) < 0.002
    assert abs(proj - 0.02 / math.sqrt(24)) < 0.001
    assert model.transformer.h[0].attn.c_attn.bias.abs().sum() == 0


def test_causality():
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    idx = torch.randint(0, 50257, (1, 12))
    changed = idx.clone()
    changed[0, 8] = (idx[0, 8] + 1) % 50257
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_padded_vocab_is_never_predicted():
    torch.manual_seed(0)
    model = GPT(tiny(pad_vocab=True))
    assert model.transformer.wte.weight.shape[0] == 50304
    idx = torch.randint(0, 50257, (2, 8))
    logits, loss = model(idx, idx)
    assert logits.shape[-1] == 50257
    loss.backward()
    assert model.transformer.wte.weight.grad[50257:].abs().sum() == 0


def test_ignore_index_and_context_limit():
    model = GPT(tiny())
    idx = torch.randint(0, 50257, (1, 8))
    targets = torch.full_like(idx, -1)
    targets[0, 3] = 7
    _, loss = model(idx, targets)
    logits, _ = model(idx)
    expected = torch.nn.functional.cross_entropy(logits[0, 3:4], targets[0, 3:4])
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="context length 256"):
        model(torch.zeros(1, 257, dtype=torch.long))


def test_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    idx = torch.randint(0, 50257, (2, 20))
    full, _ = model(idx)
    cache = KVCache(model.config, 2, "cpu", torch.float32)
    parts = [model(idx[:, :11], cache=cache)[0], model(idx[:, 11:15], cache=cache)[0]]
    parts += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(15, 20)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
