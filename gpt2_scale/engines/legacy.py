"""Checkpoints written before the engines shared one layout (engines/layout.py): DDP's ``model_optim.pt`` and
DeepSpeed's own ZeRO files under ``engine/`` (FSDP2's were DCP already, and are the common layout). They
resume under the engine and world size that wrote them (``checkpoint.check_compatible`` says so), and their
weights export from any of them. Delete this module when such checkpoints no longer matter."""

from __future__ import annotations

from pathlib import Path

import torch

DDP_FILE = "model_optim.pt"
ZERO_TAG = "engine"  # the sub-directory DeepSpeed's save_checkpoint wrote


def holds(path: Path) -> bool:
    """Whether checkpoint ``path`` has this layout's files."""
    return (path / DDP_FILE).is_file() or (path / ZERO_TAG).is_dir()


def load(engine, path: Path) -> None:
    """Restore a legacy checkpoint into the engine that wrote it (every rank calls)."""
    if (path / DDP_FILE).is_file():
        state = torch.load(path / DDP_FILE, map_location=engine.env.device, weights_only=True)
        engine.module.load_state_dict(state["model"])
        engine.optimizer.load_state_dict(state["optimizer"])
        return
    load_path, _ = engine.model.load_checkpoint(str(path), tag=ZERO_TAG)
    if load_path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint under {path / ZERO_TAG}")


def read_full_weights(path: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights in one process: DDP's file, or ZeRO's shards consolidated by DeepSpeed's own utility."""
    if (path / DDP_FILE).is_file():
        return torch.load(path / DDP_FILE, map_location="cpu", weights_only=True)["model"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(path), tag=ZERO_TAG)
