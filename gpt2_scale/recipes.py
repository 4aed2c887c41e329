"""What the GPT-2 reproduction recipes share: FineWeb-Edu 10B tokens, the GPT-3 schedule, evaluation cadence.

Each file in recipes/ picks a size, an engine and what fits in memory, and calls ``main``. The larger
GPT-2 sizes take the GPT-3 paper's Table 2.1 learning rate and batch (in tokens) of the model of the
same size; GPT-3 trains at context 2048, we keep GPT-2's 1024, so the same batch is twice the sequences.

They turn ``checkpoint.auto_resume`` on: they are the runs of hours to days on many GPUs that get preempted
and restarted (``torchrun --max-restarts``, a SLURM requeue), and a restart runs the same command, which should
continue the run, not stop at "already holds a run" and leave the allocation idle. It continues only the same
job: a command that changes what the run depends on is refused. What it gives up: a recipe run again into a
directory holding a run with the same settings (a smoke test with a small --max-steps, say) continues that run
or reports it finished, where it was refused; pass another --run-dir for a new run, or
``--checkpoint.auto_resume=false``. The quickstart (recipes/tiny.py) keeps it off.
"""

from __future__ import annotations

from gpt2_scale.config import CheckpointSection, Config, DataSection, EngineSection, LogSection, ModelSection, OptimSection, TrainSection
from gpt2_scale.zoo import ModelConfig

FINEWEB_DIR = "data/fineweb-edu-10BT"
FINEWEB_PREPARE = f"python tools/prepare_data.py fineweb-edu --out {FINEWEB_DIR}"
TOKENS_10B = 10_000_000_000  # one pass over FineWeb-Edu sample-10BT
WARMUP_TOKENS = 375_000_000  # GPT-3: linear warmup over the first 375M tokens
# GPT-2 size -> the GPT-3 Table 2.1 model of (nearly) the same size, whose learning rate and batch it uses.
GPT3_TWIN = {"gpt2-124m": "gpt3-125m", "gpt2-350m": "gpt3-350m", "gpt2-774m": "gpt3-760m", "gpt2-1558m": "gpt3-1.3b"}


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
        checkpoint=CheckpointSection(every=5000 if total_batch_tokens <= 2**19 else 2000, auto_resume=True),  # see above
    )


def gpt2_size(model: str, engine: str, micro_batch: int, activation_checkpointing: bool = False) -> Config:
    """A GPT-2 size trained with its GPT-3 twin's learning rate and batch, for 10B tokens."""
    twin = ModelConfig.from_name(GPT3_TWIN[model])
    return fineweb_edu(model, engine, micro_batch, lr=twin.learning_rate, total_batch_tokens=twin.batch_tokens,
                       activation_checkpointing=activation_checkpointing)
