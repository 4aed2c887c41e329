"""The GPT-2 model: pre-LayerNorm transformer, learned positions, tied embeddings.

Knows nothing of engines, data or logging. Parameter names follow the OpenAI/Hugging Face
checkpoints (``transformer.h.0.attn.c_attn.weight`` ...) so weights map one to one. How it computes
(activation checkpointing, the fused loss, compiled loss functions) is one ``Options`` value, which an
engine sets in one place (``engines.base.prepare_model``) before it wraps the model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from gpt2_scale.loss import ChunkFn, LossFn, chunk_loss, cross_entropy, linear_cross_entropy
from gpt2_scale.zoo import ModelConfig

# Options.attention: the one kernel scaled_dot_product_attention may use; "auto" lets PyTorch choose.
SDPA_KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def attention_kernel(name: str) -> contextlib.AbstractContextManager:
    """Restrict scaled_dot_product_attention to the kernel ``name`` ("auto": no restriction).

    Entered inside forward, so that under torch.compile the choice is part of the traced graph. Around a compiled
    call it would not be: the compile caches, keyed on the graph, then serve whichever kernel was traced first."""
    return contextlib.nullcontext() if name == "auto" else sdpa_kernel(SDPA_KERNELS[name])


class KVCache:
    """Keys and values of every layer for the positions generated so far, preallocated to block_size."""

    def __init__(self, config: ModelConfig, batch_size: int, device, dtype) -> None:
        shape = (batch_size, config.n_head, config.block_size, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.pos = 0  # number of positions filled
        self.capacity = config.block_size


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.residual_scale = True  # init std scaled by 1/sqrt(2 * n_layer)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, kernel: str = "auto") -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is None or cache.pos == 0:
            mask, causal = None, True
        else:  # new queries see every cached position and the causal part of their own block
            mask = torch.ones(T, cache.pos + T, dtype=torch.bool, device=x.device).tril(cache.pos)
            causal = False
        if cache is not None:
            end = cache.pos + T
            cache.k[layer][:, :, cache.pos : end] = k
            cache.v[layer][:, :, cache.pos : end] = v
            k, v = cache.k[layer][:, :, :end], cache.v[layer][:, :, :end]
        with attention_kernel(kernel if mask is None else "auto"):  # a masked (cached) step: not every kernel takes a mask
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.residual_scale = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, kernel: str = "auto") -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer, kernel)
        return x + self.mlp(self.ln_2(x))


class LMHead(nn.Linear):
    """The output projection; given targets it returns the loss of ``loss.linear_cross_entropy`` instead of logits.

    The fused loss runs inside this module's forward (not in GPT.forward reading ``lm_head.weight``) because
    DeepSpeed ZeRO-3 gathers a module's parameters in hooks around that module's forward.
    """

    def __init__(self, n_embd: int, padded_vocab_size: int, vocab_size: int) -> None:
        super().__init__(n_embd, padded_vocab_size, bias=False)
        self.vocab_size = vocab_size  # rows from here on are padding, never predicted

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None, chunk: int = 0,
                chunk_fn: ChunkFn = chunk_loss) -> torch.Tensor:
        if targets is None:
            return super().forward(x)
        return linear_cross_entropy(x, self.weight, targets, self.vocab_size, chunk, chunk_fn)


@dataclass(frozen=True)
class Options:
    """How the model computes, never what: every option gives the same loss and gradients, up to rounding.

    A new GPT runs the plain way; an engine sets its run's options once, before it wraps the model
    (``engines.base.prepare_model``, from ``engine.activation_checkpointing``, ``engine.loss_chunk`` and the
    compile scope), the way torchtitan's ``parallelize`` applies a job's settings to its model.
    """

    activation_checkpointing: bool = False  # recompute each block in backward: memory for compute
    loss_chunk: int = 0  # > 0: with targets, the fused chunked lm_head + cross-entropy (no logits returned)
    attention: str = "auto"  # attention's kernel, a key of SDPA_KERNELS, or "auto" (PyTorch's choice)
    cross_entropy: LossFn = cross_entropy  # the loss of the full logits; block-scope compile gives a compiled copy
    chunk_loss: ChunkFn = chunk_loss  # the fused loss's per-chunk softmax and gradient; likewise


class GPT(nn.Module):
    def __init__(self, config: ModelConfig, options: Options = Options()) -> None:
        super().__init__()
        self.config = config
        self.options = options
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd),
            )
        )
        self.lm_head = LMHead(config.n_embd, config.padded_vocab_size, config.vocab_size)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02 * (2 * self.config.n_layer) ** -0.5 if getattr(module, "residual_scale", False) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab_size) and, given targets (-1 = ignore), the mean cross-entropy.

        With targets and ``options.loss_chunk`` > 0 the loss comes from the fused path (gpt2_scale/loss.py) and
        the logits are None: they are never materialized.
        """
        options = self.options
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context length {self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for i, block in enumerate(self.transformer.h):
            if options.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, None, i, options.attention, use_reentrant=False)
            else:
                x = block(x, cache, i, options.attention)
        if cache is not None:
            cache.pos += T
        x = self.transformer.ln_f(x)
        if targets is not None and options.loss_chunk > 0:
            return None, self.lm_head(x, targets, options.loss_chunk, options.chunk_loss)
        logits = self.lm_head(x)
        loss = None if targets is None else options.cross_entropy(logits, targets, self.config.vocab_size)
        return logits[..., : self.config.vocab_size], loss  # padded rows are never predicted

    @classmethod
    def from_pretrained(cls, name_or_dir: str, pad_vocab: bool = False) -> GPT:
        """A GPT-2 checkpoint in Hugging Face layout: a hub name (``gpt2`` ...) or a local directory.

        See ``gpt2_scale.hf.load_hf``.
        """
        from gpt2_scale.hf import load_hf

        return load_hf(name_or_dir, pad_vocab=pad_vocab)

    def num_params(self, include_position_embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())  # parameters() yields the tied weight once
        return n if include_position_embeddings else n - self.transformer.wpe.weight.numel()
