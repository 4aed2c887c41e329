"""Where and how a process computes: the one place where "auto" (device, dtype, compile) becomes a concrete choice.

``resolve(purpose, ...)`` decides all three for training (the trainer, every engine and the bench), evaluation
(HellaSwag) and sampling. The purposes differ, and only here:

    "auto"    train                       evaluate                    sample
    device    cuda, else cpu              cuda, else mps, else cpu    cuda, else mps, else cpu
    dtype     bf16 autocast on CUDA,      bf16 autocast on CUDA,      fp32 on every device
              fp32 elsewhere              fp32 elsewhere
    compile   on CUDA (``compile_scope``;  never                       never
              ZeRO-3: the loss only)
    TF32      on for CUDA (enable_tf32)   not set (PyTorch's default) not set (PyTorch's default)

Training never picks Apple's MPS: its process groups are NCCL (CUDA) or gloo (CPU), and neither runs on MPS.
The validation loss and the samples printed during training run under the engine's settings (``Engine.autocast``);
HellaSwag, during training or not, under "evaluate" (TF32 is process-wide: inside a training run it is on).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from gpt2_scale.config import EngineSection

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
Purpose = Literal["train", "evaluate", "sample"]
CompileScope = Literal["block", "model", "loss"]


@dataclass(frozen=True)
class Runtime:
    """The concrete choices for one process."""

    device: torch.device
    dtype: torch.dtype  # what forward computes in: torch.bfloat16 (autocast, or the engine's own cast) or torch.float32
    compile: CompileScope | None  # what torch.compile covers; None = eager

    @property
    def bf16(self) -> bool:
        return self.dtype == torch.bfloat16

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast when the dtype is bf16, else nothing."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)


def resolve(purpose: Purpose, device: str | torch.device = "auto", engine: EngineSection | None = None) -> Runtime:
    """Every "auto" made concrete for ``purpose`` (the table above).

    ``device`` is a name to resolve ("auto", "cpu", "cuda:1" ...) or a device already chosen (a training rank's
    GPU, which ``distributed.init`` picks). ``engine`` holds training's dtype and compile settings (the defaults when
    None); evaluation and sampling take none."""
    device = device if isinstance(device, torch.device) else resolve_device(device, purpose)
    if purpose != "train":
        return Runtime(device, torch.bfloat16 if purpose == "evaluate" and device.type == "cuda" else torch.float32, None)
    if engine is None:
        from gpt2_scale.config import EngineSection

        engine = EngineSection()
    check_attention(engine, device)
    check_offload(engine, device)
    bf16 = engine.dtype == "bf16" or (engine.dtype == "auto" and device.type == "cuda")
    return Runtime(device, torch.bfloat16 if bf16 else torch.float32, compile_scope(engine, device))


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def default_device(purpose: Purpose = "sample") -> str:
    """The best device here: ``cuda`` when a CUDA GPU is visible, else ``mps`` (Apple silicon; not for training),
    else ``cpu``."""
    if torch.cuda.is_available():
        return "cuda"
    if purpose != "train" and _mps_available():
        return "mps"
    return "cpu"


def resolve_device(name: str = "auto", purpose: Purpose = "sample") -> torch.device:
    """``auto`` -> ``default_device(purpose)``; a named device is checked to exist (ValueError if it does not)."""
    if name == "auto":
        return torch.device(default_device(purpose))
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r}; choose one of {', '.join(DEVICE_CHOICES)}") from e
    if device.type not in DEVICE_CHOICES:  # torch names more (meta, xpu ...), which nothing here runs on
        raise ValueError(f"device {name!r} is not one this package runs on; choose one of {', '.join(DEVICE_CHOICES)}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available here; use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
    if device.type == "mps" and not _mps_available():
        raise ValueError(f"device {name!r} was asked for but MPS is not available here; use --device cpu or auto")
    return device


def compile_scope(engine: EngineSection, device: torch.device) -> CompileScope | None:
    """What torch.compile covers for a training run: "block", "model", "loss", or None (eager).

    By default (engine.compile unset) compile is on for CUDA. ZeRO-3 then compiles the loss only: its compiled
    blocks train right (tests/test_cuda.py::test_zero3_compiled_trains_as_eager, an H200) but are slower than eager
    blocks, since DeepSpeed's parameter hooks run around each one and recompile past dynamo's limit. The loss is two
    functions of tensors, no module and no hook, and eager its softmax over B·T·V logits costs twice the compiled
    one. GPT-2 124M on an H100 (2026-11-27, docs/benchmarks.md): ZeRO-3's step took 1.61x DDP's eager, 1.71x with
    compiled blocks, 1.27x with the loss compiled."""
    on = engine.compile if engine.compile is not None else device.type == "cuda"
    if not on:
        return None
    return "loss" if engine.compile is None and engine.name == "zero3" else engine.compile_scope


def check_attention(engine: EngineSection, device: torch.device) -> None:
    """Refuse an attention kernel this device does not have (PyTorch's CPU has FlashAttention's algorithm and the
    math one), before a run starts rather than at its first step."""
    if engine.attention in ("cudnn", "efficient") and device.type != "cuda":
        from gpt2_scale.config import ConfigError

        raise ConfigError(f"engine.attention={engine.attention} needs a CUDA GPU; on {device.type} use auto, flash or math")


def check_offload(engine: EngineSection, device: torch.device) -> None:
    """FSDP2's CPU offload pins host memory for copies to a GPU, which a CPU run has not got (PyTorch fails in
    ``fully_shard`` with "Cannot access accelerator device"); ZeRO-Offload runs on CPU too."""
    if engine.offload and engine.name == "fsdp" and device.type != "cuda":
        from gpt2_scale.config import ConfigError

        raise ConfigError(f"engine.offload with fsdp moves state between a GPU and the host; on {device.type} it is already "
                          "in host memory: drop --engine.offload (or use a zero engine, whose offload also runs on CPU)")


def compile_options(engine: EngineSection) -> dict:
    """Keyword arguments for torch.compile / nn.Module.compile: the mode, when one is set."""
    return {"mode": engine.compile_mode} if engine.compile_mode else {}


def enable_tf32(device: torch.device) -> None:
    """TF32 for fp32 matmuls and cuDNN convolutions on CUDA (the walk-through's setting; fp32 inputs, 10-bit mantissa
    products, several times fp32's rate on Ampere and later). Process-wide; the trainer and the bench call it."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
