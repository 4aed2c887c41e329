"""The trainer end to end, launched as users launch it: every engine, resume, checkpoints, failures."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from launch import REPO, TINY, command, env, metrics, ok, run

from gpt2_scale import checkpoint
from gpt2_scale.config import Config, ConfigError, config_from_yaml_file
from gpt2_scale.data.loader import TokenLoader
from gpt2_scale.distributed import DistEnv
from gpt2_scale.errors import EXIT_CODE_FILE, exit_code_recorded
from gpt2_scale.fileio import sha256
from gpt2_scale.model import GPT
from gpt2_scale.resume import LOCK
from gpt2_scale.train import EXIT_PREEMPTED
from gpt2_scale.zoo import ModelConfig

ENGINES = ["ddp", "fsdp", "zero1", "zero2", "zero3"]


def test_every_engine_trains_the_same_model_on_two_ranks(corpus, tmp_path):
    # 2 ranks x micro-batch 2 x 32 tokens x 2 micro-steps = 256 tokens per step.
    args = TINY + ["--data", str(corpus), "--max-steps", "4", "--total-batch-tokens", "256", "--lr", "3e-3",
                   "--optim.warmup_steps=1", "--log.val_every=3", "--log.sample_every=2"]
    losses = {}
    n_params = GPT(ModelConfig.from_name("gpt2-tiny", pad_vocab=False)).num_params()
    for engine in ENGINES:
        out = ok(run("recipes/tiny.py", args + ["--engine", engine, "--run-dir", str(tmp_path / engine)], nproc=2))
        assert f"gpt2-tiny ({n_params:,} parameters)" in out, out[:500]  # the whole model, also once ZeRO-3 has sharded it
        assert re.search(r"estimated peak memory per rank: \d+\.\d\d GiB", out), out[:1500]
        samples = [line for line in out.splitlines() if line.startswith("sample 0: ")]
        assert len(samples) == 2 and "Hello, I" in samples[0], out  # at steps 2 and 3, training on between
        losses[engine] = metrics(tmp_path / engine)
        assert len(losses[engine]) == 4 and losses[engine][-1] < losses[engine][0] - 0.3, losses[engine]
        assert len(metrics(tmp_path / engine, "val_loss")) == 2  # steps 0 and 3
    for engine in ENGINES[1:]:
        torch.testing.assert_close(losses[engine], losses["ddp"], rtol=1e-5, atol=0)
    # Full weights gathered from every engine's checkpoint agree as well. Adam divides by sqrt(v): an
    # embedding row whose gradient is at rounding-noise level (a token not in the batch) can take a
    # different step of up to lr, so the bound is one step for single elements and tiny on average.
    ref = checkpoint.load_model(tmp_path / "ddp").state_dict()
    for engine in ENGINES[1:]:
        got = checkpoint.load_model(tmp_path / engine).state_dict()
        for name in ref:
            diff = (got[name] - ref[name]).abs()
            assert diff.max() < 3e-3 and diff.mean() < 1e-6, f"{engine}: {name}: max {diff.max()}, mean {diff.mean()}"


@pytest.mark.parametrize("engine,nproc", [("ddp", 1), ("zero3", 2), ("fsdp", 2)])
def test_resume_continues_exactly(corpus, tmp_path, engine, nproc):
    """--max-steps 3, then --resume --max-steps 6, trains as one run of 6 steps whose cosine ends at step 3."""
    args = TINY + ["--data", str(corpus), "--engine", engine, "--total-batch-tokens", str(128 * nproc),
                   "--log.val_every=0", "--optim.warmup_steps=2", "--checkpoint.every=3"]
    ok(run("recipes/tiny.py", args + ["--max-steps", "6", "--optim.decay_steps=3", "--run-dir", str(tmp_path / "full")], nproc))
    ok(run("recipes/tiny.py", args + ["--max-steps", "3", "--run-dir", str(tmp_path / "part")], nproc))
    out = ok(run("recipes/tiny.py", ["--resume", str(tmp_path / "part"), "--max-steps", "6"], nproc))
    assert "resumed from" in out
    assert metrics(tmp_path / "part") == metrics(tmp_path / "full")  # bitwise, fp32 on CPU
    lrs = metrics(tmp_path / "part", "lr")
    assert lrs == metrics(tmp_path / "full", "lr") and lrs[-3:] == [min(lrs)] * 3, lrs  # at the floor after step 3


@pytest.mark.parametrize("first,then", [(("ddp", 1), ("zero2", 2)), (("zero3", 2), ("fsdp", 1))], ids=["ddp1-zero2x2", "zero3x2-fsdp1"])
def test_a_run_continues_under_another_engine_and_world_size(corpus, tmp_path, first, then):
    """As a user moves a run: 3 steps, then on to step 6 under another engine on another number of ranks. The
    losses are the uninterrupted run's (the same weights, Adam moments and steps, LR schedule and data), and so is
    the validation loss: 6 windows, which 1 and 2 ranks of micro-batch 2 split unevenly."""
    (engine, nproc), (engine2, nproc2) = first, then
    launcher = lambda n: "python" if n == 1 else "torchrun"  # noqa: E731
    args = TINY + ["--data", str(corpus), "--engine", engine, "--total-batch-tokens", "256", "--log.val_every=3",
                   "--log.val_tokens=192", "--optim.warmup_steps=2", "--optim.decay_steps=6", "--checkpoint.every=3"]
    ok(run("recipes/tiny.py", args + ["--max-steps", "6", "--run-dir", str(tmp_path / "full")], nproc, launcher(nproc)))
    ok(run("recipes/tiny.py", args + ["--max-steps", "3", "--run-dir", str(tmp_path / "part")], nproc, launcher(nproc)))
    out = ok(run("recipes/tiny.py", ["--resume", str(tmp_path / "part"), "--engine", engine2, "--max-steps", "6"], nproc2, launcher(nproc2)))
    assert "resumed from" in out and f"engine {engine2}, {nproc2} rank(s)" in out
    assert len(metrics(tmp_path / "part")) == 6
    torch.testing.assert_close(metrics(tmp_path / "part"), metrics(tmp_path / "full"), rtol=1e-5, atol=0)
    for key in ("grad_norm", "lr"):
        torch.testing.assert_close(metrics(tmp_path / "part", key), metrics(tmp_path / "full", key), rtol=1e-5, atol=0)
    val = {name: {r["step"]: r["val_loss"] for r in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
                  if "val_loss" in r} for name in ("part", "full")}
    assert list(val["full"]) == [0, 3, 5] and list(val["part"]) == [0, 2, 3, 5]  # the first attempt's last step validates too
    torch.testing.assert_close([val["part"][s] for s in (0, 3, 5)], list(val["full"].values()), rtol=1e-5, atol=0)


def test_recipes_start_under_their_launchers_and_name_the_prepare_command(corpus, tmp_path):
    args = TINY + ["--data", str(corpus), "--max-steps", "2", "--total-batch-tokens", "128", "--log.val_every=0"]
    ok(run("recipes/124m.py", args + ["--run-dir", str(tmp_path / "ds")], nproc=2, launcher="deepspeed"))
    assert json.loads((tmp_path / "ds" / "summary.json").read_text())["finished"]
    ok(run("recipes/124m_fsdp.py", args + ["--run-dir", str(tmp_path / "fsdp")], nproc=2))
    assert config_from_yaml_file(tmp_path / "fsdp" / "config.yaml").engine.name == "fsdp"
    missing = run("recipes/124m_ddp.py", ["--run-dir", str(tmp_path / "none"), "--data", str(tmp_path / "absent")], launcher="python")
    assert missing.returncode == 2
    assert "python tools/prepare_data.py fineweb-edu --out data/fineweb-edu-10BT" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_bad_runs_fail_clearly_and_keep_what_was_written(corpus, tmp_path):
    run_dir = tmp_path / "run"
    args = TINY + ["--data", str(corpus), "--total-batch-tokens", "64", "--log.val_every=0", "--run-dir", str(run_dir)]
    ok(run("recipes/tiny.py", args + ["--max-steps", "1"], launcher="python"))
    recorded = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    again = run("recipes/tiny.py", args + ["--max-steps", "1"], launcher="python")
    assert again.returncode == 2 and "--resume" in again.stderr
    other = run("recipes/tiny.py", ["--resume", str(run_dir), "--model", "gpt2-mini"], launcher="python")
    assert other.returncode == 2 and "holds model 'gpt2-tiny'" in other.stderr
    batch = run("recipes/tiny.py", ["--resume", str(run_dir), "--total-batch-tokens", "128", "--max-steps", "2"], launcher="python")
    assert batch.returncode == 2 and "--train.total_batch_tokens=64" in batch.stderr  # the engine and world may change
    seq = run("recipes/tiny.py", ["--resume", str(run_dir), "--seq-len", "16", "--max-steps", "2"], launcher="python")
    assert seq.returncode == 2 and "--train.seq_len=32" in seq.stderr and "Traceback" not in seq.stderr, seq.stderr
    # A refused resume wrote nothing: the run is as it was, and a plain resume still works after it.
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == recorded
    # Resuming a finished run to the same --max-steps trains nothing and keeps its summary.
    done = ok(run("recipes/tiny.py", ["--resume", str(run_dir), "--max-steps", "1"], launcher="python"))
    assert "nothing to train" in done
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == recorded
    # Bad data in what the first step reads stops before anything is written: config.yaml keeps its --data, the
    # earlier finish keeps its summary.json.
    bad = shutil.copytree(corpus, tmp_path / "bad")
    tokens = np.memmap(bad / "train_000000.bin", dtype=np.uint16, mode="r+")
    tokens[::10] = 60000  # in every window
    tokens.flush()
    del tokens
    damaged = run("recipes/tiny.py", ["--resume", str(run_dir), "--max-steps", "2", "--data", str(bad)], launcher="python")
    assert damaged.returncode == 2 and "holds token id 60000" in damaged.stderr and "Traceback" not in damaged.stderr
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == recorded
    # Another corpus of the same shard sizes (prepared, so its manifest has its SHA-256s) is not the run's data.
    other = shutil.copytree(corpus, tmp_path / "other")
    tokens = np.memmap(other / "train_000000.bin", dtype=np.uint16, mode="r+")
    tokens[:] = 50256 - tokens
    tokens.flush()
    del tokens
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["shards"]["train"][0]["sha256"] = sha256(other / "train_000000.bin")
    (other / "manifest.json").write_text(json.dumps(manifest))
    elsewhere = run("recipes/tiny.py", ["--resume", str(run_dir), "--max-steps", "2", "--data", str(other)], launcher="python")
    assert elsewhere.returncode == 2 and f"{other} is not the data the run trained on: shard 0 has another SHA-256" in elsewhere.stderr
    assert f"resume with the run's data, --data {corpus}" in elsewhere.stderr and "Traceback" not in elsewhere.stderr
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == recorded
    (run_dir / "checkpoints" / "latest").write_text("step_99999999")
    broken = run("recipes/tiny.py", ["--resume", str(run_dir), "--max-steps", "2"], launcher="python")
    assert broken.returncode == 2 and "not a complete checkpoint" in broken.stderr
    accum = run("recipes/tiny.py", TINY + ["--total-batch-tokens", "100", "--run-dir", str(tmp_path / "x")], launcher="python")
    assert accum.returncode == 2 and "not divisible" in accum.stderr
    assert (run_dir / "checkpoints" / "step_00000001" / "meta.json").is_file()  # nothing lost


@pytest.mark.parametrize("summary", [None, '{"step": 1,', "[]", '{"step": 1}'])
def test_a_finished_run_with_a_damaged_summary_resumes_to_nothing_to_train(tmp_path, capsys, summary):
    """Resuming at --max-steps reads summary.json only to return it: a missing or damaged one is left as it is."""
    from types import SimpleNamespace

    from gpt2_scale.train import already_done

    if summary is not None:
        (tmp_path / "summary.json").write_text(summary)
    run = SimpleNamespace(dir=tmp_path, start_step=2, env=DistEnv(0, 0, 1, torch.device("cpu")), cfg=Config())
    run.cfg.train.max_steps = 2
    assert already_done(run) == {"step": 1, "finished": True}
    assert "nothing to train" in capsys.readouterr().out
    assert summary is None or (tmp_path / "summary.json").read_text() == summary


def test_a_resumed_runs_config_starts_a_new_run_when_reused_as_a_template(tmp_path):
    """config.yaml holds what the run is, not how an attempt started: `--config RUN/config.yaml --run-dir NEW` is a
    new run with RUN's settings, not a resume of RUN (which --run-dir would contradict)."""
    from types import SimpleNamespace

    from gpt2_scale.train import resolve_config, write_config

    cfg = Config()
    cfg.log.run_dir = cfg.checkpoint.resume = str(tmp_path / "run")  # what a resumed attempt runs with
    cfg.optim.lr = 3e-4
    write_config(SimpleNamespace(cfg=cfg, dir=tmp_path / "run", env=DistEnv(0, 0, 1, torch.device("cpu"))))
    new = resolve_config(Config(), ["--config", str(tmp_path / "run" / "config.yaml"), "--run-dir", str(tmp_path / "new")])
    assert new.checkpoint.resume is None and new.log.run_dir == str(tmp_path / "new") and new.optim.lr == 3e-4


