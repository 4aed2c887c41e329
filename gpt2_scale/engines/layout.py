"""The checkpoint layout every engine writes and reads, so a run continues under any engine at any world size.

One DCP checkpoint (``torch.distributed.checkpoint``), keyed by the plain model's names::

    model.<name>                        fp32 weights, every state-dict name (lm_head.weight repeats wte's values)
    optimizer.state.<name>.exp_avg      Adam's first moment, by the parameter's first name
    optimizer.state.<name>.exp_avg_sq   Adam's second moment
    optimizer.state.<name>.step         steps Adam has taken (0-dim fp32)

These are the keys DCP's own ``get_state_dict`` gives a plain GPT and torch AdamW (optimizer state flattened), so
DDP and FSDP2 read and write it through that API and DCP reshards on load; ZeRO gathers and scatters each
parameter through DeepSpeed's ``safe_get_full_*``/``safe_set_full_*``. Hyperparameters are not stored: lr, betas,
eps and weight decay come from the resuming run's config (the lr from the schedule at its step). Every entry
is a tensor, so loading unpickles nothing.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions

from gpt2_scale.safeload import SafeDCPReader

FLAT = StateDictOptions(flatten_optimizer_state_dict=True)  # DCP's names for the optimizer's state: state.<name>.<key>
MOMENTS = ("exp_avg", "exp_avg_sq")  # Adam's per-parameter state besides its step


def is_elastic(path: Path) -> bool:
    """Whether checkpoint ``path`` has this layout (engines before it wrote their own formats: engines/legacy.py)."""
    return (Path(path) / ".metadata").is_file()


def model_key(name: str) -> str:
    return f"model.{name}"


def adam_key(name: str, what: str) -> str:
    return f"optimizer.state.{name}.{what}"


def adam_only(flat_optimizer_state: dict) -> dict:
    """The per-parameter Adam state of a flattened optimizer state dict, without its hyperparameters."""
    return {k: v for k, v in flat_optimizer_state.items() if k.startswith("state.")}


def reader(path: Path) -> SafeDCPReader:
    return SafeDCPReader(str(path))


def read_full_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model half of a checkpoint, in one process; shapes come from the checkpoint's own metadata."""
    metadata = reader(path).read_metadata().state_dict_metadata
    model = {
        key.removeprefix("model."): torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.items()
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)
    }
    with warnings.catch_warnings():  # one process is the intent here, not a mistake
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": model}, storage_reader=reader(path), no_dist=True)
    return model
