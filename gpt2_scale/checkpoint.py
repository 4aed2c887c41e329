"""Atomic checkpoints around each engine's own format, exact resume, and full weights from any engine.

Layout of ``RUN_DIR/checkpoints/``::

    step_00000100/          one complete checkpoint
        meta.json           step, engine, model, world size, and the run's config at that step
        <engine files>      model + optimizer, written by the engine (torch.save, DCP or DeepSpeed)
        trainer_rank{r}.json  per rank: data-loader position, RNG states (JSON: loading runs no code)
    latest                  name of the newest complete checkpoint, replaced last

A checkpoint is written under a temporary name, synced to disk and renamed only when every rank has
finished, and ``latest`` moves after that (fileio), so a process killed or a machine losing power at
any moment leaves the previous one loadable. Loading reads only plain data (safeload): every file is
checked before any engine sees it, so a damaged or planted file is one clear error on every rank.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import pickle
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from gpt2_scale import safeload
from gpt2_scale.distributed import DistEnv, barrier
from gpt2_scale.errors import UserError
from gpt2_scale.fileio import publish_dir, write_atomic

LATEST = "latest"
# What the saved state depends on: a resume must keep these, or the weights, the optimizer shards or
# the data position would not mean what they meant when saved.
RESUME_KEYS = (
    "model.name", "model.pad_vocab", "engine.name", "train.micro_batch", "train.seq_len", "train.total_batch_tokens",
    "data.seed",
)  # fmt: skip


class CheckpointError(UserError, RuntimeError):
    pass


def checkpoints_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state() -> dict:
    """Every RNG this process draws from, as JSON-able values."""
    version, key, gauss = random.getstate()
    kind, mt, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": _b64(torch.get_rng_state()),
        "python": [version, list(key), gauss],
        "numpy": [kind, mt.tolist(), pos, has_gauss, cached],
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    """Restore ``rng_state()``'s output; also takes the tensors and arrays that checkpoints before JSON held."""
    decode = (lambda s: _unb64(s)) if isinstance(state["torch"], str) else (lambda s: s)
    torch.set_rng_state(decode(state["torch"]))
    version, key, gauss = state["python"]
    random.setstate((version, tuple(key), gauss))
    kind, mt, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(mt, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([decode(s) for s in state["cuda"]])


def trainer_file(path: Path, rank: int) -> Path:
    return path / f"trainer_rank{rank}.json"


def save(engine, run_dir: Path, step: int, meta: dict, trainer_state: dict, env: DistEnv, keep: int) -> Path:
    """Every rank calls. Returns the final checkpoint directory."""
    root = checkpoints_root(run_dir)
    name = f"step_{step:08d}"
    final, tmp = root / name, root / f".tmp-{name}"
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # debris of an earlier killed save
        tmp.mkdir(parents=True)
    barrier()
    engine.save(tmp)
    trainer_file(tmp, env.rank).write_text(json.dumps(trainer_state))
    barrier()
    if env.is_main:
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "world_size": env.world_size}, indent=2))
        publish_dir(tmp, final, replace=True)  # the same step saved again after a resume replaces it
        write_atomic(root / LATEST, name)
        for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def latest(run_dir: Path) -> Path | None:
    pointer = checkpoints_root(run_dir) / LATEST
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which is not a complete checkpoint; point it at an existing step_* directory")
    return path


def read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / "meta.json").read_text())
        missing = [k for k in ("model", "engine", "step", "world_size") if k not in meta]
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot read {path / 'meta.json'} ({e}); resume from another checkpoint of the run") from e
    if missing:
        raise CheckpointError(f"{path / 'meta.json'} lacks {', '.join(missing)}: it is damaged; resume from another checkpoint")
    return meta


def _get(config: dict, dotted: str):
    section, _, key = dotted.partition(".")
    return config.get(section, {}).get(key)