def test_the_val_split_is_read_only_by_a_run_that_validates(tmp_path):
    """Data with no val split trains with --log.val_every=0; validating on it is refused, naming that way out."""
    from test_data_loader import make_shards

    from gpt2_scale.cli import parse_args
    from gpt2_scale.data.loader import DataError
    from gpt2_scale.train import open_data

    data = make_shards(tmp_path, train=[4096], val=[])
    cpu = DistEnv(0, 0, 1, torch.device("cpu"))
    cfg = parse_args(Config(), ["--data", str(data), "--micro-batch", "2", "--seq-len", "32", "--total-batch-tokens", "64"])
    cfg.log.val_every = 0
    train_loader, val_loader = open_data(cfg, cpu)
    assert val_loader is None and train_loader.next_batch()[0].shape == (2, 32)
    cfg.log.val_every = 10
    with pytest.raises(DataError, match="the val split .* has 0 tokens.*--log.val_every=0"):
        open_data(cfg, cpu)


def test_a_run_directory_without_a_checkpoint_is_not_overwritten(corpus, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("model: {name: gpt2-tiny}\n")
    (run_dir / "metrics.jsonl").write_text('{"step": 0, "train_loss": 10.0}\n')
    args = TINY + ["--data", str(corpus), "--total-batch-tokens", "64", "--max-steps", "1", "--run-dir", str(run_dir)]
    proc = run("recipes/tiny.py", args, launcher="python")
    assert proc.returncode == 2 and "already holds a run" in proc.stderr and f"delete {run_dir}" in proc.stderr
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 0, "train_loss": 10.0}\n'
    assert (run_dir / "config.yaml").read_text() == "model: {name: gpt2-tiny}\n"


