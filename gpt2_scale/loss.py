"""The lm_head matmul and the cross-entropy fused and chunked over tokens: the B·T·V logits never exist at once.

The plain path (``F.cross_entropy(lm_head(h).float(), ...)``) holds the logits, their fp32 log-softmax (saved
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

import torch


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                         chunk: int) -> torch.Tensor:
    """Mean cross-entropy of ``h @ weight.T`` against ``targets``, ``chunk`` tokens at a time.

    h: (..., d); weight: (V_padded, d), rows from ``vocab_size`` on are padding and never predicted; targets:
    (...), -1 = ignored. Equals ``F.cross_entropy((h @ weight.T)[..., :vocab_size].float().flatten(0, -2),
    targets.flatten(), ignore_index=-1)``, including under autocast (matmuls in the autocast dtype, softmax
    in fp32) and when every target is ignored (NaN loss, zero gradients).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if not 0 < vocab_size <= weight.shape[0]:
        raise ValueError(f"vocab_size must be in [1, {weight.shape[0]}], got {vocab_size}")
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, targets, vocab_size, chunk)
    with torch.no_grad():
        return _forward(h, weight, targets, vocab_size, chunk, grads=False)[0]


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    """The matmul dtype the plain nn.Linear would use: autocast's where it is on, else the input's."""
    device = h.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype


def _forward(h, weight, targets, vocab_size, chunk, grads: bool):
    """(loss, grad_h, grad_weight) for a loss of 1, the gradients None unless ``grads``."""
    dtype = _compute_dtype(h)
    with torch.autocast(h.device.type, enabled=False):  # casts are explicit below
        w = weight.to(dtype)
        valid = targets != -1
        count = valid.sum()  # a tensor: no host sync
        loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if grads else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grads else None
        for start in range(0, h.shape[0], chunk):
            h_c, t_c, v_c = h[start : start + chunk].to(dtype), targets[start : start + chunk], valid[start : start + chunk]
            logp = _log_softmax(h_c @ w.T, vocab_size)
            picked = logp.gather(1, t_c.clamp_min(0).unsqueeze(1)).squeeze(1)
            loss_sum -= torch.where(v_c, picked, 0.0).sum()
            if grads:
                # d(mean loss)/d(logits) = (softmax - onehot) / N on counted rows, 0 on ignored ones
                # (in place: the chunk's fp32 log-softmax is its largest tensor)
                probs = logp.exp_()
                probs.scatter_add_(1, t_c.clamp_min(0).unsqueeze(1), -v_c.to(probs.dtype).unsqueeze(1))
                probs = probs.div_(count).masked_fill_(~v_c.unsqueeze(1), 0.0).to(dtype)
                grad_h[start : start + chunk] = probs @ w
                grad_w += probs.T @ h_c
            del logp
        return loss_sum / count, grad_h, grad_w


def _log_softmax(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """fp32 log-softmax over the first ``vocab_size`` columns; padded columns get -inf (probability 0), so the
    matmuls keep the padded, faster width."""
    logits = logits.float()
    if logits.shape[1] > vocab_size:
        logits[:, vocab_size:] = float("-inf")
    return torch.log_softmax(logits, dim=1)


class _LinearCrossEntropy(torch.autograd.Function):
    """Gradients computed in forward and saved (grad_h: N·d, grad_weight: V·d), so the logits are never kept."""

    @staticmethod
    def forward(ctx, h, weight, targets, vocab_size, chunk):
        loss, grad_h, grad_w = _forward(h, weight, targets, vocab_size, chunk, grads=True)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_output, grad_w * grad_output, None, None, None
