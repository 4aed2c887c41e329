"""Loading a checkpoint never runs code from it.

A pickle can call any function while it is read, so a file planted in a run directory would run
when the run resumes. Our own state is JSON, and every pickle the engines read goes through an
allow-list of the classes their files really contain:

- ``torch.load`` calls (ours, DeepSpeed's, DCP's for non-tensor items) are forced to PyTorch's
  weights-only unpickler inside ``weights_only()`` (``TORCH_FORCE_WEIGHTS_ONLY_LOAD``, which also
  overrides a library's own ``weights_only=False``), with DeepSpeed's few plain classes allowed;
- DCP's ``.metadata``, a raw pickle that DCP reads with ``pickle.load``, is read by ``SafeDCPReader``
  through a restricted unpickler instead.

A refused file raises ``pickle.UnpicklingError`` naming the global it asked for.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import sys
from collections.abc import Iterator

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

# What DeepSpeed's ZeRO checkpoints pickle besides tensors and builtins (found with
# torch.serialization.get_unsafe_globals_in_checkpoint on checkpoints of every stage); all plain data.
DEEPSPEED_GLOBALS = (
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
)
# Our trainer state before it became JSON held numpy's RNG state as an array.
NUMPY_GLOBALS = ("numpy.dtype", "numpy.ndarray", "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct")


def _resolve(dotted: str):
    module, _, name = dotted.rpartition(".")
    try:
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed logs to stdout from its import on: keep a tool's output clean
            return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None  # not installed (e.g. no DeepSpeed) or another numpy layout: nothing to allow


def unsafe_globals(path) -> list[str]:
    """The globals a torch.save file asks for beyond tensors, builtins and our allow-list (empty when safe)."""
    allowed = set(DEEPSPEED_GLOBALS + NUMPY_GLOBALS) | {"numpy.dtypes.UInt32DType"}
    return [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in allowed]


def allowed_globals() -> list:
    import numpy as np

    found = [obj for obj in map(_resolve, DEEPSPEED_GLOBALS + NUMPY_GLOBALS) if obj is not None]
    return found + [type(np.dtype(np.uint32))]  # numpy's per-dtype class (numpy.dtypes.UInt32DType)


@contextlib.contextmanager
def weights_only() -> Iterator[None]:
    """Every ``torch.load`` inside is weights-only, whatever its caller asked for."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's metadata classes, torch sizes, dtypes and layouts, paths: nothing that can run code."""

    def find_class(self, module: str, name: str):
        allowed = (
            module == "torch.distributed.checkpoint.metadata"
            or (module, name) in {
                ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                ("torch", "Size"),
                ("torch.serialization", "_get_layout"),
                ("collections", "OrderedDict"),
                ("pathlib", "PosixPath"),
                ("pathlib", "WindowsPath"),
                ("pathlib", "PurePosixPath"),
            }
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        )  # fmt: skip
        if not allowed:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a checkpoint")
        obj = super().find_class(module, name)
        if module == "torch.distributed.checkpoint.metadata" and not isinstance(obj, type):
            raise pickle.UnpicklingError(f"global {module}.{name} is not a class")
        return obj


class SafeDCPReader(FileSystemReader):
    """DCP's file reader with its metadata read through the restricted unpickler."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"{path} does not hold DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
