"""A job restarted with the same command (torchrun --max-restarts, a SLURM requeue) continues its run:
--checkpoint.auto_resume, what a lost attempt logged set aside, and a rank killed under torchrun."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil  # a dependency of deepspeed, so of the package
import pytest
import torch
from launch import REPO, TINY, command, env, metrics, ok, run

from gpt2_scale import checkpoint
from gpt2_scale.config import ConfigError
from gpt2_scale.distributed import DistEnv
from gpt2_scale.metrics import next_attempt, set_aside, split_records
from gpt2_scale.resume import LOCK, claim_run_dir, set_aside_earlier_attempt


def by_step(run_dir: Path, key: str = "train_loss") -> dict[int, float]:
    """The last value of ``key`` logged for each step: what a reader that knows nothing of set-aside files would use."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def files(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}


# --- what a lost attempt logged ---


def test_records_of_steps_a_resume_trains_again_are_split_off_with_a_cut_line():
    lines = [b'{"step": 0, "train_loss": 3.0}\n', b'{"step": 1, "train_loss": 2.0}\n', b'{"step": 2, "tokens": 1, "val_loss": 2.5}\n',
             b'{"step": 2, "train_loss": 1.5}\n', b'{"step": 3, "train_lo']  # the last write cut off by a kill
    kept, lost = split_records(lines, 2)
    assert kept == lines[:2]
    assert lost == [*lines[2:4], b'{"step": 3, "train_lo\n']
    assert split_records(lines[:2], 2) == (lines[:2], [])
    assert split_records(lines, 0) == ([], [*lines[:4], b'{"step": 3, "train_lo\n'])


def test_set_aside_moves_what_a_lost_attempt_logged_and_loses_nothing(tmp_path):
    text = b"".join(b'{"step": %d, "train_loss": %d.5}\n' % (s, s) for s in range(6))
    (tmp_path / "metrics.jsonl").write_bytes(text)
    assert set_aside(tmp_path, 6, attempt=1) == 0 and not list(tmp_path.glob("*.attempt-*"))  # nothing past the resume
    assert next_attempt(tmp_path) == 1
    assert set_aside(tmp_path, 4, attempt=1) == 2
    assert (tmp_path / "metrics.jsonl").read_bytes() + (tmp_path / "metrics.attempt-1.jsonl").read_bytes() == text
    assert next_attempt(tmp_path) == 2
    assert set_aside(tmp_path, 0, attempt=2) == 4 and (tmp_path / "metrics.jsonl").read_bytes() == b""
    assert set_aside(tmp_path / "absent", 3, attempt=1) == 0


def test_training_on_past_a_finish_sets_its_summary_aside(tmp_path):
    """A finished run resumed to a larger --max-steps: its summary.json no longer stands for the run (one stopped
    before its new end would still read as finished), so it moves beside the records, not away."""
    logged = b"".join(b'{"step": %d, "train_loss": 2.5}\n' % s for s in range(4))
    (tmp_path / "metrics.jsonl").write_bytes(logged)
    (tmp_path / "config.yaml").write_text("model: {name: gpt2-tiny}\n")
    summary = '{"step": 3, "finished": true}'
    (tmp_path / "summary.json").write_text(summary)
    line = set_aside_earlier_attempt(tmp_path, 4, is_main=True)
    assert line == f"{tmp_path}: training on past its earlier finish; its summary.json moved to summary.attempt-1.json"
    assert (tmp_path / "summary.attempt-1.json").read_text() == summary and not (tmp_path / "summary.json").exists()
    assert (tmp_path / "metrics.jsonl").read_bytes() == logged and (tmp_path / "config.yaml").is_file()
    assert set_aside_earlier_attempt(tmp_path, 4, is_main=True) is None  # nothing more to move


# --- one run at a time in a directory ---

MAIN = DistEnv(0, 0, 1, torch.device("cpu"))


