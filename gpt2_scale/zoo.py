"""Named model configurations: the OpenAI GPT-2 sizes, the GPT-3 paper's family, and tiny ones for CPU.

``ModelConfig.from_name("gpt2-124m")`` is the one way to get a config by name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

GPT2_VOCAB_SIZE = 50257
VOCAB_PAD_MULTIPLE = 64  # 50257 -> 50304: a multiple of 64 makes the vocabulary matmuls tile well on GPUs


@dataclass(frozen=True)
class ModelConfig:
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int = 1024  # context length
    vocab_size: int = GPT2_VOCAB_SIZE  # real tokens; logits beyond it are never predicted
    pad_vocab: bool = False  # store wte/lm_head with padded_vocab_size rows (faster on GPU)
    name: str = "custom"
    # Training defaults from the paper that defines the size (GPT-3 Table 2.1), when it gives them.
    batch_tokens: int | None = None
    learning_rate: float | None = None

    def __post_init__(self) -> None:
        for field in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            if getattr(self, field) < 1:
                raise ValueError(f"ModelConfig.{field} must be >= 1, got {getattr(self, field)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

    @property
    def padded_vocab_size(self) -> int:
        if not self.pad_vocab:
            return self.vocab_size
        return -(-self.vocab_size // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def num_params(self, include_position_embeddings: bool = True) -> int:
        """Parameter count with tied wte/lm_head, computed from the shapes (no model needed)."""
        d, L = self.n_embd, self.n_layer
        block = (2 * 2 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
        n = self.padded_vocab_size * d + L * block + 2 * d
        return n + (self.block_size * d if include_position_embeddings else 0)

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token, forward and backward: 6N + 12·L·d·T (PaLM appendix B; N without wpe)."""
        T = seq_len or self.block_size
        return 6 * self.num_params(include_position_embeddings=False) + 12 * self.n_layer * self.n_embd * T

    def context_problem(self, seq_len: int, flag: str) -> str | None:
        """Why sequences of ``seq_len`` tokens (set by ``flag``) cannot run on this model, or None: a position past
        the context has no embedding."""
        if seq_len > self.block_size:
            return f"{flag} {seq_len} exceeds {self.name}'s context length {self.block_size}"
        return None

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_name(cls, name: str, **overrides) -> ModelConfig:
        key = _ALIASES.get(name.lower(), name.lower())
        if key not in _ZOO:
            raise ValueError(f"unknown model {name!r}; valid names: {', '.join(available_models())}")
        return _ZOO[key].replace(**overrides) if overrides else _ZOO[key]


def _gpt3(name: str, n_layer: int, n_embd: int, n_head: int, batch_tokens: int, lr: float) -> ModelConfig:
    return ModelConfig(n_layer, n_head, n_embd, block_size=2048, name=name, batch_tokens=batch_tokens, learning_rate=lr)


_M = 2**20  # the paper's "0.5M" batch is 2^19 tokens = 256 sequences of 2048
_ZOO: dict[str, ModelConfig] = {
    c.name: c
    for c in [
        # OpenAI GPT-2 checkpoints (Radford et al. 2019), context 1024.
        ModelConfig(12, 12, 768, name="gpt2-124m"),
        ModelConfig(24, 16, 1024, name="gpt2-350m"),
        ModelConfig(36, 20, 1280, name="gpt2-774m"),
        ModelConfig(48, 25, 1600, name="gpt2-1558m"),
        # GPT-3 paper (Brown et al. 2020) Table 2.1: context 2048, batch in tokens, max learning rate.
        _gpt3("gpt3-125m", 12, 768, 12, _M // 2, 6.0e-4),
        _gpt3("gpt3-350m", 24, 1024, 16, _M // 2, 3.0e-4),
        _gpt3("gpt3-760m", 24, 1536, 16, _M // 2, 2.5e-4),
        # The table prints 24 heads of 128 for XL, which cannot tile d_model 2048: 16 heads x 128 does.
        _gpt3("gpt3-1.3b", 24, 2048, 16, _M, 2.0e-4),
        _gpt3("gpt3-2.7b", 32, 2560, 32, _M, 1.6e-4),
        _gpt3("gpt3-6.7b", 32, 4096, 32, 2 * _M, 1.2e-4),
        # The table prints d_model 5140, a typo: 40 heads x d_head 128 = 5120.
        _gpt3("gpt3-13b", 40, 5120, 40, 2 * _M, 1.0e-4),
        # "3.2M" tokens, rounded to a whole number of 2048-token sequences divisible by 512 (1536 x 2048).
        _gpt3("gpt3-175b", 96, 12288, 96, 3 * _M, 0.6e-4),
        # Small enough for CPU tests and the quickstart.
        ModelConfig(2, 4, 128, block_size=256, name="gpt2-tiny"),
        ModelConfig(4, 4, 256, block_size=256, name="gpt2-mini"),
    ]
}
_ALIASES = {
    "gpt2": "gpt2-124m",
    "gpt2-small": "gpt2-124m",
    "gpt2-medium": "gpt2-350m",
    "gpt2-large": "gpt2-774m",
    "gpt2-xl": "gpt2-1558m",
    "gpt3-small": "gpt3-125m",
    "gpt3-medium": "gpt3-350m",
    "gpt3-large": "gpt3-760m",
    "gpt3-xl": "gpt3-1.3b",
}
# The Hugging Face hub repositories of the OpenAI checkpoints.
HF_HUB_NAMES = {"gpt2-124m": "gpt2", "gpt2-350m": "gpt2-medium", "gpt2-774m": "gpt2-large", "gpt2-1558m": "gpt2-xl"}


def available_models() -> list[str]:
    return sorted(_ZOO) + sorted(_ALIASES)
