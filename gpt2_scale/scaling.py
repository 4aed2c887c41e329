"""The larger GPT-2 sizes with the GPT-2 paper's architecture and the GPT-3 paper's Table 2.1 training
settings for the same size (learning rate, batch in tokens), on FineWeb-Edu 10BT, for the recipes.

GPT-3 trains at context 2048; we keep GPT-2's 1024, so the same batch in tokens is twice the sequences.
Warmup is GPT-3's 375M tokens, cosine decay to 10% over the whole run, weight decay 0.1, betas (0.9, 0.95),
clip 1.0 (the Config defaults).
"""

from __future__ import annotations

from gpt2_scale.config import CheckpointSection, Config, DataSection, EngineSection, LogSection, ModelSection, OptimSection, TrainSection
from gpt2_scale.zoo import ModelConfig

# GPT-2 size -> the GPT-3 Table 2.1 model of (nearly) the same size, whose lr and batch we use.
GPT3_TWIN = {"gpt2-124m": "gpt3-125m", "gpt2-350m": "gpt3-350m", "gpt2-774m": "gpt3-760m", "gpt2-1558m": "gpt3-1.3b"}
TRAIN_TOKENS = 10 * 10**9  # one pass over FineWeb-Edu sample-10BT
WARMUP_TOKENS = 375 * 10**6
FINEWEB_EDU = DataSection(dir="data/fineweb-edu-10BT", prepare_hint="python tools/prepare_data.py fineweb-edu --out data/fineweb-edu-10BT")


def scaled_config(model: str, engine: str, micro_batch: int, activation_checkpointing: bool = False) -> Config:
    """A run of ``model`` (a GPT-2 size) with its GPT-3 twin's learning rate and batch, for 10B tokens."""
    twin = ModelConfig.from_name(GPT3_TWIN[model])
    batch = twin.batch_tokens
    return Config(
        model=ModelSection(name=model),
        data=FINEWEB_EDU,
        train=TrainSection(micro_batch=micro_batch, seq_len=1024, total_batch_tokens=batch, max_steps=TRAIN_TOKENS // batch),
        optim=OptimSection(lr=twin.learning_rate, warmup_steps=WARMUP_TOKENS // batch),
        engine=EngineSection(name=engine, activation_checkpointing=activation_checkpointing),
        log=LogSection(run_dir=f"runs/{model.removeprefix('gpt2-')}{'' if engine.startswith('zero') else '_' + engine}",
                       hellaswag_every=1000),
        checkpoint=CheckpointSection(every=1000),
    )