def _hold(path: Path) -> int:
    """Hold the lock as a run in another process would: its own open file, flock'ed, its line written."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.pwrite(fd, b"pid 4242 on node07, since 2026-11-27 01:02:03\n", 0)
    return fd


def test_a_second_run_in_a_directory_waits_for_the_first_then_is_refused(tmp_path, capsys):
    holder = _hold(tmp_path / LOCK)
    with pytest.raises(ConfigError, match=r"in use by another run \(pid 4242 on node07, since .*\); wait for it to end or stop it"):
        with claim_run_dir(tmp_path, MAIN, wait_s=0.3):
            pytest.fail("entered a directory another run holds")
    assert "waiting up to 0 s" in capsys.readouterr().out
    threading.Timer(0.5, os.close, [holder]).start()  # the first run ends while the second waits
    with claim_run_dir(tmp_path, MAIN, wait_s=30):
        assert (tmp_path / LOCK).read_text().startswith(f"pid {os.getpid()} on ")
        with pytest.raises(ConfigError, match="in use"), claim_run_dir(tmp_path, MAIN, wait_s=0):
            pass
    assert (tmp_path / LOCK).read_text() == ""  # released: no holder named
    with claim_run_dir(tmp_path, MAIN, wait_s=0):
        pass


def test_a_run_refused_in_a_directory_it_created_leaves_no_trace(tmp_path):
    run_dir = tmp_path / "runs" / "new"
    with pytest.raises(ConfigError, match="bad setting"), claim_run_dir(run_dir, MAIN):
        assert (run_dir / LOCK).is_file()
        raise ConfigError("bad setting")
    assert not run_dir.exists() and (tmp_path / "runs").is_dir()
    with claim_run_dir(run_dir, MAIN):
        (run_dir / "config.yaml").write_text("x")
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK, "config.yaml"]


# --- the same command again, one process ---


def test_the_same_command_again_continues_the_run_or_refuses_a_change(corpus, tmp_path):
    """A run killed after its checkpoint at step 4 (its log already past it) continues from 4 when the same command
    runs again, with the losses of an uninterrupted run; a changed setting is refused in one line, nothing written."""
    args = TINY + ["--data", str(corpus), "--total-batch-tokens", "64", "--log.val_every=3", "--optim.warmup_steps=2",
                   "--max-steps", "6", "--checkpoint.every=2", "--checkpoint.auto_resume=true"]
    full, run_dir = tmp_path / "full", tmp_path / "run"
    ok(run("recipes/tiny.py", args + ["--run-dir", str(full)], launcher="python"))
    # What a kill during step 5 leaves: the checkpoint of step 4 is the latest, steps 4 and 5 (and val at 4) logged, no summary.
    shutil.copytree(full, run_dir)
    shutil.rmtree(checkpoint.checkpoints_root(run_dir) / "step_00000006")
    (checkpoint.checkpoints_root(run_dir) / checkpoint.LATEST).write_text("step_00000004")
    (run_dir / "summary.json").unlink()
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "train_l')  # and a line cut off mid-write
    before = files(run_dir)
    changed = run("recipes/tiny.py", args + ["--run-dir", str(run_dir), "--lr", "1e-2"], launcher="python")
    assert changed.returncode == 2 and "Traceback" not in changed.stderr, changed.stderr[-3000:]
    errors = [line for line in changed.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: --checkpoint.auto_resume: {run_dir} holds a run with optim.lr=0.003, this command sets optim.lr=0.01; "
                      f"run it with --optim.lr=0.003 to continue the run, with --resume {run_dir} to continue it changed, "
                      "or with another --run-dir to start a new run"], changed.stderr[-3000:]
    assert files(run_dir) == before  # refused before anything was written

    out = ok(run("recipes/tiny.py", args + ["--run-dir", str(run_dir), "--checkpoint.every=1"], launcher="python"))
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000004'} at step 4" in out
    assert "moved its 4 metrics record(s) to metrics.attempt-1.jsonl" in out, out[-3000:]
    for key in ("train_loss", "val_loss", "lr", "grad_norm"):
        assert metrics(run_dir, key) == metrics(full, key), key  # one record per step, bitwise the uninterrupted run's
    lost = [json.loads(line) for line in (run_dir / "metrics.attempt-1.jsonl").read_text().splitlines()[:-1]]
    assert [r["step"] for r in lost] == [4, 5, 5] and lost[0]["train_loss"] == by_step(full)[4]  # val at 5, the last step
    assert (run_dir / "metrics.attempt-1.jsonl").read_text().endswith('{"step": 6, "train_l\n')

    again = ok(run("recipes/tiny.py", args + ["--run-dir", str(run_dir)], launcher="python"))
    assert "nothing to train" in again  # a requeued job that had finished exits 0


def test_the_same_command_again_starts_over_an_attempt_that_died_before_its_first_checkpoint(corpus, tmp_path):
    args = TINY + ["--data", str(corpus), "--total-batch-tokens", "64", "--log.val_every=0", "--max-steps", "2",
                   "--checkpoint.auto_resume=true", "--run-dir", str(tmp_path)]
    (tmp_path / "config.yaml").write_text("model: {name: gpt2-tiny}\n")
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "train_loss": 10.0}\n')
    (checkpoint.checkpoints_root(tmp_path) / ".tmp-step_00000001").mkdir(parents=True)  # its first save, killed
    out = ok(run("recipes/tiny.py", args, launcher="python"))
    assert "starting again, its config.yaml moved to config.attempt-1.yaml and 1 metrics record(s)" in out
    assert (tmp_path / "config.attempt-1.yaml").read_text() == "model: {name: gpt2-tiny}\n"
    assert (tmp_path / "metrics.attempt-1.jsonl").read_text() == '{"step": 0, "train_loss": 10.0}\n'
    assert sorted(by_step(tmp_path)) == [0, 1] and json.loads((tmp_path / "summary.json").read_text())["finished"]


# --- a rank killed under torchrun --max-restarts ---


def worker(launcher_pid: int, rank: int) -> psutil.Process | None:
    """The worker process of ``rank`` that torchrun (``launcher_pid``) started: the child whose environment has RANK."""
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return None


def past_checkpoint(run_dir: Path) -> bool:
    """The run has a checkpoint and has logged a step at or after it: killed now, it loses trained steps."""
    latest = checkpoint.latest(run_dir)
    if latest is None or not (run_dir / "metrics.jsonl").is_file():
        return False
    saved = int(latest.name.removeprefix("step_"))
    return any(line.startswith('{"step": ') and int(line[9:].split(",")[0]) >= saved
               for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.endswith("}"))


def test_a_rank_killed_under_torchrun_restarts_and_the_run_continues_exactly(corpus, tmp_path):
    """SIGKILL rank 1 once the first checkpoint exists and a step after it is logged: torchrun restarts both workers
    with the same command, which auto-resumes from the last checkpoint, and the job exits 0 with the per-step losses
    of an uninterrupted run. The only timing it needs: the kill lands before step 40, long after step 3. (The restart
    connects only because distributed.attempt_store gives it keys of its own: torch 2.13's torchrun keeps the failed
    attempt's in the store it shares, and most restarts failed or hung without it.)"""
    args = TINY + ["--data", str(corpus), "--engine", "ddp", "--total-batch-tokens", "128", "--max-steps", "40", "--log.val_every=0",
                   "--optim.warmup_steps=2", "--checkpoint.every=2", "--checkpoint.auto_resume=true"]
    full, run_dir = tmp_path / "full", tmp_path / "restarted"
    ok(run("recipes/tiny.py", args + ["--run-dir", str(full)], nproc=2, timeout=600))

    out_file, err_file = tmp_path / "stdout", tmp_path / "stderr"
    with open(out_file, "w") as out, open(err_file, "w") as err:
        proc = subprocess.Popen(command("recipes/tiny.py", args + ["--run-dir", str(run_dir)], nproc=2, max_restarts=1),
                                env=env(), cwd=REPO, stdout=out, stderr=err, text=True)
        try:
            deadline = time.monotonic() + 300
            while not past_checkpoint(run_dir) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before the kill:\n{err_file.read_text()[-3000:]}"
            assert past_checkpoint(run_dir), "no checkpoint and step after it within 300 s"
            victim = worker(proc.pid, rank=1)
            assert victim is not None, f"no worker with RANK=1 under torchrun:\n{out_file.read_text()[-3000:]}"
            victim.send_signal(signal.SIGKILL)
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=60)
    stdout, stderr = out_file.read_text(), err_file.read_text()
    resumed = re.findall(r"resumed from .*step_(\d+) at step (\d+)", stdout)
    assert resumed, f"no resume: the kill landed after the run had ended, or the restart did not resume\n{stdout[-3000:]}\n{stderr[-3000:]}"
    assert proc.returncode == 0, f"exit {proc.returncode}\n{stdout[-3000:]}\n{stderr[-3000:]}"
    step = int(resumed[0][1])
    assert 2 <= step < 40 and step % 2 == 0, resumed
    assert "exitcode: -9" in stderr, stderr[-3000:]  # torchrun saw rank 1 killed, and restarted

    losses, reference = by_step(run_dir), by_step(full)
    assert sorted(losses) == list(range(40))
    assert losses == reference  # bitwise: == on the floats, fp32 on CPU
    assert metrics(run_dir) == metrics(full)  # and metrics.jsonl itself is one record per step, the lost ones set aside
    side = run_dir / "metrics.attempt-1.jsonl"
    if side.exists():  # what the killed attempt logged past the checkpoint it resumed from (none if one was saved just then)
        lost = [json.loads(line) for line in side.read_text().splitlines() if line.endswith("}")]
        assert all(r["step"] >= step and r["train_loss"] == reference[r["step"]] for r in lost), lost
    assert json.loads((run_dir / "summary.json").read_text())["finished"]
