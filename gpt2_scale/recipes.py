"""What the GPT-2 reproduction recipes share: FineWeb-Edu 10B tokens, the GPT-3 schedule, evaluation cadence.

Each file in recipes/ picks a size, an engine and what fits in memory, and calls ``main``.
"""

from __future__ import annotations

from gpt2_scale.config import CheckpointSection, Config, DataSection, EngineSection, LogSection, ModelSection, OptimSection, TrainSection

FINEWEB_DIR = "data/fineweb-edu-10BT"
FINEWEB_PREPARE = f"python tools/prepare_data.py fineweb-edu --out {FINEWEB_DIR}"
TOKENS_10B = 10_000_000_000
WARMUP_TOKENS = 375_000_000  # GPT-3: linear warmup over the first 375M tokens


def fineweb_edu(
    model: str,
    engine: str,
    micro_batch: int,
    lr: float,
    total_batch_tokens: int = 2**19,
    seq_len: int = 1024,
    activation_checkpointing: bool = False,
    offload: bool = False,
) -> Config:
    """One epoch of FineWeb-Edu sample-10BT: warmup over 375M tokens, cosine to 10% of lr, AdamW (0.9, 0.95), wd 0.1."""
    max_steps = TOKENS_10B // total_batch_tokens  # 19,073 at 2^19 tokens/step
    return Config(
        model=ModelSection(name=model, pad_vocab=True),
        data=DataSection(dir=FINEWEB_DIR, prepare_hint=FINEWEB_PREPARE),
        train=TrainSection(micro_batch=micro_batch, seq_len=seq_len, total_batch_tokens=total_batch_tokens, max_steps=max_steps),
        optim=OptimSection(lr=lr, warmup_steps=round(WARMUP_TOKENS / total_batch_tokens)),  # 715 at 2^19
        engine=EngineSection(name=engine, activation_checkpointing=activation_checkpointing, offload=offload),
        log=LogSection(run_dir=f"runs/{model}-{engine}", val_every=250, val_tokens=20 * 64 * 1024, sample_every=250, hellaswag_every=250),
        checkpoint=CheckpointSection(every=5000),
    )