OUT_OF_MEMORY = """
import runpy, sys, torch
from gpt2_scale import train
from gpt2_scale.engines.ddp import DDPEngine

def out_of_memory(*args):  # what an engine's states too large for the GPU raise
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB")

def out_of_host_memory(*args):  # what a step too large for the machine raises on the CPU
    raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 2.00 GiB")

if sys.argv.pop(1) == "setup":
    DDPEngine.setup = out_of_memory
else:
    train.loop = out_of_host_memory
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("where", ["setup", "loop"])
def test_out_of_memory_is_one_line_naming_what_to_change_and_the_rerun_starts_over(corpus, tmp_path, where):
    run_dir = tmp_path / "run"
    args = TINY + ["--data", str(corpus), "--total-batch-tokens", "64", "--log.val_every=0", "--run-dir", str(run_dir), "--max-steps", "1"]
    proc = subprocess.run([sys.executable, "-c", OUT_OF_MEMORY, where, str(REPO / "recipes" / "tiny.py"), *args], env=env(), cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    levers = (r"--engine zero3 \(or fsdp\), which shards the states" if where == "setup" else  # the micro-batch's levers cannot help
              r"--train\.micro_batch=1 \(accumulation keeps the batch\), --engine\.activation_checkpointing=true, --engine\.loss_chunk=4096")
    what = r"CUDA out of memory\. Tried to allocate 2\.00 GiB\. .*" if where == "setup" else r"\[enforce fail .* can't allocate memory: .*"
    assert re.fullmatch(rf"error: rank 0 ran out of memory \({what}\); these settings "
                        rf"have an estimated peak of [0-9.]+ GiB per rank \(.*\); try {levers}", line), line
    if where == "setup":  # nothing written yet
        assert not run_dir.exists()
        return
    assert (run_dir / "config.yaml").is_file() and not checkpoint.latest(run_dir)
    proc = run("recipes/tiny.py", args + ["--micro-batch", "1"], launcher="python")  # the rerun with the change it named
    assert proc.returncode == 0, proc.stderr[-3000:]
    moved = "an earlier attempt stopped before its first checkpoint; starting again, its config.yaml moved to config.attempt-1.yaml"
    assert f"{run_dir}: {moved}" in proc.stdout
    assert "micro_batch: 2" in (run_dir / "config.attempt-1.yaml").read_text() and "micro_batch: 1" in (run_dir / "config.yaml").read_text()


PREEMPT = """
import os, runpy, signal, sys, time
from gpt2_scale import train

