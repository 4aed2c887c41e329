import dataclasses
import json
import re
from pathlib import Path

import pytest

from gpt2_scale import checkpoint
from gpt2_scale.cli import parse_args
from gpt2_scale.config import Config, ConfigError, OptimSection, config_from_yaml_file, grad_accum_steps, validate
from gpt2_scale.engines.deepspeed import fill_auto
from gpt2_scale.model import GPT
from gpt2_scale.optim import lr_at, param_groups, schedule_warning
from gpt2_scale.resume import AUTO_RESUME_MAY_CHANGE, check_run_dir, find_checkpoint
from gpt2_scale.train import resolve_config
from gpt2_scale.zoo import ModelConfig


def test_shortcuts_overrides_and_yaml_precedence(tmp_path):
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 1.0e-3\ntrain:\n  max_steps: 7\n")
    cfg = parse_args(Config(), ["--config", str(tmp_path / "c.yaml"), "--model", "gpt2-tiny", "--seq-len", "256", "--optim.lr=3e-4",
                                "--engine", "zero3"])
    assert (cfg.model.name, cfg.optim.lr, cfg.train.max_steps, cfg.engine.name) == ("gpt2-tiny", 3e-4, 7, "zero3")
    assert Config().optim.lr == 6e-4  # defaults untouched


