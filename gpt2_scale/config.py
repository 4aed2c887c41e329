"""The run configuration: one dataclass tree, loadable from YAML, overridable from the command line (gpt2_scale.cli).

Precedence: recipe defaults < ``--config file.yaml`` < ``--section.field=value`` and the short flags (``--model``,
``--engine`` ..., the ``aliases`` below). A field's comment is its ``--help`` line; a ``Literal`` type is its list of
choices, checked the same way for the command line, YAML and ``set_value``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import tyro
import yaml

from gpt2_scale.errors import UserError

EngineName = Literal["ddp", "fsdp", "zero1", "zero2", "zero3"]
ENGINES: tuple[str, ...] = typing.get_args(EngineName)
SEED_LIMIT = 2**32  # a seed is below it: numpy.random.seed takes no larger one
# torch.compile's modes; None is its default. "reduce-overhead" adds CUDA graphs.
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
# scaled_dot_product_attention's kernels (gpt2_scale/model.py); "auto" is PyTorch's own choice.
AttentionKernel = Literal["auto", "flash", "cudnn", "efficient", "math"]


def short(*flags: str):
    """A short command-line flag for a field (``--model`` for ``--model.name``)."""
    return tyro.conf.arg(aliases=flags)


@dataclass
class ModelSection:
    name: Annotated[str, short("--model")] = "gpt2-124m"  # any zoo name (gpt2_scale.zoo)
    pad_vocab: bool = True  # 50257 -> 50304 rows: faster matmuls, padded rows never predicted
    init_from: str | None = None  # a Hugging Face GPT-2 directory or hub name to start from


@dataclass
class DataSection:
    dir: Annotated[str, short("--data")] = "default"  # a shard directory from tools/prepare_data.py, or "default" (embedded corpus)
    seed: int = 1337  # shard and window order
    prepare_hint: str = ""  # the command that makes `dir`, printed when it is missing


@dataclass
class TrainSection:
    micro_batch: Annotated[int, short("--micro-batch")] = 64  # sequences per rank per forward pass
    seq_len: Annotated[int, short("--seq-len")] = 1024  # tokens per sequence (T)
    total_batch_tokens: Annotated[int, short("--total-batch-tokens")] = 524_288  # 2^19 tokens per optimizer step, as GPT-3 Small
    max_steps: Annotated[int, short("--max-steps")] = 19_073  # 10B tokens at 2^19 tokens/step
    seed: Annotated[int, short("--seed")] = 1337  # weights' init and every random draw of training
    deterministic: bool = False  # deterministic algorithms where PyTorch has them (slower on GPU)


@dataclass
class OptimSection:
    lr: Annotated[float, short("--lr")] = 6e-4  # peak learning rate, after warmup
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of lr
    warmup_steps: int = 715  # 375M tokens / 2^19, as GPT-3
    decay_steps: int | None = None  # cosine length; defaults to train.max_steps
    weight_decay: float = 0.1  # on 2-D weights only
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.95  # AdamW's second-moment decay
    eps: float = 1e-8  # AdamW's denominator epsilon
    grad_clip: float = 1.0  # global norm, across shards; 0 disables


@dataclass
class EngineSection:
    name: Annotated[EngineName, short("--engine")] = "ddp"  # DDP, FSDP2 or DeepSpeed ZeRO stage 1/2/3
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    compile: bool | None = None  # torch.compile (see compile_scope); null = on CUDA (ZeRO-3: the loss only)
    # block: each transformer block and the loss | model: the whole GPT (as the walk-through) | loss: the loss only
    compile_scope: Literal["block", "model", "loss"] = "block"
    compile_mode: CompileMode | None = None  # torch.compile's mode; null = its default; reduce-overhead adds CUDA graphs
    offload: bool = False  # optimizer state on CPU (ZeRO-Offload / FSDP CPU offload)
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory, ~1/3 more compute
    loss_chunk: int = 0  # tokens per chunk of the fused lm_head + cross-entropy; 0 = full logits, the walk-through's way
    attention: AttentionKernel = "auto"  # attention's kernel: auto = PyTorch's (FlashAttention on CUDA); else that one only (cudnn, efficient: CUDA)
    ds_config: str | None = None  # DeepSpeed JSON; default gpt2_scale/ds_configs/zero{1,2,3}[_offload].json
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when a GPU is visible


@dataclass
class LogSection:
    run_dir: Annotated[str, short("--run-dir")] = "runs/latest"  # metrics, config, checkpoints and TensorBoard events
    log_every: int = 1  # steps between training-loss lines (each reads the loss from the device)
    val_every: int = 250  # steps between validation losses; 0 = off
    val_tokens: int = 20 * 64 * 1024  # fixed amount, so val loss is comparable across runs
    sample_every: int = 250  # steps between printed samples; 0 = off
    sample_prompt: str = "Hello, I'm a language model,"  # the walk-through's prompt
    num_samples: int = 4  # samples per sampling step
    sample_tokens: int = 32  # new tokens per sample
    hellaswag_every: int = 0  # 0 = off
    hellaswag_data: str | None = None  # hellaswag_val.jsonl; None downloads it (needs network)
    hellaswag_limit: int | None = None  # first N examples only (quick checks); null = all 10,042
    tensorboard: bool = True  # also write TensorBoard events to run_dir
    peak_tflops: float | None = None  # for MFU; None = detect the GPU (none on CPU)


@dataclass
class CheckpointSection:
    every: int = 5000  # steps; 0 = only at the end
    keep: int = 2  # newest checkpoints kept
    resume: Annotated[str | None, short("--resume")] = None  # a run directory to continue
    auto_resume: bool = False  # continue log.run_dir from its checkpoint if it has one, else start it: what a restarted job needs


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    engine: EngineSection = field(default_factory=EngineSection)
    log: LogSection = field(default_factory=LogSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


class ConfigError(UserError, ValueError):
    pass


def _field_types(section) -> dict[str, type]:
    hints = typing.get_type_hints(type(section))
    return {f.name: hints[f.name] for f in dataclasses.fields(section)}


def _parse_string(text: str, annotation, where: str):
    """Command-line text to a typed value: "3e-4" -> 0.0003, "true" -> True, "null" -> None."""
    if text.lower() in ("null", "none", "~"):
        return None
    if annotation is bool:
        if text.lower() in ("true", "yes", "1", "on"):
            return True
        if text.lower() in ("false", "no", "0", "off"):
            return False
    else:
        try:
            return annotation(text)
        except ValueError:
            pass
    raise ConfigError(f"{where} must be {annotation.__name__}, got {text!r}")


def _coerce(value, annotation, where: str):
    """Check and convert one value against a field's annotation (str | None, int, bool, a Literal ...)."""
    args, nullable = typing.get_args(annotation), False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        annotation, nullable = next(a for a in args if a is not type(None)), True
        args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Literal:
        if value not in args:
            raise ConfigError(f"{where} must be one of {', '.join(('null',) * nullable + args)}, got {value!r}")
        return value
    if isinstance(value, str) and annotation is not str:
        value = _parse_string(value, annotation, where)
    if value is None:
        raise ConfigError(f"{where} must not be empty")
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if annotation is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    ok = isinstance(value, annotation) and not (annotation is int and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{where} must be {annotation.__name__}, got {value!r}")
    return value


def set_value(cfg: Config, dotted: str, value) -> None:
    section_name, _, key = dotted.partition(".")
    sections = [f.name for f in dataclasses.fields(cfg)]
    if section_name not in sections or not key:
        raise ConfigError(f"unknown config key {dotted!r}; sections are: {', '.join(sections)}")
    section = getattr(cfg, section_name)
    types_ = _field_types(section)
    if key not in types_:
        valid = ", ".join(f"{section_name}.{k}" for k in types_)
        raise ConfigError(f"unknown config key {dotted!r}; valid keys: {valid}")
    setattr(section, key, _coerce(value, types_[key], dotted))


def apply_dict(cfg: Config, data: dict, source: str = "config") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    sections = [f.name for f in dataclasses.fields(cfg)]
    for section_name, values in data.items():
        if section_name not in sections:  # also when empty: a misspelt section's keys were meant for another
            raise ConfigError(f"{source}: unknown config section {section_name!r}; sections are: {', '.join(sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section_name!r} must be a mapping")
        for key, value in values.items():
            try:
                set_value(cfg, f"{section_name}.{key}", value)
            except ConfigError as e:  # a file's mistake names the file, so the user knows which one to edit
                raise ConfigError(f"{source}: {e}") from None


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{at}: {what}") from e


def validate(cfg: Config) -> None:
    from gpt2_scale.zoo import ModelConfig

    try:
        model = ModelConfig.from_name(cfg.model.name)
    except ValueError as e:  # unknown names list the valid ones
        raise ConfigError(f"model.name: {e}") from None
    for section in dataclasses.fields(cfg):  # types and choices of a config built in code, as for YAML and argv
        values = getattr(cfg, section.name)
        for key, annotation in _field_types(values).items():
            _coerce(getattr(values, key), annotation, f"{section.name}.{key}")
    positive = {
        "train.micro_batch": cfg.train.micro_batch,
        "train.seq_len": cfg.train.seq_len,
        "train.total_batch_tokens": cfg.train.total_batch_tokens,
        "train.max_steps": cfg.train.max_steps,
        "optim.lr": cfg.optim.lr,
        "log.log_every": cfg.log.log_every,
        "log.val_tokens": cfg.log.val_tokens,
    }
    optim, log = cfg.optim, cfg.log
    positive |= {"optim.eps": optim.eps, "optim.decay_steps": optim.decay_steps or 1}
    if log.sample_every:  # what sampling needs, checked before a run writes rather than at its first sample
        positive |= {"log.num_samples": log.num_samples, "log.sample_tokens": log.sample_tokens}
        if not log.sample_prompt:
            raise ConfigError("log.sample_prompt is empty; give a prompt, or turn sampling off with --log.sample_every=0")
    if log.hellaswag_limit is not None:
        positive["log.hellaswag_limit"] = log.hellaswag_limit
    if log.peak_tflops is not None:
        positive["log.peak_tflops"] = log.peak_tflops
    for key, value in positive.items():
        if not value > 0 or value == math.inf:  # NaN fails every comparison
            raise ConfigError(f"{key} must be > 0 and finite, got {value}")
    if problem := model.context_problem(cfg.train.seq_len, "train.seq_len"):  # before the batch arithmetic, whose advice would keep it
        raise ConfigError(problem)
    non_negative = {key: _get(cfg, key) for key in ("engine.loss_chunk", "optim.warmup_steps", "optim.weight_decay", "optim.grad_clip",
                                                    "train.seed", "data.seed", "log.val_every", "log.sample_every",
                                                    "log.hellaswag_every", "checkpoint.every")}
    for key, value in non_negative.items():
        if not value >= 0 or value == math.inf:
            raise ConfigError(f"{key} must be >= 0 and finite, got {value}")
    if cfg.train.seed >= SEED_LIMIT:
        raise ConfigError(f"train.seed must be < 2**32 (numpy's and Python's generators are seeded with it), got {cfg.train.seed}")
    for key, value in (("optim.beta1", optim.beta1), ("optim.beta2", optim.beta2)):
        if not 0 <= value < 1:
            raise ConfigError(f"{key} must be in [0, 1), got {value}")
    if not 0 <= optim.min_lr_ratio <= 1:
        raise ConfigError("optim.min_lr_ratio must be in [0, 1]")
    if cfg.engine.offload and cfg.engine.name == "ddp":
        raise ConfigError("engine.offload: ddp keeps its optimizer state on the device; use --engine zero1/zero2/zero3 or fsdp with it")
    for key in ("log.run_dir", "checkpoint.resume"):
        if _get(cfg, key) == "":
            raise ConfigError(f"{key} is an empty string (an unset shell variable?); give a directory" +
                              (", or leave --resume out to start a run" if key == "checkpoint.resume" else ""))
    if cfg.checkpoint.keep < 1:
        raise ConfigError("checkpoint.keep must be >= 1")


def _get(cfg: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def grad_accum_steps(cfg: Config, world_size: int) -> int:
    """Micro-steps per optimizer step: total batch / (micro-batch x sequence x ranks), which must divide."""
    train = cfg.train
    per_micro = train.micro_batch * train.seq_len * world_size
    if train.total_batch_tokens % per_micro:
        sequences = train.total_batch_tokens // train.seq_len  # per step, over all ranks
        fits = [m for m in range(train.micro_batch, 0, -1) if train.total_batch_tokens % (m * train.seq_len * world_size) == 0]
        fixes = [f"--micro-batch {fits[0]}"] if fits else []
        if not cfg.checkpoint.resume:  # a resumed run keeps its batch: its schedule and data position depend on it
            fixes.append(f"--total-batch-tokens {max(1, train.total_batch_tokens // per_micro) * per_micro}")
        fixes = " or ".join(fixes) or f"a number of ranks that divides its {sequences} sequences per step"
        raise ConfigError(
            f"train.total_batch_tokens ({train.total_batch_tokens}) is not divisible by micro_batch x seq_len x "
            f"world_size = {train.micro_batch} x {train.seq_len} x {world_size} = {per_micro}; use {fixes}"
        )
    return train.total_batch_tokens // per_micro


def config_from_yaml_file(path: str | Path) -> Config:
    """The resolved config a run saved (``RUN_DIR/config.yaml``)."""
    data = load_yaml(path)
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict) or "name" not in data["model"]:
        raise ConfigError(f"{path} holds no model.name, as every run's saved config does: it is damaged; restore it from "
                          "the \"config\" of a checkpoint's meta.json (without it a resume would take the recipe's defaults)")
    cfg = Config()
    try:
        apply_dict(cfg, data, str(path))
    except ConfigError as e:  # flags cannot mend a saved file: say which one to edit
        raise ConfigError(f"{e} (a run saved by another version of gpt2-scale? edit that key in {path}; each checkpoint's "
                          "meta.json holds the config it was saved with)") from None
    return cfg
