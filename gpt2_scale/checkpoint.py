"""Atomic checkpoints in one layout for every engine, exact resume under any engine and world size, and full
weights from any checkpoint.

Layout of ``RUN_DIR/checkpoints/``::

    step_00000100/          one complete checkpoint
        meta.json           step, engine, model, world size, and the run's config at that step
        .metadata, *.distcp weights and Adam state in DCP, by parameter name (engines/layout.py)
        trainer.json        step, tokens and the data position in the global order (JSON: loading runs no code)
        SHA256SUMS          the SHA-256 of every file above, in ``sha256sum``'s format
    latest                  name of the newest complete checkpoint, replaced last

Nothing else is carried: no RNG state, since every random draw is a function of the seeds and the step
(``determinism.seed_step``), so a resume on any number of ranks draws what an uninterrupted run would.
Checkpoints written before this layout (engines/legacy.py) resume under the engine and world size that wrote them.

A checkpoint is written under a temporary name, synced to disk and renamed only when every rank has
finished, and ``latest`` moves after that (fileio), so a process killed or a machine losing power at
any moment leaves the previous one loadable. Loading reads only plain data (safeload): every file is
checked before any engine sees it, so a damaged or planted file is one clear error on every rank. Every byte is
checked too, against the SHA-256 recorded when it was written: DCP keeps no checksum, and a flipped bit or a
zeroed block in a tensor would otherwise load as a silently different model. The ranks split that reading, at
a save and at a load, as they split the writing.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import pickle
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from gpt2_scale import safeload
from gpt2_scale.distributed import DistEnv, all_ranks, barrier, from_main, peer_failure, share
from gpt2_scale.engines import layout, legacy
from gpt2_scale.errors import TrainingError, UserError
from gpt2_scale.fileio import LOCK, is_locked, nearest_existing, publish_dir, sha256, write_atomic

LATEST = "latest"
SUMS = "SHA256SUMS"  # `sha256sum -c SHA256SUMS` in a checkpoint's directory checks a copy of it by hand
SUMMED = "sha256sums"  # true in meta.json of a checkpoint saved with SUMS: without it, that one was lost
EARLIER = "resume from an earlier checkpoint (point checkpoints/latest at it)"  # what to do about a damaged one (tools say theirs)
DAMAGED = f"the checkpoint was damaged or altered after it was written; {EARLIER}"
# What the saved state depends on: a resume must keep these, or the weights, the optimizer shards or
# the data position would not mean what they meant when saved.
RESUME_KEYS = ("model.name", "model.pad_vocab", "train.seq_len", "train.total_batch_tokens", "data.seed")
LEGACY_RESUME_KEYS = RESUME_KEYS + ("engine.name", "train.micro_batch")  # and the world size: engines/legacy.py


class CheckpointError(UserError, RuntimeError):
    pass


def checkpoints_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


TRAINER_FILE = "trainer.json"


def legacy_trainer_file(path: Path, rank: int) -> Path:
    """Where checkpoints before trainer.json kept each rank's trainer state (with RNG states, unused now)."""
    return path / f"trainer_rank{rank}.json"