where, rank = sys.argv.pop(1), sys.argv.pop(1)
real_setup, real_evaluate = train.setup, train.evaluate

def setup(cfg, env):
    if os.environ.get("RANK", "0") == rank:
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler preempts the job while it sets up (DeepSpeed building its ops, say)
        time.sleep(30)  # the signal ends this
    return real_setup(cfg, env)

def evaluate(run, step, last, log):
    if last:
        os.kill(os.getpid(), signal.SIGTERM)  # while the last step's validation runs
    return real_evaluate(run, step, last, log)

train.setup, train.evaluate = (setup, real_evaluate) if where == "setup" else (real_setup, evaluate)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_signal_before_training_stops_at_once_with_75_and_one_at_the_last_step_finishes(corpus, tmp_path):
    script = tmp_path / "preempt.py"
    script.write_text(PREEMPT)
    args = TINY + ["--data", str(corpus), "--total-batch-tokens", "64", "--max-steps", "2", "--run-dir", str(tmp_path / "run")]
    started = time.monotonic()
    proc = run(str(script), ["setup", "0", str(REPO / "recipes" / "tiny.py"), *args], launcher="python")
    assert proc.returncode == EXIT_PREEMPTED and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "stopped by SIGTERM before training began; nothing was written: run the same command again" in proc.stdout
    assert time.monotonic() - started < 30 and not (tmp_path / "run").exists()
    proc = run(str(script), ["last", "0", str(REPO / "recipes" / "tiny.py"), *args, "--log.val_every=1"], launcher="python")
    assert proc.returncode == 0 and "stopped by signal" not in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["finished"]


