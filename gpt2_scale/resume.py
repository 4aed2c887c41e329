"""Where a run goes on from, decided before anything is written: the run directory a fresh run may use, the
checkpoint --resume continues from, the same job restarted (``checkpoint.auto_resume``), and what an attempt
that died logged for steps the next one trains again."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gpt2_scale import checkpoint, distributed
from gpt2_scale.config import Config, ConfigError
from gpt2_scale.fileio import LOCK, fsync_dir, lock_exclusive
from gpt2_scale.metrics import attempt_name, logged_training, next_attempt, set_aside

RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints")  # what a run writes into its directory
LOCK_WAIT_S = 60.0  # how long a run waits for one still in its directory: a preempted attempt saving its checkpoint


def check_run_dir(cfg: Config) -> Path:
    """A fresh run refuses a directory where another run wrote anything: nothing recorded is overwritten.

    A directory whose run has no checkpoint and no summary yet is an earlier attempt that died before its first
    checkpoint. With checkpoint.auto_resume it is this job's, and it starts again there; without it, so does one
    that never logged a training step (it ran out of memory at its first, say): the rerun with a change is the
    same run, and nothing it recorded depends on it. In both, what the attempt wrote is set aside first
    (set_aside_earlier_attempt)."""
    run_dir = Path(cfg.log.run_dir)
    check_writable(run_dir)
    if outer := checkpoint.enclosing_run(run_dir.resolve().parent):  # its checkpoints (a copied path), its logs ...
        raise ConfigError(f"{run_dir} is inside the run {outer}, whose files it would mix with; choose a directory outside it")
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if found and not cfg.checkpoint.resume:
        if ("summary.json" not in found and checkpoint.latest(run_dir) is None
                and (cfg.checkpoint.auto_resume or not logged_training(run_dir))):
            return run_dir
        what = f"continue it with --resume {run_dir}" if "checkpoints" in found else f"it has no checkpoint to resume: delete {run_dir} to start over"
        raise ConfigError(f"{run_dir} already holds a run ({', '.join(found)}); {what}, or pass another --run-dir")
    return run_dir


@contextmanager
def claim_run_dir(run_dir: Path, env: distributed.DistEnv, wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
    """One run at a time in a directory, from before it reads the directory until it has left.

    Two runs in one directory write over each other's checkpoints and logs. It happens when the same command is
    launched twice (with ``checkpoint.auto_resume`` the second continues the first's checkpoint), on ``--resume``
    of a run that is still training, and when a scheduler requeues a job while its preempted attempt is still
    saving. Rank 0 holds an flock on ``run_dir/.lock`` (created, with the directory, if missing; both removed
    again when nothing else was written); another run waits up to ``wait_s`` for it, then every rank stops with
    one line. On a file system without locks (some Lustre mounts) the run goes on unlocked and says so."""
    fd, created, error = None, False, None
    if env.is_main:
        created = not run_dir.exists()
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd, error = lock_exclusive(run_dir / LOCK, wait_s, "run")
        except OSError:  # an unwritable directory: setup's check_writable says so, with what to do
            pass
    if error := distributed.from_main(error):
        raise ConfigError(f"{run_dir} is in use by another run ({error}); wait for it to end or stop it, or pass another --run-dir")
    try:
        yield
    finally:
        if fd is not None:
            os.ftruncate(fd, 0)  # the holder's line is only for while it holds the lock
            if created and [p.name for p in run_dir.iterdir()] == [LOCK]:  # a run refused before writing: no trace
                (run_dir / LOCK).unlink()
                run_dir.rmdir()
            os.close(fd)


def check_writable(run_dir: Path) -> None:
    """The run directory, and the checkpoints in it, can be written: found before a run trains, not at its first save."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} is a file, not a directory; pass another --run-dir")
    existing = next(p for p in (run_dir / "checkpoints", run_dir, *run_dir.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{existing} is a file, where run directory {run_dir} needs a directory; move it out of the way or pass another --run-dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write in {existing} (for run directory {run_dir}); fix its permissions or pass another --run-dir")


def find_checkpoint(cfg: Config, world_size: int) -> Path | None:
    """With --resume, the run's latest checkpoint, checked to fit this run's settings before anything is written."""
    if not cfg.checkpoint.resume:
        return None
    run_dir = Path(cfg.log.run_dir)
    path = checkpoint.latest(run_dir)
    if path is None:
        again = f"delete {run_dir} and start it again" if logged_training(run_dir) else "start it again"
        raise checkpoint.CheckpointError(f"--resume {run_dir}: no checkpoint there yet; {again} without --resume")
    checkpoint.check_compatible(checkpoint.read_meta(path), path, cfg.to_dict(), world_size)
    return path


def auto_resume_dir(cfg: Config) -> str | None:
    """With checkpoint.auto_resume, the run directory when it holds a checkpoint to continue from; else None."""
    if cfg.checkpoint.auto_resume and checkpoint.latest(Path(cfg.log.run_dir)) is not None:
        return cfg.log.run_dir
    return None


# What the same job, restarted (checkpoint.auto_resume), may run with differently from the run it continues: its
# length, what it logs and checkpoints, and the levers of speed and memory that leave what is learned as it was
# (the micro-batch too: the total batch stays, and a requeue onto more ranks may need a smaller one to divide it).
# Every other setting (model, data, train, optim, engine) is the run's own: a command that changes one is not the
# job that saved the run, and continuing would silently mix two experiments in one directory.
AUTO_RESUME_MAY_CHANGE = (
    "train.max_steps", "train.micro_batch", "log.*", "checkpoint.*", "data.prepare_hint", "engine.compile", "engine.compile_scope",
    "engine.compile_mode", "engine.activation_checkpointing", "engine.loss_chunk",
    "engine.attention",
)  # fmt: skip


def changed_settings(saved: Config, wanted: Config) -> list[tuple[str, object, object]]:
    """(key, saved value, wanted value) of each setting outside AUTO_RESUME_MAY_CHANGE that differs, in config order."""
    saved_d, wanted_d = saved.to_dict(), wanted.to_dict()
    return [(f"{section}.{key}", value, wanted_d[section][key])
            for section, values in saved_d.items() for key, value in values.items()
            if value != wanted_d[section][key] and f"{section}.{key}" not in AUTO_RESUME_MAY_CHANGE
            and f"{section}.*" not in AUTO_RESUME_MAY_CHANGE]


def _flag(value: object) -> str:
    """A value as the command line spells it: true, false, null, 0.0006."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def check_same_run(saved: Config, wanted: Config, run_dir: Path) -> None:
    """Refuse to auto-resume ``run_dir`` (whose config is ``saved``) with settings (``wanted``: saved + this command)
    that change what the run depends on, naming the first such setting, both values and the three ways on."""
    changed = sorted(changed_settings(saved, wanted), key=lambda c: c[0] not in checkpoint.RESUME_KEYS)  # those first
    if not changed:
        return
    key, old, new = changed[0]
    more = f" (also changed: {', '.join(k for k, _, _ in changed[1:])})" if len(changed) > 1 else ""
    changed_resume = ("" if key in checkpoint.RESUME_KEYS  # the checkpoint's weights and data position depend on it
                      else f", with --resume {run_dir} to continue it changed")
    raise ConfigError(
        f"--checkpoint.auto_resume: {run_dir} holds a run with {key}={_flag(old)}, this command sets {key}={_flag(new)}{more}; "
        f"run it with --{key}={_flag(old)} to continue the run{changed_resume}, or with another --run-dir to start a new run"
    )


def set_aside_earlier_attempt(run_dir: Path, start_step: int, is_main: bool) -> str | None:
    """Before a run writes into its directory, what an earlier attempt wrote that no longer stands for the run
    is moved to a side file (nothing is deleted): the records it logged for the steps this one trains (again)
    go to metrics.attempt-N.jsonl (metrics.set_aside says why); when it starts from step 0 over an attempt that
    died before its first checkpoint (check_run_dir), that attempt's config.yaml goes to
    config.attempt-N.yaml; and when it trains on past an earlier finish (a larger --max-steps), that finish's
    summary.json goes to summary.attempt-N.json, so that one stopped before its new end is not read as finished.
    The lines saying so, or None when nothing moved."""
    config, summary = run_dir / "config.yaml", run_dir / "summary.json"
    if not is_main or not run_dir.is_dir():
        return None
    attempt = next_attempt(run_dir)
    lines = []
    moved = set_aside(run_dir, start_step, attempt)
    records = f"{moved} metrics record(s) to {attempt_name('metrics.jsonl', attempt)}" if moved else ""
    if start_step == 0 and config.is_file():
        config.rename(run_dir / attempt_name(config.name, attempt))
        lines.append(f"{run_dir}: an earlier attempt stopped before its first checkpoint; starting again, its config.yaml moved to "
                     f"{attempt_name(config.name, attempt)}" + (f" and {records}" if moved else ""))
    elif moved:
        lines.append(f"{run_dir}: an earlier attempt logged steps {start_step} and later but died before checkpointing them; moved its {records}")
    if summary.is_file():
        summary.rename(run_dir / attempt_name(summary.name, attempt))
        lines.append(f"{run_dir}: training on past its earlier finish; its summary.json moved to {attempt_name(summary.name, attempt)}")
    if lines:
        fsync_dir(run_dir)
    return "\n".join(lines) or None
