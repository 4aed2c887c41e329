"""The model's loss: the plain cross-entropy of the full logits, and the lm_head matmul and the cross-entropy fused
and chunked over tokens, so that the B·T·V logits never exist at once (``engine.loss_chunk``).

The plain path (``cross_entropy(lm_head(h), ...)``) holds the logits, their fp32 log-softmax (saved
for backward) and, when backward starts, the fp32 gradient of the logits: 10 bytes x B·T·V under bf16
(``memory.LOGIT_BYTES``), 7.7 GiB at B=16, T=1024, V=50257. Here each chunk of ``chunk`` tokens goes logits -> fp32 log-softmax -> loss and
(softmax - onehot) / N -> its rows of grad_h and a share of grad_weight accumulated in fp32, all during forward
(the Liger-Kernel "fused linear cross-entropy" idea). Backward only scales the saved gradients by grad_output.
Peak extra memory: one chunk's logits and their gradient, plus the fp32 weight-gradient accumulator (V·d·4).

The trade-off: both gradient matmuls run in forward even where nothing calls backward on the loss (call it
under ``torch.no_grad`` for evaluation: then only the loss is computed, chunk by chunk), and the saved
gradients are only correct for the inputs they were computed at (no double backward).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# cross_entropy's signature: (logits, targets, vocab_size) -> mean loss
LossFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
# chunk_loss's signature: (logits, targets, count, vocab_size, grads) -> (loss sum, logits gradient or None)
ChunkFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, bool], tuple[torch.Tensor, torch.Tensor | None]]


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Mean next-token cross-entropy over the first ``vocab_size`` (unpadded) columns, in fp32; targets -1 ignored.

    A function of its own so that it can be compiled apart from the blocks: fused, the slice, the fp32 cast and
    the softmax read the B·T·V logits once instead of writing fp32 copies of them.
    """
    logits = logits[..., :vocab_size]
    return F.cross_entropy(logits.reshape(-1, vocab_size).float(), targets.reshape(-1), ignore_index=-1)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                         chunk: int, chunk_fn: ChunkFn | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``h @ weight.T`` against ``targets``, ``chunk`` tokens at a time.

    h: (..., d); weight: (V_padded, d), rows from ``vocab_size`` on are padding and never predicted; targets:
    (...), -1 = ignored. Equals ``F.cross_entropy((h @ weight.T)[..., :vocab_size].float().flatten(0, -2),
    targets.flatten(), ignore_index=-1)``, including under autocast (matmuls in the autocast dtype, softmax
    in fp32) and when every target is ignored (NaN loss, zero gradients). ``chunk_fn`` is ``chunk_loss`` or a
    compiled copy of it (the trainer compiles it with the blocks: one fused pass over each chunk's logits).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if not 0 < vocab_size <= weight.shape[0]:
        raise ValueError(f"vocab_size must be in [1, {weight.shape[0]}], got {vocab_size}")
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    chunk_fn = chunk_fn or chunk_loss
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, targets, vocab_size, chunk, chunk_fn)
    with torch.no_grad():
        return _forward(h, weight, targets, vocab_size, chunk, chunk_fn, grads=False)[0]


def chunk_loss(logits: torch.Tensor, targets: torch.Tensor, count: torch.Tensor, vocab_size: int,
               grads: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk: (sum of its losses, d(mean loss)/d(logits) in the logits' dtype, or None without ``grads``).

    fp32 log-softmax over the first ``vocab_size`` columns (padded columns get -inf: probability 0, so the
    matmuls keep the padded, faster width); the gradient is (softmax - onehot) / count on counted rows and 0
    on ignored ones (targets == -1). Everything here is elementwise or a row reduction over the logits.
    """
    valid = targets != -1
    picked_targets = targets.clamp_min(0).unsqueeze(1)
    logp = logits.float()
    if logp.shape[1] > vocab_size:
        logp[:, vocab_size:] = float("-inf")
    logp = torch.log_softmax(logp, dim=1)
    loss = -torch.where(valid, logp.gather(1, picked_targets).squeeze(1), 0.0).sum()
    if not grads:
        return loss, None
    probs = logp.exp_()  # in place: the chunk's fp32 log-softmax is its largest tensor
    probs.scatter_add_(1, picked_targets, -valid.to(probs.dtype).unsqueeze(1))
    return loss, probs.div_(count).masked_fill_(~valid.unsqueeze(1), 0.0).to(logits.dtype)


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    """The matmul dtype the plain nn.Linear would use: autocast's where it is on, else the input's."""
    device = h.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype


def _forward(h, weight, targets, vocab_size, chunk, chunk_fn: ChunkFn, grads: bool):
    """(loss, grad_h, grad_weight) for a loss of 1, the gradients None unless ``grads``."""
    dtype = _compute_dtype(h)
    with torch.autocast(h.device.type, enabled=False):  # casts are explicit below
        w = weight.to(dtype)
        count = (targets != -1).sum()  # a tensor: no host sync
        loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if grads else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grads else None
        for start in range(0, h.shape[0], chunk):
            h_c = h[start : start + chunk].to(dtype)
            loss, grad_logits = chunk_fn(h_c @ w.T, targets[start : start + chunk], count, vocab_size, grads)
            loss_sum += loss
            if grads:
                grad_h[start : start + chunk] = grad_logits @ w
                grad_w += grad_logits.T @ h_c
        return loss_sum / count, grad_h, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    """Gradients computed in forward and saved (grad_h: N·d, grad_weight: V·d), so the logits are never kept."""

    @staticmethod
    def forward(ctx, h, weight, targets, vocab_size, chunk, chunk_fn):
        loss, grad_h, grad_w = _forward(h, weight, targets, vocab_size, chunk, chunk_fn, grads=True)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_output, grad_w * grad_output, None, None, None, None
