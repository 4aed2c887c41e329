"""Atomic checkpoints around each engine's own format, exact resume, and full weights from any engine.

Layout of ``RUN_DIR/checkpoints/``::

    step_00000100/          one complete checkpoint
        meta.json           step, engine, model, world size
        <engine files>      model + optimizer, written by the strategy (torch.save, DCP or DeepSpeed)
        trainer_rank{r}.pt  per rank: data-loader position, RNG states
    latest                  name of the newest complete checkpoint, replaced last

A checkpoint is written under a temporary name and renamed only when every rank has finished, and
``latest`` moves after that, so a process killed at any moment leaves the previous one loadable.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from gpt2_scale.distributed import DistEnv, barrier

LATEST = "latest"


class CheckpointError(RuntimeError):
    pass


def checkpoints_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(strategy, run_dir: Path, step: int, meta: dict, trainer_state: dict, env: DistEnv, keep: int) -> Path:
    """Every rank calls. Returns the final checkpoint directory."""
    root = checkpoints_root(run_dir)
    name = f"step_{step:08d}"
    final, tmp = root / name, root / f".tmp-{name}"
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # debris of an earlier killed save
        tmp.mkdir(parents=True)
    barrier()
    strategy.save(tmp)
    torch.save(trainer_state, tmp / f"trainer_rank{env.rank}.pt")
    barrier()
    if env.is_main:
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "world_size": env.world_size}, indent=2))
        if final.exists():  # the same step saved again after a resume: replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _write_text_atomic(root / LATEST, name)
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
        return json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path / 'meta.json'}: {e}") from e


def check_compatible(meta: dict, path: Path, model_name: str, engine: str, world_size: int) -> None:
    if meta["model"] != model_name:
        raise CheckpointError(
            f"checkpoint {path} holds model {meta['model']!r}, but this run builds {model_name!r}; resume with --model {meta['model']}"
        )
    if meta["engine"] != engine:
        raise CheckpointError(
            f"checkpoint {path} was written by engine {meta['engine']!r}, not {engine!r}; resume with --engine {meta['engine']}, "
            f"or export it (python tools/export.py {path.parent.parent} --hf DIR) and start a new run with --model.init_from=DIR"
        )
    if meta["world_size"] != world_size:
        raise CheckpointError(
            f"checkpoint {path} was written by {meta['world_size']} ranks, this run has {world_size}; "
            f"resume with the same number of processes (the data order and optimizer shards depend on it)"
        )


def load(strategy, path: Path, env: DistEnv) -> dict:
    """Restore engine state and this rank's trainer state from a checkpoint directory."""
    strategy.load(path)
    state_file = path / f"trainer_rank{env.rank}.pt"
    if not state_file.is_file():
        raise CheckpointError(f"{state_file} is missing: the checkpoint is incomplete")
    return torch.load(state_file, weights_only=False)


def load_model(run_dir: str | Path, step: int | None = None):
    """The trained GPT of a run (full fp32 weights on CPU), from any engine's checkpoint, in one process."""
    from gpt2_scale.config import config_from_yaml_file
    from gpt2_scale.model import GPT
    from gpt2_scale.strategies import weights_reader
    from gpt2_scale.zoo import ModelConfig

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml); pass the --run-dir of a training run")
    path = checkpoints_root(run_dir) / f"step_{step:08d}" if step is not None else latest(run_dir)
    if path is None or not path.is_dir():
        raise FileNotFoundError(f"{run_dir} has no checkpoint{'' if step is None else f' for step {step}'}; train it first")
    cfg = config_from_yaml_file(run_dir / "config.yaml")
    meta = read_meta(path)
    model = GPT(ModelConfig.from_name(cfg.model.name, pad_vocab=cfg.model.pad_vocab))
    state = weights_reader(meta["engine"])(path)
    load_weights(model, state, path)
    return model


def load_weights(model, state: dict[str, torch.Tensor], source) -> None:
    """Load full weights, accepting a state dict that lists the tied lm_head.weight or not."""
    state = dict(state)
    state.setdefault("lm_head.weight", state.get("transformer.wte.weight"))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{source} does not match model {model.config.name}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatches (checkpoint vs model) {wrong[:5]}"
        )
    model.load_state_dict(state)
