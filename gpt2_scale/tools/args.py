"""argparse types the tools share: a bad value exits 2 with argparse's one line naming the flag and the rule."""

from __future__ import annotations

import argparse

from gpt2_scale.config import ENGINES, SEED_LIMIT


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
