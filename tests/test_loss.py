"""gpt2_scale/loss.py: the fused chunked lm_head + cross-entropy equals the plain path, loss and gradients,
and never holds the B·T·V logits."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from gpt2_scale.loss import linear_cross_entropy
from gpt2_scale.model import GPT, Options
from gpt2_scale.zoo import ModelConfig


def _inputs(n=37, d=16, padded=72, vocab=61, ignored=0.2, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=gen, dtype=dtype)
    w = (0.3 * torch.randn(padded, d, generator=gen)).to(dtype)
    w[vocab:] = 0.5  # padding rows: must be neither predicted nor given a gradient
    t = torch.randint(0, vocab, (n,), generator=gen)
    t[torch.rand(n, generator=gen) < ignored] = -1
    return h.requires_grad_(), w.requires_grad_(), t


def _plain(h, w, t, vocab):
    return F.cross_entropy((h @ w.T)[:, :vocab].float(), t, ignore_index=-1)


def _loss_and_grads(fn, h, w, t, vocab, autocast=False):
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        loss = fn(h, w, t, vocab)
    (3.0 * loss).backward()  # a grad_output other than 1
    return loss.detach(), h.grad, w.grad


def _fused_equals_plain(h, w, t, vocab, chunk):
    """(loss, grad_h, grad_weight) of the fused path, checked against the plain path's in fp32."""
    fused = _loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk=chunk), h, w, t, vocab)
    plain = _loss_and_grads(_plain, h, w, t, vocab)
    for got, want in zip(fused, plain):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)
    return fused


@pytest.mark.parametrize("chunk", [1, 5, 16, 37, 100])
def test_fp32_loss_and_gradients_equal_the_plain_path(chunk):
    h, w, t = _inputs()
    _, _, grad_w = _fused_equals_plain(h, w, t, 61, chunk)
    assert grad_w[61:].abs().sum() == 0  # padded rows are never predicted


def test_a_compiled_chunk_function_computes_the_same():
    """What block-scope compile hands the fused loss (prepare_model): chunk_loss through torch.compile."""
    from gpt2_scale.loss import chunk_loss

    h, w, t = _inputs()
    compiled = torch.compile(chunk_loss)
    fused = _loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk=16, chunk_fn=compiled), h, w, t, 61)
    for got, want in zip(fused, _loss_and_grads(_plain, h, w, t, 61)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("h_dtype, w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                              (torch.bfloat16, torch.bfloat16)])
def test_bf16_autocast_stays_within_bf16_resolution_and_keeps_dtypes(h_dtype, w_dtype):
    """DDP: fp32 weight under autocast; FSDP2's MixedPrecisionPolicy: a bf16 weight and bf16 activations."""
    h, w, t = _inputs(n=64, d=32, padded=128, vocab=100)
    h, w = h.detach().to(h_dtype), w.detach().to(w_dtype)
    fused = _loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk=24), h, w, t, 100, autocast=True)
    plain = _loss_and_grads(_plain, h, w, t, 100, autocast=True)
    assert fused[1].dtype == h_dtype and fused[2].dtype == w_dtype
    torch.testing.assert_close(fused[0], plain[0], rtol=2**-7, atol=0)
    for got, want in zip(fused[1:], plain[1:]):
        assert (got.float() - want.float()).norm() <= 2**-6 * want.float().norm()
    assert linear_cross_entropy(h.float(), w.float(), t, 100, 24) != fused[0]  # the matmul really ran in bf16


def test_no_grad_computes_the_same_loss():
    h, w, t = _inputs()
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, t, 61, chunk=8)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, _plain(h, w, t, 61).detach(), rtol=1e-6, atol=1e-6)


def test_all_ignored_targets_give_nan_and_zero_gradients_like_f_cross_entropy():
    h, w, _ = _inputs()
    t = torch.full((37,), -1)
    fused = _loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk=8), h, w, t, 61)
    plain = _loss_and_grads(_plain, h, w, t, 61)
    assert fused[0].isnan() and plain[0].isnan()
    for got, want in zip(fused[1:], plain[1:]):
        assert torch.equal(got, want) and not got.any()


def test_an_all_ignored_chunk_contributes_nothing():
    h, w, t = _inputs(ignored=0.0)
    t[8:16] = -1  # exactly the second chunk
    _, grad_h, _ = _fused_equals_plain(h, w, t, 61, 8)
    assert not grad_h[8:16].any()


