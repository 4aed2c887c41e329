"""Token shards on disk (prepare) and the batches the trainer reads from them (loader)."""

from gpt2_scale.data.loader import DataError, TokenLoader, read_manifest, verify_shards
from gpt2_scale.data.prepare import (
    default_source,
    ensure_default_corpus,
    fineweb_edu_source,
    prepare_shards,
    text_source,
    tokenize_document,
)

__all__ = [
    "DataError",
    "TokenLoader",
    "default_source",
    "ensure_default_corpus",
    "fineweb_edu_source",
    "prepare_shards",
    "read_manifest",
    "text_source",
    "tokenize_document",
    "verify_shards",
]