def test_a_signal_to_one_rank_before_training_stops_its_peer_with_the_same_code(corpus, tmp_path):
    script = tmp_path / "preempt.py"
    script.write_text(PREEMPT)
    args = TINY + ["--data", str(corpus), "--total-batch-tokens", "128", "--max-steps", "2", "--run-dir", str(tmp_path / "run")]
    proc = run(str(script), ["setup", "1", str(REPO / "recipes" / "tiny.py"), *args], nproc=2)
    assert "rank 0 stopped because rank 1 stopped on: stopped by SIGTERM before training began" in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("exitcode  : 75") >= 1, proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()


ON_RANK_1 = """
import os, runpy, sys, torch
from gpt2_scale import train

what = sys.argv.pop(1)
if os.environ["RANK"] == "1":
    if what == "args":  # a wrapper, or a --config file edited while the ranks started
        sys.argv += ["--micro-batch", "1"]
    else:
        def loop(run, log, stop):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried") if what == "oom" else RuntimeError("injected\\nsecond line")
        train.loop = loop
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("what, line, code", [
    ("args", "rank 1 runs with train.micro_batch=1, rank 0 with 2: launch every rank with the same command and --config file", 2),
    ("oom", "rank 0 stopped because rank 1 stopped on: rank 1 ran out of memory (CUDA out of memory. Tried)", 1),
    ("bug", "rank 0 stopped because rank 1 stopped on: RuntimeError: injected", 1),
])
def test_what_stops_one_rank_stops_its_peer_with_its_line_and_code(corpus, tmp_path, monkeypatch, what, line, code):
    """Ranks launched with different settings stop before anything, rather than hang in a collective or mix two runs;
    a failure that is not bad input (out of memory, a library's error) reaches the peer as one line with exit 1.
    torchrun exits 1 whatever the code: rank 0 leaves it in $GPT2_SCALE_EXIT_FILE for the job script."""
    monkeypatch.setenv(EXIT_CODE_FILE, str(tmp_path / "exit-code"))
    script = tmp_path / "on_rank_1.py"
    script.write_text(ON_RANK_1)
    args = TINY + ["--data", str(corpus), "--total-batch-tokens", "128", "--max-steps", "2", "--log.val_every=0", "--run-dir", str(tmp_path / "run")]
    proc = run(str(script), [what, str(REPO / "recipes" / "tiny.py"), *args], nproc=2)
    assert proc.returncode != 0 and f"error: {line}" in proc.stderr, proc.stderr[-3000:]
    assert f"exitcode  : {code} " in proc.stderr, proc.stderr[-3000:]  # torchrun's report of the first rank to stop
    assert (tmp_path / "exit-code").read_text() == f"{code}\n"
    if what == "args":
        assert proc.stderr.count(f"error: {line}") == 2 and not (tmp_path / "run").exists()


def test_ranks_that_decided_auto_resume_differently_are_told_so_not_to_relaunch(monkeypatch):
    """Each rank looks for a checkpoint on its own: one that starts while a save is under way, or on a node whose
    file system lags, may see none. The settings that differ then follow from that, not from the command."""
    from gpt2_scale import train

    cfg = Config()
    other = Config()
    other.checkpoint.resume, other.optim.decay_steps = "runs/x", 4
    monkeypatch.setattr(train.distributed, "all_ranks", lambda value: [cfg.to_dict(), other.to_dict()])
    with pytest.raises(ConfigError, match=r"rank 1 and rank 0 found different checkpoints to resume in .*\(runs/x and None\): a save was "
                       "under way as the ranks started, .*; run the same command again"):
        train.check_ranks_agree(cfg)
    other.checkpoint.resume = None
    with pytest.raises(ConfigError, match="rank 1 runs with optim.decay_steps=4, rank 0 with None: launch every rank with the same command"):
        train.check_ranks_agree(cfg)
    monkeypatch.setattr(train.distributed, "all_ranks", lambda value: [value, value])
    train.check_ranks_agree(cfg)


@pytest.mark.parametrize("log_every", [1, 1000])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path, log_every):
    """Checked on log steps, and before every checkpoint: one is never written from a step that went non-finite."""
    args = TINY + ["--data", str(corpus), "--total-batch-tokens", "64", "--log.val_every=0", "--max-steps", "5",
                   "--optim.warmup_steps=0", "--lr", "1e30", "--checkpoint.every=1", "--run-dir", str(tmp_path),
                   f"--log.log_every={log_every}"]
    proc = run("recipes/tiny.py", args, launcher="python")
    assert proc.returncode == 1
    assert "non-finite loss" in proc.stderr and "at step 1" in proc.stderr and "step_00000001" in proc.stderr
    assert checkpoint.latest(tmp_path).name == "step_00000001"


def test_sigterm_stops_within_a_step_checkpoints_and_exits_75_then_resume_finishes(corpus, tmp_path, monkeypatch):
    exit_file = tmp_path.parent / f"{tmp_path.name}.exit-code"  # a job script's, outside the run
    monkeypatch.setenv(EXIT_CODE_FILE, str(exit_file))
    # Logging every 1000 steps: a stop that waited for a log step would checkpoint at step 1000.
    args = TINY + ["--data", str(corpus), "--total-batch-tokens", "64", "--log.val_every=0", "--max-steps", "100000",
                   "--log.log_every=1000", "--checkpoint.every=0", "--run-dir", str(tmp_path)]
    proc = subprocess.Popen(command("recipes/tiny.py", args, launcher="python"), env=env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("gpt2-scale:"):
            break
    time.sleep(3)  # some steps in
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err
    assert "stopped by signal" in out and exit_file.read_text() == f"{EXIT_PREEMPTED}\n"
    step = checkpoint.read_meta(checkpoint.latest(tmp_path))["step"]
    assert 1 <= step < 1000
    assert not (tmp_path / "summary.json").exists()  # written only when a run finishes
    held = os.open(tmp_path / LOCK, os.O_RDWR)  # as if the stopped run were still saving: the resume waits for it
    fcntl.flock(held, fcntl.LOCK_EX)
    resume = ["--resume", str(tmp_path), "--max-steps", str(step + 1)]
    proc = subprocess.Popen(command("recipes/tiny.py", resume, launcher="python"), env=env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()
    os.close(held)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert first.startswith(f"{tmp_path} is in use by another run (") and "waiting up to 60 s" in first, first + out
    assert json.loads((tmp_path / "summary.json").read_text())["finished"] and exit_file.read_text() == "0\n"


class _FakeEngine:
    """Writes engine files like a engine; ``die`` leaves the save half-written as a killed process would."""

    def __init__(self, die: bool = False) -> None:
        self.die = die

    def save(self, path: Path) -> None:
        (path / "weights.pt").write_bytes(b"partial" if self.die else b"complete")
        if self.die:
            raise SystemExit("killed mid-save")


def test_a_save_killed_midway_leaves_the_previous_checkpoint_loadable(tmp_path):
    env0 = DistEnv(0, 0, 1, torch.device("cpu"))
    meta = {"model": "gpt2-tiny", "pad_vocab": False, "engine": "ddp"}
    checkpoint.save(_FakeEngine(), tmp_path, 10, meta, {"step": 10}, env0, keep=2)
    with pytest.raises(SystemExit):
        checkpoint.save(_FakeEngine(die=True), tmp_path, 20, meta, {"step": 20}, env0, keep=2)
    good = checkpoint.latest(tmp_path)
    assert good.name == "step_00000010" and (good / "weights.pt").read_bytes() == b"complete"
    assert not (checkpoint.checkpoints_root(tmp_path) / "step_00000020").exists()
    # The next save clears the debris, moves `latest`, and keeps only the newest `keep` checkpoints.
    for step in (20, 30):
        checkpoint.save(_FakeEngine(), tmp_path, step, meta, {"step": step}, env0, keep=2)
    names = sorted(p.name for p in checkpoint.checkpoints_root(tmp_path).iterdir())
    assert names == ["latest", "step_00000020", "step_00000030"]
    assert checkpoint.read_meta(checkpoint.latest(tmp_path))["step"] == 30


def test_sigkill_at_any_moment_leaves_a_loadable_checkpoint(corpus, tmp_path, monkeypatch):
    exit_file = tmp_path.parent / f"{tmp_path.name}.exit-code"
    exit_file.write_text("0\n")  # an earlier run's: a killed run must not leave it to be read as its own
    monkeypatch.setenv(EXIT_CODE_FILE, str(exit_file))
    args = TINY + ["--data", str(corpus), "--total-batch-tokens", "64", "--log.val_every=0", "--max-steps", "100000",
                   "--checkpoint.every=1", "--run-dir", str(tmp_path)]
    proc = subprocess.Popen(command("recipes/tiny.py", args, launcher="python"), env=env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    seen = 0
    for line in proc.stdout:
        seen += line.startswith("checkpoint:")
        if seen == 3:
            break
    time.sleep(0.05 + (os.getpid() % 7) / 20)  # somewhere inside a later step or save
    proc.kill()
    proc.wait()
    assert not exit_file.exists()
    model = checkpoint.load_model(tmp_path)
    assert model.config.name == "gpt2-tiny"
    step = checkpoint.read_meta(checkpoint.latest(tmp_path))["step"]
    ok(run("recipes/tiny.py", ["--resume", str(tmp_path), "--max-steps", str(step + 1)], launcher="python"))


def test_hellaswag_during_sharded_training_then_eval_and_export_the_checkpoint(corpus, tmp_path):
    from test_hellaswag import write_examples

    data = write_examples(tmp_path / "hellaswag.jsonl")
    run_dir = tmp_path / "run"
    args = TINY + ["--data", str(corpus), "--engine", "fsdp", "--max-steps", "3", "--total-batch-tokens", "128",
                   "--log.val_every=0", "--log.hellaswag_every=2", f"--log.hellaswag_data={data}", "--run-dir", str(run_dir)]
    ok(run("recipes/tiny.py", args, nproc=2))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    hs = [r for r in rows if "hellaswag_acc_norm" in r]
    assert [r["step"] for r in hs] == [0, 2] and all(0 <= r["hellaswag_acc"] <= 1 for r in hs)

    out = ok(run("tools/eval_hellaswag.py", ["--ckpt", str(run_dir), "--data", str(data), "--json"], launcher="python"))
    assert json.loads(out[out.index("{"):])["n"] == 5

    ok(run("tools/export.py", [str(run_dir), "--hf", str(tmp_path / "hf")], launcher="python"))
    transformers = pytest.importorskip("transformers")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ours = checkpoint.load_model(run_dir).eval()
    idx = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours(idx)[0], rtol=1e-4, atol=1e-4)
    absent = f"--log.hellaswag_data={tmp_path / 'absent.jsonl'}"
    missing = run("recipes/tiny.py", TINY + ["--data", str(corpus), "--log.hellaswag_every=1", absent, "--run-dir", str(tmp_path / "x")],
                  launcher="python")
    assert missing.returncode == 2 and "--log.hellaswag_every=0" in missing.stderr


def test_damaged_data_is_one_error_line_on_every_rank(corpus, tmp_path):
    broken = tmp_path / "data"
    shutil.copytree(corpus, broken)
    args = TINY + ["--data", str(broken), "--total-batch-tokens", "128", "--max-steps", "1", "--run-dir", str(tmp_path / "run")]
    (broken / "manifest.json").write_text('{"format": 1, "shards": [')
    proc = run("recipes/tiny.py", args, nproc=2)
    # Each rank that gets there prints one line and exits 2; torchrun SIGTERMs a rank still running when the first
    # one exits, so on a loaded machine only one of them may have printed.
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert 1 <= len(errors) <= 2 and all(str(broken / "manifest.json") in line for line in errors), errors
    assert proc.stderr.count("exitcode  : 2") >= 1, proc.stderr[-3000:]  # the root cause in torchrun's report
    assert f'File "{REPO}' not in proc.stderr, proc.stderr[-3000:]  # no traceback from our code (torchrun prints its own)
    shutil.copy(corpus / "manifest.json", broken / "manifest.json")

    # A corrupt window that only rank 1 reads, at the second step: rank 0 is then inside a collective with it, which
    # gloo ends at once ("Connection closed by peer"). Rank 0 reports rank 1's error, not that traceback.
    ranks = [TokenLoader(broken, "train", 2, 32, rank, 2, seed=Config().data.seed, windows_per_step=4) for rank in (0, 1)]
    for loader in ranks:
        loader.next_batch()
    shard_index, window = ranks[1].window_ids()[0]  # no window comes twice in an epoch
    tokens = np.memmap(broken / ranks[1].files[shard_index].name, dtype=np.uint16, mode="r+")
    tokens[window * 32 + 5] = 60000
    tokens.flush()
    del tokens
    proc = run("recipes/tiny.py", args + ["--max-steps", "3", "--run-dir", str(tmp_path / "run1")], nproc=2)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors and all("holds token id 60000" in line for line in errors), proc.stderr[-3000:]
    assert "error: rank 0 stopped because rank 1 stopped on: shard" in proc.stderr, proc.stderr[-3000:]
    assert f'File "{REPO}' not in proc.stderr and "exitcode  : 1" not in proc.stderr, proc.stderr[-3000:]
    shutil.copy(corpus / "train_000000.bin", broken / "train_000000.bin")

    # In what the first step reads, on rank 1 only: every rank stops with rank 1's line before anything is written.
    shard_index, window = TokenLoader(broken, "train", 2, 32, 1, 2, seed=Config().data.seed, windows_per_step=4).window_ids()[0]
    tokens = np.memmap(broken / ranks[1].files[shard_index].name, dtype=np.uint16, mode="r+")
    tokens[window * 32 + 5] = 60000
    tokens.flush()
    del tokens
    proc = run("recipes/tiny.py", args + ["--run-dir", str(tmp_path / "run2")], nproc=2)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors and all("holds token id 60000" in line for line in errors) and "exitcode  : 2" in proc.stderr, proc.stderr[-3000:]
    assert f'File "{REPO}' not in proc.stderr and not (tmp_path / "run2").exists(), proc.stderr[-3000:]
    shutil.copy(corpus / "train_000000.bin", broken / "train_000000.bin")

    shard = broken / "train_000000.bin"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 1)
    proc = run("recipes/tiny.py", args, launcher="python")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and f"shard {shard}" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()  # nothing written for a run that never started


def test_a_signal_that_follows_a_peers_failure_reports_the_failure_not_a_preemption(monkeypatch):
    """torchrun ends the peers of a failed rank with SIGTERM. Reported as a stop (75), a scheduler that requeues on 75
    would requeue the failed rank's bad input for ever; the peer's failure, with its code, is what happened."""
    from gpt2_scale import train
    from gpt2_scale.distributed import PeerError

    stopped = train.Stopped("stopped by SIGTERM before training began")
    monkeypatch.setattr(train.distributed, "peer_failure", lambda: None)
    assert train.caused_by_peer(stopped) is None and train.caused_by_peer(RuntimeError("Connection closed by peer")) is None
    bad_data = PeerError("rank 0 stopped because rank 1 stopped on: damaged shard", 2)
    monkeypatch.setattr(train.distributed, "peer_failure", lambda: bad_data)
    assert train.caused_by_peer(stopped) is bad_data and train.caused_by_peer(RuntimeError("Connection closed by peer")) is bad_data
    assert train.caused_by_peer(ConfigError("this rank's own bad input")) is None  # ours say what they are
    preempted = PeerError("rank 0 stopped because rank 1 stopped on: stopped by SIGTERM", EXIT_PREEMPTED)
    monkeypatch.setattr(train.distributed, "peer_failure", lambda: preempted)
    assert train.caused_by_peer(stopped) is None  # a preemption signals every rank: this one's own stop


@pytest.mark.parametrize("body, code", [
    ("return", 0), ("sys.exit(75)", 75), ("sys.exit(2)", 2), ("sys.exit('a message')", 1), ("raise RuntimeError", 1),
])
def test_the_exit_code_file_holds_what_the_program_exits_with(tmp_path, monkeypatch, body, code):
    exit_file = tmp_path / "exit-code"
    monkeypatch.setenv(EXIT_CODE_FILE, str(exit_file))
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises((SystemExit, RuntimeError)) if body != "return" else contextlib.nullcontext():
        with exit_code_recorded():
            exec(body if body != "return" else "pass")
    assert exit_file.read_text() == f"{code}\n"
    monkeypatch.setenv("RANK", "1")  # only rank 0 writes it
    exit_file.unlink()
    with exit_code_recorded():
        pass
    assert not exit_file.exists()


def test_the_exit_code_file_of_a_ctrl_c_holds_130(tmp_path):
    """As the shell reports it. In a process of its own: pytest with hypothesis ends a session in which a test raised
    KeyboardInterrupt with exit 130, caught or not."""
    script = "from gpt2_scale.errors import exit_code_recorded\nwith exit_code_recorded():\n    raise KeyboardInterrupt"
    proc = subprocess.run([sys.executable, "-c", script], env={**env(), EXIT_CODE_FILE: str(tmp_path / "code")}, capture_output=True)
    assert proc.returncode != 0 and (tmp_path / "code").read_text() == "130\n"


@pytest.mark.parametrize("where", ["a directory", "in no directory"])
def test_an_exit_code_file_that_cannot_be_written_is_refused_before_the_run(tmp_path, monkeypatch, capsys, where):
    monkeypatch.setenv(EXIT_CODE_FILE, str(tmp_path if where == "a directory" else tmp_path / "missing" / "exit-code"))
    monkeypatch.delenv("RANK", raising=False)
    ran = []
    with pytest.raises(SystemExit) as stopped, exit_code_recorded():
        ran.append(True)
    assert stopped.value.code == 2 and not ran
    assert "GPT2_SCALE_EXIT_FILE=" in capsys.readouterr().err