def test_bad_arguments():
    h, w, t = _inputs()
    with pytest.raises(ValueError, match="chunk"):
        linear_cross_entropy(h, w, t, 61, chunk=0)
    with pytest.raises(ValueError, match="vocab_size"):
        linear_cross_entropy(h, w, t, 73, chunk=8)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), d=st.integers(1, 12), vocab=st.integers(1, 40), pad=st.integers(0, 8),
       chunk=st.integers(1, 50), ignored=st.sampled_from([0.0, 0.3, 1.0]), seed=st.integers(0, 2**16))
def test_property_fused_equals_plain(n, d, vocab, pad, chunk, ignored, seed):
    _fused_equals_plain(*_inputs(n, d, vocab + pad, vocab, ignored, seed), vocab, chunk)


# --- the model ---


def _model_grads(loss_chunk, autocast=False):
    torch.manual_seed(0)
    config = ModelConfig(2, 2, 16, block_size=16, vocab_size=61, pad_vocab=True)  # 61 -> 64 rows
    model = GPT(config, Options(loss_chunk=loss_chunk))
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 61, (3, 16), generator=gen)
    targets = torch.randint(0, 61, (3, 16), generator=gen)
    targets[0, :5] = -1
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        logits, loss = model(idx, targets)
    loss.backward()
    return logits, loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("loss_chunk", [7, 48, 1000])
def test_model_with_a_loss_chunk_gives_the_same_loss_and_gradients(loss_chunk):
    logits, loss, grads = _model_grads(loss_chunk)
    plain_logits, plain_loss, plain_grads = _model_grads(0)
    assert logits is None and plain_logits is not None
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == plain_grads.keys()  # the tied weight once, as transformer.wte.weight
    for name, g in grads.items():  # wte's gradient holds the embedding's and the head's contributions
        torch.testing.assert_close(g, plain_grads[name], rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_model_under_bf16_autocast_with_a_loss_chunk():
    _, loss, grads = _model_grads(20, autocast=True)
    _, plain_loss, plain_grads = _model_grads(0, autocast=True)
    torch.testing.assert_close(loss, plain_loss, rtol=2**-7, atol=0)
    g, want = grads["transformer.wte.weight"], plain_grads["transformer.wte.weight"]
    assert g.dtype == torch.float32 and (g - want).norm() <= 2**-6 * want.norm()


def test_model_without_targets_or_chunk_returns_logits():
    torch.manual_seed(0)
    model = GPT(ModelConfig(1, 1, 8, block_size=8, vocab_size=11), Options(loss_chunk=4))
    idx = torch.randint(0, 11, (2, 8))
    logits, loss = model(idx)
    assert loss is None and logits.shape == (2, 8, 11)
    assert list(model.state_dict()) == list(GPT(ModelConfig(1, 1, 8, block_size=8, vocab_size=11)).state_dict())


# --- memory ---


class _LargestTensor(TorchDispatchMode):
    """The largest tensor any op produces (bytes): a materialized logits tensor would be B·T·V·4."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def _memory(fn, n=2048, d=64, vocab=4096):
    h, w, t = _inputs(n, d, vocab, vocab, 0.0)
    saved: dict[int, int] = {}

    def pack(x):
        if x is not h and x is not w:
            saved[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with _LargestTensor() as mode:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            loss = fn(h, w, t, vocab)
        loss.backward()
    return sum(saved.values()), mode.largest


def test_the_fused_path_never_holds_the_logits():
    n, d, vocab, chunk = 2048, 64, 4096, 128
    logits = n * vocab * 4  # 32 MiB
    saved_plain, largest_plain = _memory(_plain)
    saved_fused, largest_fused = _memory(lambda *a: linear_cross_entropy(*a, chunk=chunk))
    assert saved_plain >= logits and largest_plain >= logits  # the yardstick does hold them
    # saved for backward: grad_h (n·d) and grad_weight (V·d) only
    assert saved_fused == (n * d + vocab * d) * 4, f"{saved_fused:,} B saved vs {saved_plain:,} B plain"
    assert largest_fused <= max(chunk * vocab, vocab * d) * 4, f"a {largest_fused:,} B tensor exists"
