"""The recipes' command line, built by tyro from the config's dataclass tree (gpt2_scale.config).

tyro (torchtitan's choice) reads each field's type, default and trailing comment, so ``--help`` lists every
field with its default and meaning, a ``Literal`` field accepts only its choices, an unknown flag is refused
with the nearest valid ones, and nothing here restates a field. What is ours: ``--config FILE.yaml`` read
before the flags (so they override it), booleans and nulls spelled as in YAML (``true``, ``false``, ``null``),
and the ``--local_rank`` that the deepspeed launcher appends, dropped (LOCAL_RANK comes from the environment).
"""

from __future__ import annotations

import copy

import tyro
from tyro.constructors import ConstructorRegistry, PrimitiveConstructorSpec, PrimitiveTypeInfo

from gpt2_scale.config import Config, ConfigError, apply_dict, load_yaml, validate

TRUE, FALSE, NULL = ("true", "yes", "on", "1"), ("false", "no", "off", "0"), ("null", "none", "~")

REGISTRY = ConstructorRegistry()


def _bool(text: str) -> bool:
    if text.lower() in TRUE + FALSE:
        return text.lower() in TRUE
    raise ValueError(f"expected true or false, got {text!r}")


def _null(text: str) -> None:
    if text.lower() not in NULL:
        raise ValueError(f"expected null, got {text!r}")


@REGISTRY.primitive_rule
def _yaml_bool(info: PrimitiveTypeInfo) -> PrimitiveConstructorSpec | None:
    if info.type is not bool:
        return None
    return PrimitiveConstructorSpec(nargs=1, metavar="{true,false}", instance_from_str=lambda args: _bool(args[0]),
                                    is_instance=lambda x: isinstance(x, bool), str_from_instance=lambda x: [str(x).lower()])


@REGISTRY.primitive_rule
def _yaml_null(info: PrimitiveTypeInfo) -> PrimitiveConstructorSpec | None:
    if info.type is not type(None):
        return None
    return PrimitiveConstructorSpec(nargs=1, metavar="{null}", instance_from_str=lambda args: _null(args[0]),
                                    is_instance=lambda x: x is None, str_from_instance=lambda x: ["null"])


def _take_launcher_and_config_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the --config files in order, the other arguments), without the launcher's --local_rank."""
    files, rest, i = [], [], 0
    while i < len(argv):
        key, eq, value = argv[i].partition("=")
        if key in ("--local_rank", "--local-rank", "--config"):
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{key} needs a value")
                value, i = argv[i + 1], i + 1
            if key == "--config":
                files.append(value)
        else:
            rest.append(argv[i])
        i += 1
    return files, rest


def parse_args(defaults: Config, argv: list[str], description: str | None = None) -> Config:
    """``defaults``, then each ``--config FILE.yaml``, then the flags; validated. ``--help`` prints every field
    with its default (``defaults``' value) and exits 0; a bad flag or value prints tyro's message and exits 2."""
    files, rest = _take_launcher_and_config_args(argv)
    cfg = copy.deepcopy(defaults)
    for path in files:
        apply_dict(cfg, load_yaml(path), path)
    intro = ("Settings are read in order: the recipe's defaults, each --config FILE.yaml (the sections and keys "
             "below, as YAML), then these flags.")
    cfg = tyro.cli(Config, args=rest, default=cfg, description=f"{description.strip()}\n\n{intro}" if description else intro,
                   config=(tyro.conf.FlagConversionOff,), registry=REGISTRY)
    validate(cfg)
    return cfg
