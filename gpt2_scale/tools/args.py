"""argparse types the tools share: a bad value exits 2 with argparse's one line naming the flag and the rule."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from gpt2_scale.config import ENGINES, SEED_LIMIT, ConfigError


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def random_seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32), got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite float > 0 (nan and inf refused: a nan tolerance would pass every comparison)."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def gib(text: str) -> int:
    """A size in GiB (a float, >= 0; nan and inf refused), as bytes."""
    value = float(text)
    if not 0 <= value * 2**30 < float("inf"):  # 1e300 GiB is no more a byte count than inf is
        raise argparse.ArgumentTypeError(f"must be a size in GiB >= 0, got {text}")
    return int(value * 2**30)


def model_name(text: str) -> str:
    """A zoo name (the error lists the valid ones)."""
    from gpt2_scale.zoo import ModelConfig

    try:
        ModelConfig.from_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def engine_list(text: str) -> list[str]:
    """Comma-separated engine names, at least one."""
    engines = [e.strip() for e in text.split(",") if e.strip()]
    bad = [e for e in engines if e not in ENGINES]
    if bad or not engines:
        raise argparse.ArgumentTypeError(f"unknown {', '.join(bad) or '(none given)'}; valid: {','.join(ENGINES)}")
    return engines


def check_replaceable(path: str | Path, ours: Callable[[Path], bool], what: str, flag: str) -> None:
    """An output ``path`` that exists may be replaced only when it is an earlier output of the same kind (``ours``):
    a tool rerun with the same flag updates its file, but never writes over a run's metrics.jsonl, a config, or a
    document that happens to have the name."""
    path = Path(path)
    try:
        if not path.exists() or (path.is_file() and ours(path)):
            return
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot read it ({e.strerror}) to see whether it is {what}; name another file") from None
    raise ConfigError(f"{flag} {path} exists and is not {what}, which is all this replaces; name another file, or move it away first")


def starts_with(prefix: bytes) -> Callable[[Path], bool]:
    """Whether a file begins with ``prefix`` (for check_replaceable)."""
    def check(path: Path) -> bool:
        with open(path, "rb") as f:
            return f.read(len(prefix)) == prefix
    return check