def test_deepspeed_launcher_local_rank_is_accepted():
    assert parse_args(Config(), ["--local_rank=1", "--max-steps", "3"]).train.max_steps == 3


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--optim.lrr=1"], "Perhaps you meant:.*--optim.lr "),
        (["--nope", "1"], "Unrecognized options: --nope"),
        (["--train.micro_batch=abc"], "Error parsing --micro-batch/--train.micro-batch"),
        (["--engine", "zero4"], "invalid choice 'zero4'.*'ddp', 'fsdp'"),
        (["--max-steps"], "--max-steps"),
        (["stray"], "Unrecognized options: stray"),
        (["--engine.compile_scope=layer"], "invalid choice 'layer'.*'block', 'model'"),
        (["--engine.compile_mode=cudagraphs"], "compile-mode.*reduce-overhead"),
        (["--log.tensorboard=maybe"], "expected true or false, got 'maybe'"),
    ],
)
def test_bad_flags_exit_2_naming_the_fix(argv, match, capsys):
    """tyro refuses what the types say is wrong: unknown flags (with the nearest valid ones), bad values, choices."""
    with pytest.raises(SystemExit) as e:
        parse_args(Config(), argv)
    assert e.value.code == 2
    assert re.search(match, " ".join(capsys.readouterr().err.split()), re.S), match


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--model", "gpt9"], "valid names"),
        (["--train.micro_batch=0"], "must be > 0 and finite"),
        (["--lr", "nan"], "optim.lr must be > 0 and finite, got nan"),
        (["--lr", "inf"], "optim.lr must be > 0 and finite, got inf"),
        (["--optim.eps=0"], "optim.eps must be"),
        (["--optim.decay_steps=-5"], "optim.decay_steps must be"),
        (["--optim.grad_clip=-1"], "optim.grad_clip must be >= 0 and finite"),  # would flip every gradient
        (["--optim.weight_decay=nan"], "optim.weight_decay must be"),
        (["--optim.beta1=1.5"], r"optim.beta1 must be in \[0, 1\)"),
        (["--optim.beta2=nan"], "optim.beta2 must be in"),
        (["--seed", "-1"], "train.seed must be"),
        (["--seed", str(2**32)], r"train.seed must be < 2\*\*32"),
        (["--data.seed=-1"], "data.seed must be"),
        (["--log.num_samples=0"], "log.num_samples must be"),
        (["--log.sample_prompt="], "sample_prompt is empty.*--log.sample_every=0"),
        (["--engine.offload=true"], "ddp keeps its optimizer state on the device"),
        (["--run-dir="], "log.run_dir is an empty string"),
        (["--resume="], "checkpoint.resume is an empty string.*leave --resume out"),
        (["--config", "/does/not/exist.yaml"], "does not exist"),
        (["--config"], "--config needs a value"),
        (["--log.peak_tflops=nan"], "log.peak_tflops must be > 0 and finite, got nan"),  # would log "mfu": NaN
        (["--log.peak_tflops=-1"], "log.peak_tflops must be > 0"),
        (["--log.hellaswag_every=0", "--log.hellaswag_limit=-5"], "log.hellaswag_limit must be > 0"),
        (["--model", "gpt2-tiny", "--seq-len", "512"], "train.seq_len 512 exceeds gpt2-tiny's context length 256"),
    ],
)
def test_bad_configs_name_the_fix(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_args(Config(), argv)


def test_yaml_values_are_checked_against_the_same_types_naming_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("engine:\n  name: zero4\n")
    with pytest.raises(ConfigError, match=f"^{path}: engine.name must be one of ddp, fsdp, zero1, zero2, zero3, got 'zero4'"):
        parse_args(Config(), ["--config", str(path)])
    path.write_text("trian: {}\n")  # a misspelt section, left empty or not
    with pytest.raises(ConfigError, match=f"^{path}: unknown config section 'trian'; sections are: model, data, train"):
        parse_args(Config(), ["--config", str(path)])
    path.write_text("train:\n  micro_bach: 4\n")
    with pytest.raises(ConfigError, match=f"^{path}: unknown config key 'train.micro_bach'; valid keys: train.micro_batch"):
        parse_args(Config(), ["--config", str(path)])
    cfg = Config()
    cfg.engine.compile_mode = "cudagraphs"  # a config built in code is checked too
    with pytest.raises(ConfigError, match="engine.compile_mode must be one of null, default, reduce-overhead"):
        validate(cfg)


def test_help_lists_every_field_with_its_default_and_meaning(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(Config(), ["--help"], "The tiny recipe.")
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.count("The tiny recipe.") == 1 and "--config FILE.yaml" in out
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory()):
            flag = f"--{section.name}.{f.name.replace('_', '-')}"  # tyro shows hyphens and accepts either
            assert flag in out, flag
    assert "--micro-batch" in out and "2^19 tokens per optimizer step" in out and "(default: 524288)" in out


def test_yaml_round_trip(tmp_path):
    cfg = parse_args(Config(), ["--model", "gpt2-tiny", "--seq-len", "256", "--engine.compile=false", "--checkpoint.resume=null",
                                "--engine.compile_scope=model", "--engine.compile_mode=reduce-overhead"])
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    assert config_from_yaml_file(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("content", ["", "train:\n  max_steps: 3\n", "- 1\n"])
def test_a_saved_config_without_its_model_is_refused_not_filled_with_defaults(tmp_path, content):
    path = tmp_path / "config.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=f"{path} holds no model.name, as every run's saved config does: it is damaged"):
        config_from_yaml_file(path)


def test_a_saved_config_with_a_key_this_version_lacks_says_which_file_to_edit(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("model:\n  name: gpt2-tiny\ntrain:\n  grad_accum: 4\n")
    with pytest.raises(ConfigError, match=f"^{path}: unknown config key 'train.grad_accum'.*another version of gpt2-scale\\? edit "
                                          f"that key in {path}"):
        config_from_yaml_file(path)


def test_grad_accum_from_total_batch():
    cfg = Config()
    assert grad_accum_steps(cfg, 8) == 1 and grad_accum_steps(cfg, 1) == 8  # 2^19 / (64 * 1024 * world)
    cfg.train.total_batch_tokens = 500_000
    with pytest.raises(ConfigError, match="not divisible.*; use --total-batch-tokens 458752$"):
        grad_accum_steps(cfg, 1)
    cfg.train.total_batch_tokens, cfg.train.micro_batch = 2**19, 48  # 512 sequences a step, 64 per rank on 8
    with pytest.raises(ConfigError, match="48 x 1024 x 8 = 393216; use --micro-batch 32 or --total-batch-tokens 393216$"):
        grad_accum_steps(cfg, 8)
    cfg.checkpoint.resume = "run"  # a resumed run keeps its total batch: no advice to change it
    with pytest.raises(ConfigError, match="= 393216; use --micro-batch 32$"):
        grad_accum_steps(cfg, 8)
    with pytest.raises(ConfigError, match="; use a number of ranks that divides its 512 sequences per step$"):
        grad_accum_steps(cfg, 3)


def test_lr_schedule_warmup_cosine_floor():
    o = OptimSection(lr=6e-4, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, o, 100) == pytest.approx(6e-5)
    assert lr_at(9, o, 100) == pytest.approx(6e-4)
    assert lr_at(55, o, 100) == pytest.approx(6e-5 + 0.5 * (6e-4 - 6e-5))  # half way down the cosine
    assert lr_at(100, o, 100) == lr_at(500, o, 100) == pytest.approx(6e-5)
    assert all(lr_at(s, o, 100) >= lr_at(s + 1, o, 100) for s in range(10, 120))


def test_a_schedule_that_never_leaves_its_warmup_is_named():
    o = OptimSection(lr=6e-4, warmup_steps=715)  # the 124M recipe's
    assert schedule_warning(o, 19_073) is None
    assert schedule_warning(o, 50).startswith("warning: optim.warmup_steps 715 >= the schedule's length 50 ")
    assert schedule_warning(OptimSection(warmup_steps=50), 50) is not None  # warmup ends where the cosine would: none left
    assert schedule_warning(OptimSection(warmup_steps=10, decay_steps=100), 5) is None  # a longer schedule, run in parts
    assert schedule_warning(OptimSection(warmup_steps=0), 1) is None
    shorter = schedule_warning(OptimSection(lr=6e-4, warmup_steps=10, decay_steps=20), 120)  # a template's, or an extension
    assert shorter.startswith("note: the cosine ends at step 20") and "last 100 steps train at the final learning rate 6e-05" in shorter
    assert shorter.endswith("pass --optim.decay_steps=120 to spread it over the whole run")


def test_weight_decay_only_on_matrices():
    model = GPT(ModelConfig.from_name("gpt2-tiny"))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    n_layer = model.config.n_layer
    assert len(decay["params"]) == 2 + 4 * n_layer  # wte (tied lm_head once), wpe, 4 matmuls per block
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params()


def test_deepspeed_auto_fields_filled_and_conflicts_refused():
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": 1.0, "optimizer": {"params": {"lr": "auto"}}}
    out = fill_auto(ds, {"train_micro_batch_size_per_gpu": 8, "gradient_clipping": 1.0, "optimizer.params.lr": 3e-4})
    assert out == {"train_micro_batch_size_per_gpu": 8, "gradient_clipping": 1.0, "optimizer": {"params": {"lr": 3e-4}}}
    with pytest.raises(ConfigError, match="gradient_clipping=1.0 but the run config implies 0.5"):
        fill_auto(ds, {"train_micro_batch_size_per_gpu": 8, "gradient_clipping": 0.5, "optimizer.params.lr": 3e-4})
    with pytest.raises(ConfigError, match="no value"):
        fill_auto({"mystery": "auto"}, {})
    # What the JSON leaves out is ours as well: a JSON of DeepSpeed's own settings alone is a whole config.
    ours = {"train_batch_size": 16, "bf16.enabled": True, "optimizer.params.lr": 3e-4}
    assert fill_auto({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}, ours) == {
        "zero_optimization": {"stage": 2}, "train_batch_size": 16, "bf16": {"enabled": True}, "optimizer": {"type": "AdamW", "params": {"lr": 3e-4}}}
    with pytest.raises(ConfigError, match="field bf16 must be a JSON object, got True"):
        fill_auto({"bf16": True}, ours)


def test_a_deepspeed_config_that_enables_fp16_is_refused(tmp_path):
    from gpt2_scale.engines.deepspeed import read_ds_config

    path = tmp_path / "ds.json"
    path.write_text('{"fp16": {"enabled": true}, "zero_optimization": {"stage": 1}}')
    with pytest.raises(ConfigError, match=f"{path} enables fp16.*remove its fp16 section"):
        read_ds_config(path)


def test_deepspeed_memory_efficient_linear_is_refused(tmp_path):
    """It replaces torch.nn.functional.linear process-wide, which compiled code (torch 2.11) gives no weight gradient."""
    from gpt2_scale.engines.deepspeed import read_ds_config

    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 3, "memory_efficient_linear": true}}')
    with pytest.raises(ConfigError, match=f"{path} sets zero_optimization.memory_efficient_linear.*remove it"):
        read_ds_config(path)


@pytest.mark.parametrize("value", ['"auto"', "null", '"lots"', "-1", "true"])
def test_a_deepspeed_bucket_size_that_is_not_a_number_is_refused(tmp_path, value):
    """The memory estimate reads these two sizes without DeepSpeed's validation, so the JSON reader checks them."""
    from gpt2_scale.engines.deepspeed import read_ds_config

    path = tmp_path / "ds.json"
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size"):
        path.write_text(f'{{"zero_optimization": {{"stage": 3, "{key}": {value}}}}}')
        with pytest.raises(ConfigError, match=f"{path} sets zero_optimization.{key} to .*a number of elements"):
            read_ds_config(path)
    path.write_text('{"zero_optimization": {"reduce_bucket_size": 5e8, "stage3_prefetch_bucket_size": 50000000}}')
    assert read_ds_config(path)["zero_optimization"]["reduce_bucket_size"] == 5e8


def test_a_field_deepspeed_refuses_is_one_error_line_naming_the_json(tmp_path, monkeypatch):
    """DeepSpeed validates its JSON with pydantic inside deepspeed.initialize; its error becomes a ConfigError."""
    import deepspeed
    import torch
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from gpt2_scale import engines
    from gpt2_scale.distributed import DistEnv

    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 1, "stage3_max_live_parameters": "lots"}}')
    cfg = parse_args(Config(), ["--model", "gpt2-tiny", "--engine", "zero1", f"--engine.ds_config={path}", "--engine.compile=false",
                                "--micro-batch", "1", "--seq-len", "16", "--total-batch-tokens", "16"])

    def initialize(config, **_):  # what DeepSpeed's own initialize does first with the JSON's zero section
        DeepSpeedZeroConfig(**config["zero_optimization"])

    monkeypatch.setattr(deepspeed, "initialize", initialize)
    engine = engines.build(cfg, DistEnv(0, 0, 1, torch.device("cpu")))
    with pytest.raises(ConfigError, match=f"DeepSpeed refused its config \\({re.escape(str(path))}\\).*stage3_max_live_parameters: Input should be"):
        engine.setup(GPT(ModelConfig.from_name("gpt2-tiny")))