def check_compatible(meta: dict, path: Path, config: dict, world_size: int) -> None:
    """Refuse to resume ``path`` under settings its saved state does not fit, naming the flag that restores them.

    ``config`` is this run's ``Config.to_dict()``; checkpoints that predate meta.json's config are checked
    on model, engine and world size here, and on the data settings by the loader's own state."""
    saved = meta.get("config") or {"model": {"name": meta["model"]}, "engine": {"name": meta["engine"]}}
    if meta["model"] != _get(config, "model.name"):
        raise CheckpointError(
            f"checkpoint {path} holds model {meta['model']!r}, but this run builds {_get(config, 'model.name')!r}; "
            f"resume with --model {meta['model']}"
        )
    if meta["engine"] != _get(config, "engine.name"):
        raise CheckpointError(
            f"checkpoint {path} was written by engine {meta['engine']!r}, not {_get(config, 'engine.name')!r}; resume with "
            f"--engine {meta['engine']}, or export it (python tools/export.py {path.parent.parent} --hf DIR) and start a new "
            "run with --model.init_from=DIR"
        )
    for key in RESUME_KEYS:
        section, _, name = key.partition(".")
        if name in saved.get(section, {}) and saved[section][name] != _get(config, key):
            raise CheckpointError(
                f"checkpoint {path} was trained with {key}={saved[section][name]!r}, this run has {_get(config, key)!r}; "
                f"resume with --{key}={saved[section][name]} (the saved weights and data position depend on it)"
            )
    if meta["world_size"] != world_size:
        raise CheckpointError(
            f"checkpoint {path} was written by {meta['world_size']} ranks, this run has {world_size}; "
            f"resume with the same number of processes (the data order and optimizer shards depend on it)"
        )


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """Load from checkpoint ``path`` with weights-only unpickling; any failure becomes one CheckpointError."""
    try:
        with safeload.weights_only():
            yield
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        raise _refuse(path, f"pickled objects ({_first_line(e)})") from e
    except (Exception, CheckpointException) as e:  # DCP's is a BaseException
        raise CheckpointError(f"cannot load checkpoint {path}: {type(e).__name__}: {_first_line(e)}; it is damaged or "
                              "incomplete: resume from an earlier checkpoint (point checkpoints/latest at it)") from e


def _first_line(e: BaseException) -> str:
    """The first sentence of an exception's message: torch's run to paragraphs."""
    text = " ".join(str(e).split())
    return text.split(". ")[0][:200] or type(e).__name__


def _refuse(file: Path, what: str) -> CheckpointError:
    return CheckpointError(f"refusing to load {file}: it holds {what}, which no checkpoint of gpt2-scale holds (loading "
                           "it could run code); it was altered or written by something else: resume from another checkpoint")


def verify(path: Path) -> None:
    """Read every file of checkpoint ``path`` the safe way before an engine does: a truncated, damaged or
    planted file is reported by name, the same on every rank, before any rank enters a collective."""
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        try:
            if file.suffix == ".json":
                json.loads(file.read_text())
            elif file.suffix == ".pt":
                if unsafe := safeload.unsafe_globals(file):
                    raise _refuse(file, f"pickled globals {', '.join(unsafe)}")
                with safeload.weights_only():
                    torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            elif file.name == ".metadata":
                _verify_dcp(file.parent)
        except pickle.UnpicklingError as e:
            raise _refuse(file, f"pickled objects ({_first_line(e)})") from e
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{file} is damaged or truncated ({type(e).__name__}: {_first_line(e)}); resume from an "
                                  "earlier checkpoint (point checkpoints/latest at it)") from e


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
                                  "resume from an earlier checkpoint (point checkpoints/latest at it)")
    for index, info in metadata.storage_data.items():
        if isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            file = path / info.relative_path
            with open(file, "rb") as f:
                f.seek(info.offset)
                item = io.BytesIO(f.read(info.length))
            if unsafe := safeload.unsafe_globals(item):
                raise _refuse(file, f"pickled globals {', '.join(unsafe)} in item {index.fqn}")


def load(engine, path: Path, env: DistEnv) -> dict:
    """Restore engine state and this rank's trainer state from a checkpoint directory."""
    verify(path)
    state_file = trainer_file(path, env.rank)
    old_file = state_file.with_suffix(".pt")  # checkpoints written before the trainer state became JSON
    if not state_file.is_file() and not old_file.is_file():
        raise CheckpointError(f"{state_file} is missing: the checkpoint is incomplete; resume from an earlier one")
    with reading(path):
        engine.load(path)
        if state_file.is_file():
            return json.loads(state_file.read_text())
        return torch.load(old_file, weights_only=True)


def load_model(run_dir: str | Path, step: int | None = None):
    """The trained GPT of a run (full fp32 weights on CPU), from any engine's checkpoint, in one process."""
    from gpt2_scale.engines import weights_reader
    from gpt2_scale.model import GPT
    from gpt2_scale.zoo import ModelConfig

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no config.yaml); pass the --run-dir of a training run")
    path = checkpoints_root(run_dir) / f"step_{step:08d}" if step is not None else latest(run_dir)
    if path is None or not path.is_dir():
        raise CheckpointError(f"{run_dir} has no checkpoint{'' if step is None else f' for step {step}'}; train it first")
    meta = read_meta(path)
    model = GPT(ModelConfig.from_name(meta["model"], pad_vocab=meta.get("pad_vocab", True)))
    verify(path)
    with reading(path):
        state = weights_reader(meta["engine"])(path)
    load_weights(model, state, path)
    return model


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