def save(engine, run_dir: Path, step: int, meta: dict, trainer_state: dict, env: DistEnv, keep: int) -> Path:
    """Every rank calls; ``trainer_state`` is the same on every rank (rank 0 writes it). Returns the final directory.

    Then the ``keep`` newest checkpoints up to this one stay. One of a later step is another attempt's (the run went
    back to an earlier checkpoint): it stays until this run saves that step again, which replaces it. A save that
    cannot be written (a full disk, a directory made read-only) leaves nothing behind and stops the run in one line."""
    root = checkpoints_root(run_dir)
    name = f"step_{step:08d}"
    final, tmp = root / name, root / f".tmp-{name}"
    try:
        if env.is_main:
            _remove_debris(root)
            tmp.mkdir(parents=True)
            (tmp / TRAINER_FILE).write_text(json.dumps(trainer_state))
            (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "world_size": env.world_size, SUMMED: True}, indent=2))
        barrier()
        engine.save(tmp)
        barrier()
        sums = _sha256_all(tmp)
        if env.is_main:
            (tmp / SUMS).write_text("".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items())))
            publish_dir(tmp, final, replace=True)  # the same step saved again after a resume replaces it
            write_atomic(root / LATEST, name)
    except torch.OutOfMemoryError:  # a RuntimeError, but the device's memory, not the disk: the trainer says what to change
        raise
    except (OSError, RuntimeError, CheckpointException) as e:  # DCP's is a BaseException
        full = _disk_problem(e, root)  # looked at before the partial checkpoint is removed: it took the space
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if peer := peer_failure():  # a peer that left: its error, not the collective's
            raise peer from e
        if full:
            raise _unwritable(final, e) from e
        raise
    if env.is_main:
        earlier = sorted(p for p in root.glob("step_*") if p.is_dir() and p.name < name)
        for old in earlier[: max(0, len(earlier) - (keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _remove_debris(root: Path) -> None:
    """What killed saves left, which no later save of theirs would clear (a preemption's save is at a step the
    schedule never saves again): their temporary directories, and a checkpoint moved aside for its replacement
    (fileio.publish_dir) once that is in place. Only the run holding the directory's lock saves here."""
    for tmp in root.glob(".tmp-step_*"):
        shutil.rmtree(tmp, ignore_errors=True)
    for old in root.glob(".step_*.old-*"):
        if (root / old.name[1:].partition(".old-")[0] / "meta.json").is_file():  # else it is the only copy of its step
            shutil.rmtree(old, ignore_errors=True)


NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}  # what the user fixes, not a bug
LOW_SPACE = 256 << 20  # torch.save's writer reports a full disk as an "enforce fail" RuntimeError: the space left says it


def _cause(error: BaseException) -> BaseException:
    """What went wrong: DCP's CheckpointException gathers each rank's exception (its text is their tracebacks)."""
    return next(iter(error.failures.values()))[0] if isinstance(error, CheckpointException) and error.failures else error


def _disk_problem(error: BaseException, root: Path) -> bool:
    """Whether a failed save failed for lack of room or rights where it writes (a full disk, a quota, a directory
    made read-only), rather than for a bug or a peer's failure, whose traceback the user needs."""
    cause = _cause(error)
    if isinstance(cause, OSError):
        return cause.errno in NO_ROOM
    try:
        return shutil.disk_usage(root).free < LOW_SPACE
    except OSError:
        return False


def _unwritable(path: Path, error: BaseException) -> TrainingError:
    """A checkpoint that could not be written, as the one line that stops the run: why, the room left, what to resume."""
    cause = _cause(error)
    free = shutil.disk_usage(nearest_existing(path.parent)).free
    run_dir = path.parent.parent
    kept = _latest_or_none(run_dir)
    after = (f"the last complete checkpoint is {kept}: continue with --resume {run_dir} (a job that auto-resumes: its same command)"
             if kept else f"no checkpoint was written yet: start it again (delete {run_dir} first, unless it auto-resumes)")
    return TrainingError(f"cannot write checkpoint {path} ({type(cause).__name__}: {_first_line(cause)}; {free / 2**30:.2f} GiB "
                         f"free on its file system); free space or fix the permissions there, then {after}")


def latest(run_dir: Path) -> Path | None:
    """The checkpoint ``checkpoints/latest`` names; without that file (a save killed just before it, or a user's
    deletion) the newest complete step_* directory, as a save renames only complete ones into place."""
    root = checkpoints_root(run_dir)
    try:
        return _latest(root)
    except PermissionError as e:  # a directory on the way that this user cannot read
        raise CheckpointError(f"cannot read {e.filename or root} ({e.strerror}); fix its permissions") from None


def _latest(root: Path) -> Path | None:
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"{root}, where the run keeps its checkpoints, is a file; move it out of the way")
    pointer = root / LATEST
    if not pointer.exists():
        steps = complete_steps(root.parent)
        return steps[-1] if steps else None
    try:
        name = pointer.read_text().strip()
        why = f"names {name!r}, which is not a complete checkpoint" if name else "is empty"
    except (OSError, UnicodeDecodeError) as e:  # a directory, unreadable, binary
        name, why = "", f"cannot be read ({type(e).__name__})"
    path = root / name
    if not name or path.parent != root or not (path / "meta.json").is_file():
        steps = complete_steps(root.parent)
        have = f" ({', '.join(p.name for p in steps)} {'is one' if len(steps) == 1 else 'are'})" if steps else ""
        raise CheckpointError(f"{pointer} {why}; write the name of a complete step_* directory into it{have}")
    return path


def complete_steps(run_dir: Path) -> list[Path]:
    """The run's checkpoint directories that a save finished (renamed into place complete, meta.json in every layout), oldest first."""
    return sorted(p for p in checkpoints_root(run_dir).glob("step_*") if (p / "meta.json").is_file())


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` is a training run's directory: its config.yaml, and its metrics or checkpoints."""
    return (path / "config.yaml").is_file() and ((path / "metrics.jsonl").is_file() or checkpoints_root(path).is_dir())


def enclosing_run(path: Path) -> Path | None:
    """The run directory ``path`` is, or lies in (None when neither)."""
    return next((p for p in (path, *path.parents) if is_run_dir(p)), None)


def check_layout(path: Path) -> None:
    """Checkpoint ``path`` holds weights in a layout we read; else a lost .metadata would be taken for a legacy one."""
    if not (layout.is_elastic(path) or legacy.holds(path)):
        lost = ".metadata, DCP's index of its *.distcp files," if any(path.glob("*.distcp")) else "its weights"
        raise CheckpointError(f"checkpoint {path} has lost {lost} so it is incomplete; {EARLIER}")


def read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / "meta.json").read_text())
        missing = [k for k in ("model", "engine", "step", "world_size") if k not in meta]
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot read {path / 'meta.json'} ({getattr(e, 'strerror', None) or e}); {EARLIER}") from e
    if missing:
        raise CheckpointError(f"{path / 'meta.json'} lacks {', '.join(missing)}: it is damaged; {EARLIER}")
    if (not isinstance(meta.get("config", {}), dict) or type(meta["step"]) is not int or meta["step"] < 1
            or not isinstance(meta["model"], str) or not isinstance(meta["engine"], str)):
        raise CheckpointError(f"{path / 'meta.json'} holds a bad step, model, engine or config: it is damaged; {EARLIER}")
    return meta


def _get(config: dict, dotted: str):
    section, _, key = dotted.partition(".")
    return config.get(section, {}).get(key)


def check_compatible(meta: dict, path: Path, config: dict, world_size: int) -> None:
    """Refuse to resume ``path`` under settings its saved state does not fit, naming the flag that restores them.

    ``config`` is this run's ``Config.to_dict()``. The engine, the number of ranks and the micro-batch may change
    (the layout is the same for every engine, and the data position is one in the global order); checkpoints
    from before that layout may not. Checkpoints that predate meta.json's config are checked on model, engine and
    world size here, and on the data settings by the loader's own state."""
    check_layout(path)
    saved = meta.get("config") or {"model": {"name": meta["model"]}, "engine": {"name": meta["engine"]}}
    if meta["model"] != _get(config, "model.name"):
        raise CheckpointError(
            f"checkpoint {path} holds model {meta['model']!r}, but this run builds {_get(config, 'model.name')!r}; "
            f"resume with --model {meta['model']}"
        )
    elastic = layout.is_elastic(path)
    if not elastic and (meta["engine"] != _get(config, "engine.name") or meta["world_size"] != world_size):
        raise CheckpointError(
            f"checkpoint {path} predates checkpoints that move between engines and world sizes: resume it once with "
            f"--engine {meta['engine']} on {meta['world_size']} rank(s) (this run: {_get(config, 'engine.name')} on "
            f"{world_size}); the checkpoints that run writes resume anywhere"
        )
    for key in RESUME_KEYS if elastic else LEGACY_RESUME_KEYS:
        section, _, name = key.partition(".")
        if name in saved.get(section, {}) and saved[section][name] != _get(config, key):
            raise CheckpointError(
                f"checkpoint {path} was trained with {key}={saved[section][name]!r}, this run has {_get(config, key)!r}; "
                f"resume with --{key}={saved[section][name]} (the saved weights and data position depend on it)"
            )


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """Load from checkpoint ``path`` with weights-only unpickling; any failure becomes one CheckpointError."""
    with _named_failures(path), safeload.weights_only():
        yield


@contextlib.contextmanager
def _named_failures(path: Path) -> Iterator[None]:
    """Any failure to read ``path`` (a checkpoint or one of its files) as one CheckpointError that names it."""
    try:
        yield
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        raise _refuse(path, f"pickled objects ({_first_line(e)})") from e
    except (Exception, CheckpointException) as e:  # DCP's is a BaseException
        cause = _cause(e)
        raise CheckpointError(f"cannot load {path}: {type(cause).__name__}: {_first_line(cause)}; it is damaged, truncated or "
                              f"incomplete: {EARLIER}") from e


def _first_line(e: BaseException) -> str:
    """The first sentence of an exception's message: torch's run to paragraphs."""
    text = " ".join(str(e).split())
    return text.split(". ")[0][:200] or type(e).__name__


def _refuse(file: Path, what: str) -> CheckpointError:
    return CheckpointError(f"refusing to load {file}: it holds {what}, which no checkpoint of gpt2-scale holds (loading "
                           f"it could run code); it was altered or written by something else: {EARLIER}")


def _sha256_all(path: Path) -> dict[str, str]:
    """The SHA-256 of every file under ``path`` by its relative name; every rank calls and hashes a share.

    Rank 0 lists the files (on a network file system another node's listing may lag what it wrote)."""
    names = from_main(sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()))
    return {name: digest for part in all_ranks({n: sha256(path / n) for n in share(names)}) for name, digest in part.items()}


_SUM_LINE = re.compile(r"([0-9a-f]{64}) [ *](.+)")


def read_sums(path: Path) -> dict[str, str] | None:
    """Checkpoint ``path``'s recorded SHA-256 of each file, by relative name; None for one written before them."""
    file = path / SUMS
    if not file.exists():
        return None
    sums = {}
    try:
        for number, line in enumerate(file.read_text().splitlines(), 1):
            match = _SUM_LINE.fullmatch(line)
            name = match and match[2]
            if not match or Path(name).is_absolute() or ".." in Path(name).parts:
                raise ValueError(f"line {number} is not a SHA-256 and a name inside the checkpoint")
            sums[name] = match[1]
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"cannot read {file} ({e}): it is damaged; {EARLIER}") from e
    return sums


def check_sums(path: Path, split: bool = False) -> None:
    """Every file of checkpoint ``path`` has the SHA-256 it was written with. With ``split`` every rank of the
    process group calls, reads a share of the files, and raises the same error as the others."""
    sums = read_sums(path)
    if sums is None:
        if _summed(path):
            raise CheckpointError(f"{path / SUMS} is missing, though meta.json says the checkpoint was saved with it: {DAMAGED}")
        return  # saved before SHA-256s were recorded: verify reads every file the safe way
    files = (str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    if unlisted := sorted(name for name in files if name != SUMS and name not in sums):  # an empty SUMS checks nothing
        more = f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else ""
        raise CheckpointError(f"{path / unlisted[0]}{more} is not in {SUMS}, which lists every file a save writes: {DAMAGED}")

    def problem(name: str) -> tuple[str, str] | None:  # never raises: a rank that did would leave the others in all_ranks
        if not (path / name).is_file():
            return f"{path / name} is missing, though {SUMS} lists it", DAMAGED
        try:
            digest = sha256(path / name)
        except PermissionError as e:  # the bytes may be fine
            return f"{path / name} cannot be read ({e.strerror})", "fix its permissions"
        except OSError as e:
            return f"{path / name} cannot be read ({e.strerror or type(e).__name__})", DAMAGED
        return (f"{path / name} does not match its SHA-256 in {SUMS}", DAMAGED) if digest != sums[name] else None

    bad = [p for name in (share(sorted(sums)) if split else sorted(sums)) if (p := problem(name))]
    if split:
        bad = [p for part in all_ranks(bad) for p in part]
    if bad:
        more = f" (and {len(bad) - 1} more file{'s' * (len(bad) > 2)})" if len(bad) > 1 else ""
        raise CheckpointError(f"{bad[0][0]}{more}: {bad[0][1]}")


def _summed(path: Path) -> bool:
    """Whether checkpoint ``path`` was saved with SUMS, as its meta.json says (a damaged one is verify's to report)."""
    try:
        return json.loads((path / "meta.json").read_text()).get(SUMMED) is True
    except (OSError, ValueError, AttributeError):
        return False


def verify(path: Path, split: bool = False) -> None:
    """Check every file of checkpoint ``path`` before an engine reads it: its bytes against their SHA-256
    (``check_sums``, which ``split`` shares out among the ranks), then each file read the safe way, so that a
    checkpoint from before SHA256SUMS, or a planted file whose SHA-256 was planted too, is refused as well. A
    damaged, truncated or planted file is reported by name, the same on every rank, before any rank enters the
    engine's collectives."""
    check_layout(path)
    check_sums(path, split)
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        with _named_failures(file):
            if file.suffix == ".json":
                json.loads(file.read_text())
            elif file.suffix == ".pt":
                if unsafe := safeload.unsafe_globals(file):
                    raise _refuse(file, f"pickled globals {', '.join(unsafe)}")
                with safeload.weights_only():
                    torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            elif file.name == ".metadata":
                _verify_dcp(file.parent)


def _verify_dcp(path: Path) -> None:
    """DCP's metadata through the safe reader; every data file as long as the metadata says; and the pickled
    (non-tensor) items, such as the optimizer's hyperparameters, loaded weights-only."""
    metadata = safeload.SafeDCPReader(str(path)).read_metadata()
    need: dict[str, int] = {}
    for info in metadata.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in need.items():
        file = path / name
        if not file.is_file() or file.stat().st_size < size:
            have = file.stat().st_size if file.is_file() else "no"
            raise CheckpointError(f"{file} has {have} bytes, its checkpoint's metadata needs {size}: it is truncated or missing; "
                                  f"{EARLIER}")
    for index, info in metadata.storage_data.items():
        if isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            file = path / info.relative_path
            with open(file, "rb") as f:
                f.seek(info.offset)
                item = io.BytesIO(f.read(info.length))
            if unsafe := safeload.unsafe_globals(item):
                raise _refuse(file, f"pickled globals {', '.join(unsafe)} in item {index.fqn}")


def load(engine, path: Path) -> dict:
    """Restore the engine's state from a checkpoint directory (every rank calls); returns the trainer state."""
    verify(path, split=True)
    state_file = path / TRAINER_FILE
    if not state_file.is_file():  # written before trainer.json: rank 0's (all held the same step and data position)
        state_file = legacy_trainer_file(path, 0)
        state_file = state_file if state_file.is_file() else state_file.with_suffix(".pt")  # JSON, or older, torch.save
    if not state_file.is_file():
        raise CheckpointError(f"{path / TRAINER_FILE} is missing: the checkpoint is incomplete; {EARLIER}")
    with reading(path):
        if layout.is_elastic(path):
            engine.load(path)
        else:
            legacy.load(engine, path)
        if state_file.suffix == ".json":
            return json.loads(state_file.read_text())
        return torch.load(state_file, weights_only=True)


def find(run_dir: str | Path, step: int | None = None) -> Path:
    """The checkpoint directory of run ``run_dir`` at ``step`` (default: the latest), or an error saying what is there."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        parent = enclosing_run(run_dir)
        hint = ("it is a Hugging Face export: load it as one (sample --hf, eval_hellaswag --pretrained)" if (run_dir / "config.json").is_file()
                else f"the run is {parent}" if parent else "pass the directory a training run wrote (its --run-dir)")
        raise CheckpointError(f"{run_dir} is not a run directory (no config.yaml); {hint}")
    path = checkpoints_root(run_dir) / f"step_{step:08d}" if step is not None else latest(run_dir)
    if path is None or not path.is_dir():
        steps = [p.name for p in complete_steps(run_dir)]
        raise CheckpointError(f"{run_dir} has no checkpoint for step {step}; it has {', '.join(steps) or 'none'}" if step is not None
                              else f"{run_dir} has no checkpoint; train it first")
    return path


def load_model(run_dir: str | Path, step: int | None = None):
    """The trained GPT of a run (full fp32 weights on CPU), from any engine's checkpoint, in one process."""
    path = find(run_dir, step)
    return model_at(path, read_meta(path))


def model_at(path: Path, meta: dict):
    """The GPT of checkpoint ``path`` (found, with its ``meta`` read: ``find``, ``read_meta``), full fp32 weights on CPU."""
    from gpt2_scale.engines import read_full_weights
    from gpt2_scale.model import GPT
    from gpt2_scale.zoo import ModelConfig

    try:
        model = GPT(ModelConfig.from_name(meta["model"], pad_vocab=meta.get("pad_vocab", True)))
    except ValueError as e:  # an unknown name
        raise CheckpointError(f"{path / 'meta.json'}: {e}; it is damaged, or from a newer gpt2-scale") from None
    try:
        verify(path)
        with reading(path):
            state = read_full_weights(path)
    except CheckpointError:
        if _pruned(path):
            raise CheckpointError(f"{path} was removed while it was read: its run is training now and keeps only its newest "
                                  "checkpoints (--checkpoint.keep); run this again, for the newest") from None
        raise
    load_weights(model, state, path)
    return model


def _pruned(path: Path, wait_s: float = 2.0) -> bool:
    """Whether checkpoint ``path`` failed to read because its run, training now, removed it after a newer save: it
    is gone (within ``wait_s``: the removal may still be under way), its run holds the lock, latest names another."""
    run_dir = path.parent.parent
    if not is_locked(run_dir / LOCK) or _latest_or_none(run_dir) == path:
        return False
    deadline = time.monotonic() + wait_s
    while (path / "meta.json").is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    return not (path / "meta.json").is_file()


def _latest_or_none(run_dir: Path) -> Path | None:
    try:
        return latest(run_dir)
    except UserError:
        return None


def load_weights(model, state: dict[str, torch.Tensor], source) -> None:
    """Load full weights, accepting a state dict that lists the tied lm_head.weight or not."""
    state = dict(state)
    state.setdefault("lm_head.weight", state.get("transformer.wte.weight"))
    problem = weights_mismatch({k: tuple(v.shape) for k, v in model.state_dict().items()}, state)
    if problem:
        raise CheckpointError(f"{source} does not match model {model.config.name}: {problem}")
    model.load_state_dict(state)


def weights_mismatch(expected: dict[str, tuple[int, ...]], state: dict[str, torch.Tensor], limit: int = 10) -> str:
    """What keeps ``state`` from loading into tensors of the ``expected`` shapes, in one line; "" when nothing."""

    def listing(items: list[str]) -> str:
        return "; ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")

    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    wrong = [f"{k}: checkpoint {list(state[k].shape)}, model {list(shape)}"
             for k, shape in expected.items() if k in state and tuple(state[k].shape) != tuple(shape)]
    parts = {"missing keys": missing, "unexpected keys": unexpected, "mismatched shapes": wrong}
    return "; ".join(f"{what}: {listing(items)}" for what, items in parts.items() if items)
