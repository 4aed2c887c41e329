"""Sample text from a model: ``python -m gpt2_scale.sample``.

    python -m gpt2_scale.sample --model gpt2-124m --init random --prompt "Hello" --max-new-tokens 20
    python -m gpt2_scale.sample --model gpt2 --init pretrained --prompt "Hello"   # downloads from the hub
    python -m gpt2_scale.sample --hf ./gpt2-local --prompt "Hello"                # a Hugging Face directory
    python -m gpt2_scale.sample --ckpt runs/my-run --prompt "Hello"               # one of our training runs

Samples go to stdout (prompt included), separated by a line of dashes; what was loaded goes to stderr.
Bad input (an unknown model, a missing directory, an unusable checkpoint) prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from gpt2_scale import checkpoint, tokenizer
from gpt2_scale.device import DEVICE_CHOICES, resolve
from gpt2_scale.errors import TrainingError, UserError, quiet_when_the_reader_left, report
from gpt2_scale.generate import generate
from gpt2_scale.memory import is_out_of_memory
from gpt2_scale.model import GPT
from gpt2_scale.tools.args import random_seed
from gpt2_scale.zoo import ModelConfig

SEPARATOR = "-" * 60


class UsageError(UserError):
    """Bad input from the command line: reported in one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    name = Path(sys.argv[0]).name  # how it was run: gpt2-sample, or python -m gpt2_scale.sample (sample.py)
    prog = "python -m gpt2_scale.sample" if name in ("sample.py", "__main__.py", "-c", "") else name
    p = argparse.ArgumentParser(prog=prog, description="Sample text from a GPT model.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="NAME", help="a zoo model name (gpt2-124m, gpt2-tiny, gpt2, ...)")
    src.add_argument("--hf", metavar="DIR", help="a local directory with a Hugging Face GPT-2 checkpoint")
    src.add_argument("--ckpt", metavar="RUN_DIR", help="the run directory of one of our training runs")
    p.add_argument(
        "--init",
        choices=("random", "pretrained"),
        default=None,
        help="with --model: random weights (default) or the pretrained checkpoint of that name from the hub",
    )
    p.add_argument("--prompt", default="", help="text to continue (default: start from <|endoftext|>)")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens; 0 = all")
    p.add_argument("--seed", type=random_seed, default=None, help="seed for random init and sampling, in [0, 2**32)")
    p.add_argument("--device", default="auto", help=f"{' | '.join(DEVICE_CHOICES)} (auto: cuda, then mps, then cpu)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context every step (slow)")
    return p


def load_model(args: argparse.Namespace) -> tuple[GPT, str]:
    """The model the arguments name, and a line describing it."""
    from gpt2_scale.hf import HFCheckpointError

    if args.hf is not None:
        path = _directory("--hf", args.hf)
        try:
            model = GPT.from_pretrained(str(path))
        except HFCheckpointError as e:
            raise UsageError(f"--hf {args.hf}: {e}") from e
        return model, f"{model.config.name} from {path}"
    if args.ckpt is not None:
        return _load_run(args.ckpt)
    try:
        config = ModelConfig.from_name(args.model)
    except ValueError as e:
        raise UsageError(str(e)) from e
    if args.init == "pretrained":
        try:
            model = GPT.from_pretrained(args.model)
        except HFCheckpointError as e:
            raise UsageError(str(e)) from e
        return model, f"{model.config.name} (pretrained)"
    return GPT(config), f"{config.name} (random init)"


def _directory(flag: str, value: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_dir():
        raise UsageError(f"{flag} {value}: {'not a directory' if path.exists() else 'no such directory'}")
    return path


def _load_run(run_dir: str) -> tuple[GPT, str]:
    path = _directory("--ckpt", run_dir)
    try:
        model = checkpoint.load_model(str(path))
    except (UserError, OSError, ValueError, checkpoint.CheckpointError) as e:
        raise UsageError(f"--ckpt {run_dir}: {e}") from e
    return model, f"{model.config.name} from {path}"


def _validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.init is not None and args.model is None:
        parser.error("--init goes with --model only")
    if args.init is None:
        args.init = "random"
    for name in ("num_samples", "max_new_tokens"):
        if getattr(args, name) < (1 if name == "num_samples" else 0):
            parser.error(f"--{name.replace('_', '-')} must be >= {1 if name == 'num_samples' else 0}")
    if not 0 <= args.temperature < math.inf:  # nan too
        parser.error(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.top_k < 0:
        parser.error("--top-k must be >= 0")


@quiet_when_the_reader_left
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _validate(args, parser)
    try:
        runtime = resolve("sample", args.device)  # fp32 on every device, never compiled
        device = runtime.device
        if args.seed is not None:
            torch.manual_seed(args.seed)  # the random init too
        model, description = load_model(args)
        ids = tokenizer.encode(args.prompt) if args.prompt else [tokenizer.EOT]
        vocab = model.config.vocab_size
        if vocab > tokenizer.VOCAB_SIZE or max(ids) >= vocab:
            raise UsageError(
                f"the model's vocabulary ({vocab} tokens) does not fit the GPT-2 tokenizer ({tokenizer.VOCAB_SIZE})"
            )
    except (UserError, ValueError) as e:  # ValueError: an unknown device or model name
        return report(e)

    model.to(device)
    n_params = model.num_params() / 1e6
    print(f"# {description}, {n_params:.1f}M parameters, on {device}", file=sys.stderr)
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)
    try:
        idx = torch.tensor([ids] * args.num_samples, dtype=torch.long, device=device)
        with runtime.autocast():
            out = generate(
                model,
                idx,
                args.max_new_tokens,
                temperature=args.temperature,
                top_k=args.top_k or None,
                generator=generator,
                use_cache=not args.no_cache,
            )
    except RuntimeError as e:
        if not is_out_of_memory(e):
            raise
        return report(TrainingError(f"out of memory on {device} generating {args.num_samples} sample(s) of up to "
                                    f"{len(ids) + args.max_new_tokens} tokens; lower --num-samples or --max-new-tokens"))
    for i, row in enumerate(out.tolist()):
        if i:
            print(SEPARATOR)
        text = tokenizer.decode(row if args.prompt else row[1:])  # drop the <|endoftext|> we started from
        print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
