"""What a benchmark row is: an engine and config overrides (``BenchSpec``), ``sweep`` (one lever at a time from a
base row), and what a row measured (``BenchResult``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from gpt2_scale import memory
from gpt2_scale.config import Config, ConfigError, set_value, validate

WALKTHROUGH = "walkthrough"  # the pseudo-engine of --compare-walkthrough: the walk-through's own loop


# Config keys the bench owns: a row's engine, total batch and device come from its own flags.
BENCH_OWNED = {"engine.name": "--engines", "train.total_batch_tokens": "--accum", "engine.device": "--device",
               "data.dir": "--data"}


def override(cfg: Config, key: str, value: str) -> None:
    """``config.set_value``, which refuses unknown keys and values of the wrong type, minus the bench's own keys."""
    if key in BENCH_OWNED:
        raise ConfigError(f"{key} is set by the bench; use {BENCH_OWNED[key]}")
    set_value(cfg, key, value)


@dataclass(frozen=True)
class BenchSpec:
    """One row of the table: an engine and the config overrides it runs with.

    The Config is the one source of truth for the model, micro-batch, sequence length, dtype, compile ... :
    ``overrides`` (every row's settings) then ``varied`` (what this row changes from the base row) are applied
    to ``Config()`` with ``config.set_value``; the total batch follows from them and ``accum``."""

    engine: str  # an engine name, or WALKTHROUGH
    overrides: tuple[tuple[str, str], ...] = ()  # (dotted config key, value as text)
    varied: tuple[tuple[str, str], ...] = ()
    accum: int = 1
    warmup: int = 2
    steps: int = 5
    data: str | None = None  # a shard directory (tools/prepare_data.py); None = random tokens
    profile: str | None = None  # a directory: profile PROFILE_STEPS more steps into it (gpt2_scale/bench/profile.py)

    @property
    def name(self) -> str:
        """The engine and what differs from its base row: ``ddp compile_mode=reduce-overhead``."""
        return " ".join([self.engine] + [f"{key.partition('.')[2]}={value}" for key, value in self.varied])

    def config(self, world: int) -> Config:
        cfg = Config()
        for key, value in self.overrides + self.varied:
            override(cfg, key, value)
        cfg.engine.name = "ddp" if self.engine == WALKTHROUGH else self.engine
        cfg.train.total_batch_tokens = cfg.train.micro_batch * cfg.train.seq_len * world * self.accum
        validate(cfg)  # the sequence length within the model's context among the rest
        return cfg


def sweep(base: BenchSpec, engines: list[str], vary: list[tuple[str, list[str]]], compare_walkthrough: bool = False) -> list[BenchSpec]:
    """Per engine its base row, then one row per value of each ``vary`` key with only that key changed (one
    lever at a time, not every combination); the walk-through's loop last, with the base settings."""
    specs = []
    for engine in engines:
        specs.append(dataclasses.replace(base, engine=engine))
        specs += [dataclasses.replace(base, engine=engine, varied=((key, value),)) for key, values in vary for value in values]
    return specs + ([dataclasses.replace(base, engine=WALKTHROUGH)] if compare_walkthrough else [])


@dataclass(frozen=True)
class BenchResult:
    """A timed row, or one whose configuration failed (``error``: its first line; the numbers are None)."""

    spec: BenchSpec
    cfg: Config  # what it ran with
    world: int
    device: str  # the GPU's name, or "cpu"
    ms_per_step: float | None = None  # slowest rank, mean over the timed steps
    tokens_per_s: float | None = None  # all ranks
    mfu: float | None = None  # against the datasheet (or --peak-tflops) peak
    mfu_matmul: float | None = None  # against the measured matmul rate
    peak: dict[str, int] = dataclasses.field(default_factory=dict)  # allocated/reserved (CUDA) or rss (CPU), max over ranks
    state: memory.StateBytes | None = None  # rank 0's model states; None for the walk-through's loop
    estimate: int | None = None  # tools/estimate_memory.py's peak for the row (eager constants); None for the walk-through
    error: str | None = None

    @property
    def tokens_per_s_per_rank(self) -> float | None:
        return None if self.tokens_per_s is None else self.tokens_per_s / self.world