@pytest.mark.parametrize("engine", ["zero1", "zero2", "zero3"])
@pytest.mark.parametrize("offload", [False, True])
def test_deepspeed_default_configs_are_package_data(engine, offload):
    """Every ZeRO engine's default JSON ships inside the package (so any install finds it) and fills from the config."""
    import torch

    from gpt2_scale.distributed import DistEnv
    from gpt2_scale.engines.deepspeed import build_ds_config, default_ds_config_path

    flags = ["--engine", engine, f"--engine.offload={str(offload).lower()}", "--micro-batch", "4", "--seq-len", "64"]
    cfg = parse_args(Config(), flags + ["--total-batch-tokens", "512"])
    path = default_ds_config_path(cfg)
    assert path.parent.name == "ds_configs" and path.parent.parent.name == "gpt2_scale"
    ds = build_ds_config(cfg, DistEnv(0, 0, 1, torch.device("cpu")), bf16=False)
    assert ds["zero_optimization"]["stage"] == int(engine[-1]) and ds["gradient_accumulation_steps"] == 2
    assert ("offload_optimizer" in ds["zero_optimization"]) == offload
    assert ds["zero_optimization"]["memory_efficient_linear"] is False  # DeepSpeed's default is on: see build_ds_config


def test_overlap_comm_auto_is_on_across_ranks_and_off_for_one():
    """The shipped ZeRO-2 JSON's overlap_comm is "auto": with one rank there is nothing to overlap, and DeepSpeed's
    waits for its side stream cost ZeRO-2 a seventh of its step on an H100; a value the JSON sets is kept."""
    import torch

    from gpt2_scale.distributed import DistEnv
    from gpt2_scale.engines.deepspeed import build_ds_config, resolve_overlap_comm

    ds = {"zero_optimization": {"stage": 2, "overlap_comm": "auto"}}
    assert resolve_overlap_comm(ds, 1)["zero_optimization"] == {"stage": 2, "overlap_comm": False}
    assert resolve_overlap_comm(ds, 8)["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert ds["zero_optimization"]["overlap_comm"] == "auto"  # the JSON read is not changed
    for value in (True, False):
        assert resolve_overlap_comm({"zero_optimization": {"overlap_comm": value}}, 1)["zero_optimization"]["overlap_comm"] is value
    assert resolve_overlap_comm({"bf16": {"enabled": "auto"}}, 1) == {"bf16": {"enabled": "auto"}}

    def built(engine: str, world: int):
        cfg = parse_args(Config(), ["--engine", engine, "--micro-batch", "4", "--seq-len", "64", "--total-batch-tokens", str(256 * world)])
        return build_ds_config(cfg, DistEnv(0, 0, world, torch.device("cpu")), bf16=False)["zero_optimization"].get("overlap_comm")

    assert (built("zero2", 1), built("zero2", 2)) == (False, True)
    assert (built("zero3", 1), built("zero1", 1)) == (True, None)  # zero3's JSON sets it; zero1's leaves DeepSpeed's off


def test_deepspeed_reads_an_arch_list_with_suffixes_as_plain_archs(monkeypatch):
    """CUDA images set TORCH_CUDA_ARCH_LIST entries such as 9.0a, which DeepSpeed 0.19's JIT builder cannot parse
    (seen on an H200: FusedAdam failed to build for every ZeRO stage); the builder sees the plain archs."""
    import os

    from gpt2_scale.engines.deepspeed import arch_list_deepspeed_reads, plain_arch_list

    assert plain_arch_list("9.0a") == "9.0"
    assert plain_arch_list("8.0 9.0;9.0a 10.0f+PTX") == "8.0;9.0;10.0+PTX"
    assert plain_arch_list("8.6;9.0+PTX") == "8.6;9.0+PTX"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    with arch_list_deepspeed_reads():
        assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0"
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0a"


# --- checkpoint.auto_resume: the decision, on run directories laid out as the trainer leaves them ---

RECIPE = Config()  # a recipe's defaults
RECIPE.model.name, RECIPE.train.micro_batch, RECIPE.train.seq_len, RECIPE.train.total_batch_tokens = "gpt2-tiny", 2, 32, 64


def saved_run(run_dir: Path, argv: list[str], step: int | None = 4) -> Config:
    """A run directory as a run started with ``argv`` leaves it: config.yaml, metrics, and a checkpoint at ``step``."""
    cfg = resolve_config(RECIPE, argv + ["--run-dir", str(run_dir)])
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    (run_dir / "metrics.jsonl").write_text('{"step": 0, "train_loss": 10.0}\n')
    if step is not None:
        path = checkpoint.checkpoints_root(run_dir) / f"step_{step:08d}"
        path.mkdir(parents=True)
        (path / "meta.json").write_text(json.dumps({"model": cfg.model.name, "engine": cfg.engine.name, "step": step, "world_size": 1}))
        (path.parent / checkpoint.LATEST).write_text(path.name)
    return cfg


AUTO = ["--checkpoint.auto_resume=true", "--lr", "1e-3", "--max-steps", "10"]


def test_auto_resume_continues_a_run_with_a_checkpoint_as_resume_does(tmp_path):
    run_dir = tmp_path / "run"
    saved = saved_run(run_dir, AUTO)
    # The same command again; or with what a restart may change: its length, logging and checkpoint cadence.
    assert resolve_config(RECIPE, AUTO + ["--run-dir", str(run_dir)]).checkpoint.resume == str(run_dir)
    more = AUTO + ["--run-dir", str(run_dir), "--max-steps", "20", "--checkpoint.every=2", "--log.val_every=5", "--engine.compile=false",
                   "--micro-batch", "1"]  # a requeue onto more ranks, whose count does not divide the old micro-batch's
    cfg = resolve_config(RECIPE, more)
    assert cfg.checkpoint.resume == cfg.log.run_dir == str(run_dir)
    assert (cfg.train.max_steps, cfg.checkpoint.every, cfg.log.val_every, cfg.train.micro_batch) == (20, 2, 5, 1)
    assert cfg.optim.decay_steps == saved.optim.decay_steps == 10  # the schedule the run started with, as --resume keeps it
    assert cfg.optim.lr == 1e-3


@pytest.mark.parametrize(
    "change,match",
    [
        (["--lr", "3e-4"], "holds a run with optim.lr=0.001, this command sets optim.lr=0.0003; run it with --optim.lr=0.001 to continue"),
        (["--engine", "fsdp", "--seed", "7"], "train.seed=1337, this command sets train.seed=7 \\(also changed: engine.name\\)"),
        (["--optim.decay_steps=20"], "optim.decay_steps=10, this command sets optim.decay_steps=20"),
        (["--data", "elsewhere"], "data.dir=default, this command sets data.dir=elsewhere"),
    ],
)
def test_auto_resume_refuses_a_command_that_changes_the_run_in_one_line(tmp_path, change, match):
    run_dir = tmp_path / "run"
    saved_run(run_dir, AUTO + ["--model.pad_vocab=false"])
    with pytest.raises(ConfigError, match=match) as e:
        resolve_config(RECIPE, AUTO + ["--model.pad_vocab=false", "--run-dir", str(run_dir)] + change)
    assert "\n" not in str(e.value) and f"--resume {run_dir} to continue it changed" in str(e.value)
    assert "another --run-dir" in str(e.value)


@pytest.mark.parametrize("change,match", [
    (["--lr", "3e-4", "--seq-len", "16"], "train.seq_len=32, this command sets train.seq_len=16 \\(also changed: optim.lr\\); run it "
                                          "with --train.seq_len=32 to continue the run, or with another --run-dir"),
    (["--model.pad_vocab=false"], "model.pad_vocab=true, this command sets model.pad_vocab=false; run it with --model.pad_vocab=true"),
])
def test_auto_resume_offers_no_resume_for_a_setting_the_checkpoint_depends_on(tmp_path, change, match):
    """--resume continues a run changed, but not in model, seq_len, total batch or data seed: named first, no --resume."""
    run_dir = tmp_path / "run"
    saved_run(run_dir, AUTO)
    with pytest.raises(ConfigError, match=match) as e:
        resolve_config(RECIPE, AUTO + ["--run-dir", str(run_dir)] + change)
    assert "--resume" not in str(e.value)


def test_auto_resume_checks_a_config_file_as_the_flags(tmp_path):
    run_dir = tmp_path / "run"
    saved_run(run_dir, AUTO)
    (tmp_path / "c.yaml").write_text("optim:\n  weight_decay: 0.0\n")
    with pytest.raises(ConfigError, match="optim.weight_decay=0.1, this command sets optim.weight_decay=0.0"):
        resolve_config(RECIPE, AUTO + ["--run-dir", str(run_dir), "--config", str(tmp_path / "c.yaml")])


def test_resume_wins_over_auto_resume_and_takes_the_change(tmp_path):
    run_dir = tmp_path / "run"
    saved_run(run_dir, AUTO)
    cfg = resolve_config(RECIPE, AUTO + ["--resume", str(run_dir), "--lr", "3e-4"])
    assert cfg.checkpoint.resume == str(run_dir) and cfg.optim.lr == 3e-4


def test_resume_refuses_another_run_dir_and_names_the_run_of_a_checkpoint_path(tmp_path):
    run_dir = tmp_path / "run"
    saved_run(run_dir, AUTO)
    with pytest.raises(ConfigError, match=f"--resume continues {run_dir} in place.*--run-dir names {tmp_path / 'new'}; drop --run-dir"):
        resolve_config(RECIPE, ["--resume", str(run_dir), "--run-dir", str(tmp_path / "new")])  # else trained in run_dir silently
    assert resolve_config(RECIPE, ["--resume", str(run_dir), "--run-dir", f"{run_dir}/."]).log.run_dir == str(run_dir)
    step = checkpoint.latest(run_dir)
    with pytest.raises(ConfigError, match=f"--resume {step}: not a run directory .*; pass the run's directory, {run_dir} "):
        resolve_config(RECIPE, ["--resume", str(step)])


def test_a_run_that_never_logged_a_training_step_is_started_again_there(tmp_path):
    """One that ran out of memory at its first step, say: rerun with a smaller micro-batch, it is the same run."""
    run_dir = tmp_path / "run"
    saved_run(run_dir, [], step=None)
    cfg = resolve_config(RECIPE, ["--run-dir", str(run_dir), "--micro-batch", "1"])
    for metrics in ("", '{"step": 0, "val_loss": 10.9}\n{"step": 0, "train_lo', None):  # a val record, a line cut off by a kill
        if metrics is None:
            (run_dir / "metrics.jsonl").unlink()
        else:
            (run_dir / "metrics.jsonl").write_text(metrics)
        assert check_run_dir(cfg) == run_dir
    for trained in ('{"step": 0, "train_loss": 10.9}\n', '{"step": 250, "val_loss": 6.1}\n'):  # log_every may be larger than val_every
        (run_dir / "metrics.jsonl").write_text('{"step": 0, "val_loss": 10.9}\n' + trained)
        with pytest.raises(ConfigError, match=f"already holds a run .*it has no checkpoint to resume: delete {run_dir} to start over"):
            check_run_dir(cfg)
    resume = resolve_config(RECIPE, ["--resume", str(run_dir)])
    with pytest.raises(checkpoint.CheckpointError, match=f"no checkpoint there yet; delete {run_dir} and start it again without --resume"):
        find_checkpoint(resume, 1)
    (run_dir / "metrics.jsonl").write_text("")
    with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint there yet; start it again without --resume$"):
        find_checkpoint(resume, 1)


def test_auto_resume_without_a_checkpoint_starts_the_run_again_there(tmp_path):
    run_dir = tmp_path / "run"
    saved_run(run_dir, AUTO, step=None)
    (checkpoint.checkpoints_root(run_dir) / ".tmp-step_00000002").mkdir(parents=True)  # a first save that was killed
    cfg = resolve_config(RECIPE, AUTO + ["--run-dir", str(run_dir), "--lr", "3e-4"])  # nothing saved depends on the settings
    assert cfg.checkpoint.resume is None and cfg.optim.lr == 3e-4
    assert check_run_dir(cfg) == run_dir
    cfg.checkpoint.auto_resume = False  # without it, as before: refused
    with pytest.raises(ConfigError, match="already holds a run"):
        check_run_dir(cfg)
    cfg.checkpoint.auto_resume = True
    (run_dir / "summary.json").write_text("{}")  # a finished run whose checkpoints are gone is not restarted over
    with pytest.raises(ConfigError, match="already holds a run .*summary.json"):
        check_run_dir(cfg)


def test_a_run_directory_that_cannot_be_written_is_refused_before_training(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        check_run_dir(resolve_config(RECIPE, ["--run-dir", str(tmp_path / "file")]))
    with pytest.raises(ConfigError, match=f"{tmp_path / 'file'} is a file, where run directory {tmp_path / 'file' / 'run'} needs a directory"):
        check_run_dir(resolve_config(RECIPE, ["--run-dir", str(tmp_path / "file" / "run")]))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("x")  # not a permission to fix
    with pytest.raises(ConfigError, match=f"{tmp_path / 'run' / 'checkpoints'} is a file, .*move it out of the way"):
        check_run_dir(resolve_config(RECIPE, ["--run-dir", str(tmp_path / "run")]))
    assert check_run_dir(resolve_config(RECIPE, ["--run-dir", str(tmp_path / "new" / "run")])) == tmp_path / "new" / "run"


def test_without_auto_resume_a_run_directory_is_refused_as_before(tmp_path):
    run_dir = tmp_path / "run"
    saved_run(run_dir, ["--lr", "1e-3"])
    cfg = resolve_config(RECIPE, ["--lr", "1e-3", "--run-dir", str(run_dir)])
    assert cfg.checkpoint.resume is None
    with pytest.raises(ConfigError, match=f"continue it with --resume {run_dir}"):
        check_run_dir(cfg)
    cfg.checkpoint.auto_resume = True  # a Config built in code skips resolve_config: never started over a checkpoint
    with pytest.raises(ConfigError, match="already holds a run"):
        check_run_dir(cfg)
    for inside in (run_dir / "checkpoints" / "step_00000002", run_dir / "sweep" / "lr3"):  # a copied checkpoint path, a nest
        with pytest.raises(ConfigError, match=f"{inside} is inside the run {run_dir}, .*choose a directory outside it"):
            check_run_dir(resolve_config(RECIPE, ["--run-dir", str(inside)]))


@pytest.mark.parametrize("content,why", [("step_00000099", "names 'step_00000099', which is not a complete checkpoint"), ("", "is empty"),
                                         ("../run", "names '../run', which is not a complete checkpoint"),
                                         (None, r"cannot be read \(IsADirectoryError\)")])
def test_auto_resume_with_a_broken_latest_pointer_is_one_error_listing_the_checkpoints(tmp_path, content, why):
    run_dir = tmp_path / "run"
    saved_run(run_dir, AUTO)
    pointer = checkpoint.checkpoints_root(run_dir) / checkpoint.LATEST
    if content is None:
        pointer.unlink()
        pointer.mkdir()
    else:
        pointer.write_text(content)
    fix = r"write the name of a complete step_\* directory into it \(step_00000004 is one\)"
    with pytest.raises(checkpoint.CheckpointError, match=f"latest {why}; {fix}"):
        resolve_config(RECIPE, AUTO + ["--run-dir", str(run_dir)])


def test_without_its_latest_pointer_a_run_resumes_from_its_newest_checkpoint(tmp_path):
    """A save killed between renaming its directory into place and writing `latest`: that checkpoint is complete."""
    run_dir = tmp_path / "run"
    saved_run(run_dir, AUTO)
    (checkpoint.checkpoints_root(run_dir) / checkpoint.LATEST).unlink()
    assert checkpoint.latest(run_dir).name == "step_00000004"
    assert resolve_config(RECIPE, AUTO + ["--run-dir", str(run_dir)]).checkpoint.resume == str(run_dir)


def test_what_a_restart_may_change_leaves_what_the_checkpoint_depends_on():
    assert not [key for key in checkpoint.RESUME_KEYS if key in AUTO_RESUME_MAY_CHANGE or f"{key.split('.')[0]}.*" in AUTO_RESUME_MAY_CHANGE]


@pytest.mark.parametrize("content", [b"train:\n  max_steps: [1\n", b"\xac\xed\x00\x05 not text"])
def test_a_config_file_that_is_not_yaml_is_one_line_naming_it(tmp_path, content):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"config file {path} is not valid YAML") as e:
        parse_args(Config(), ["--config", str(path)])
    assert "\n" not in str(e.value)


def test_fsdp_offload_is_refused_off_cuda_before_a_run_starts():
    from gpt2_scale.config import EngineSection
    from gpt2_scale.device import resolve

    with pytest.raises(ConfigError, match="engine.offload with fsdp .* on cpu .* drop --engine.offload"):
        resolve("train", "cpu", EngineSection(name="fsdp", offload=True))
    assert resolve("train", "cpu", EngineSection(name="zero1", offload=True)).device.type == "cpu"  # ZeRO-Offload runs on CPU
