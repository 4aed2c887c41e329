"""Which torch device to run on: ``auto`` picks CUDA, then Apple MPS, then the CPU."""

from __future__ import annotations

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def default_device() -> str:
    """The best device here: ``cuda`` when a CUDA GPU is visible, else ``mps`` (Apple silicon), else ``cpu``."""
    if torch.cuda.is_available():
        return "cuda"
    if _mps_available():
        return "mps"
    return "cpu"


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> ``default_device()``; a named device is checked to exist (ValueError if it does not)."""
    if name == "auto":
        return torch.device(default_device())
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r}; choose one of {', '.join(DEVICE_CHOICES)}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available here; use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
    if device.type == "mps" and not _mps_available():
        raise ValueError(f"device {name!r} was asked for but MPS is not available here; use --device cpu or auto")
    return device
