"""The quickstart: a tiny GPT on the embedded default corpus, on CPU in under two minutes.

    python recipes/tiny.py
    torchrun --nproc_per_node 2 recipes/tiny.py --engine fsdp

Shows the whole loop on a laptop: falling loss, validation loss, samples, TensorBoard logs in
runs/tiny/tensorboard and a checkpoint in runs/tiny/checkpoints.
"""

from gpt2_scale.config import CheckpointSection, Config, DataSection, EngineSection, LogSection, ModelSection, OptimSection, TrainSection
from gpt2_scale.train import main

CONFIG = Config(
    model=ModelSection(name="gpt2-tiny", pad_vocab=False),
    data=DataSection(dir="default"),
    train=TrainSection(micro_batch=4, seq_len=128, total_batch_tokens=1024, max_steps=120),  # 1 or 2 ranks divide it
    optim=OptimSection(lr=3e-3, warmup_steps=10),
    engine=EngineSection(name="ddp"),
    log=LogSection(run_dir="runs/tiny", log_every=10, val_every=40, val_tokens=4 * 128 * 8, sample_every=60, num_samples=2, sample_tokens=24),
    checkpoint=CheckpointSection(every=60),
)

if __name__ == "__main__":
    main(CONFIG)
