"""Autoregressive sampling with a KV cache: greedy (temperature 0), temperature and top-k.

With the cache the prompt is run once (prefill), then one new token per forward. Once the sequence
is longer than the context, the window slides and the cached keys, computed at other positions, no
longer apply: from then on each step is a full forward over the last ``block_size`` tokens, which is
exactly what ``use_cache=False`` does at every step, so both paths produce the same tokens.
"""

from __future__ import annotations

import torch

from gpt2_scale.model import GPT, KVCache


@torch.compiler.set_stance("force_eager")  # compiled blocks would recompile per layer and cache position, see below
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """``idx`` (B, T) or (T,) of token ids, followed by ``max_new_tokens`` sampled ones: (B, T + new) or (T + new,).

    ``temperature`` 0 picks the most likely token; otherwise logits are divided by it and, with
    ``top_k``, all but the k most likely tokens are dropped before sampling with ``generator``.
    The model runs in eval mode under ``torch.no_grad()`` (not inference_mode: sharded engines such as
    ZeRO-3 keep the weights they gather, and inference tensors could not be used in a later backward);
    its train/eval mode is restored. Blocks the trainer compiled run eagerly here: the cache's layer index and
    position would make dynamo recompile them up to its recompile limit, minutes of GPU time for a few tokens.
    """
    if idx.dim() not in (1, 2) or idx.size(-1) < 1:
        raise ValueError(f"idx must be (T,) or (B, T) with T >= 1 token ids, got shape {tuple(idx.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    squeeze = idx.dim() == 1
    out = idx.unsqueeze(0) if squeeze else idx
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = _generate(model, out.long(), max_new_tokens, temperature, top_k, generator, use_cache)
    finally:
        model.train(was_training)
    return out.squeeze(0) if squeeze else out


def _generate(model, out, max_new_tokens, temperature, top_k, generator, use_cache):
    block_size = model.config.block_size
    cache: KVCache | None = None
    for _ in range(max_new_tokens):
        if use_cache and out.size(1) <= block_size:
            if cache is None:  # prefill the whole prompt
                cache = KVCache(model.config, out.size(0), out.device, _activation_dtype(model, out.device))
                logits, _ = model(out, cache=cache)
            else:  # only the newest token; the cache holds the ones before it
                logits, _ = model(out[:, cache.pos :], cache=cache)
        else:  # no cache, or the context is full and slides: a full forward over the last block_size
            cache = None
            logits, _ = model(out[:, -block_size:])
        next_token = _sample(logits[:, -1, :], temperature, top_k, generator)
        out = torch.cat([out, next_token], dim=1)
    return out


def _activation_dtype(model: GPT, device: torch.device) -> torch.dtype:
    """The dtype keys and values come out in: the autocast dtype when autocast is on, else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.transformer.wte.weight.dtype


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature  # the same softmax; a tiny temperature gives -inf, not nan
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if generator is not None and generator.device != probs.device:  # e.g. a CPU generator for a GPU model
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator)
