"""HellaSwag accuracy of a trained run or a pretrained GPT-2.

    python tools/eval_hellaswag.py --ckpt RUN_DIR [--limit N] [--data PATH] [--device cuda]
    python tools/eval_hellaswag.py --pretrained gpt2 --data hellaswag_val.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from gpt2_scale import checkpoint, tokenizer
from gpt2_scale.device import default_device, resolve_device
from gpt2_scale.errors import UserError, quiet_when_the_reader_left, report
from gpt2_scale.eval import hellaswag
from gpt2_scale.model import GPT
from gpt2_scale.tools.args import positive


def load_model(ckpt: str | None, pretrained: str | None) -> torch.nn.Module:
    """The model of a run directory (any engine's checkpoint) or of a Hugging Face checkpoint, which must read the
    GPT-2 tokenizer's ids: HellaSwag's text is encoded with it."""
    model = checkpoint.load_model(ckpt) if ckpt is not None else GPT.from_pretrained(pretrained)
    if (vocab := model.config.vocab_size) != tokenizer.VOCAB_SIZE:
        raise UserError(f"{ckpt or pretrained}: the model's vocabulary ({vocab} tokens) is not the GPT-2 tokenizer's "
                        f"({tokenizer.VOCAB_SIZE}), which HellaSwag is encoded with; evaluate a GPT-2 model")
    return model


@quiet_when_the_reader_left
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", metavar="RUN_DIR", help="a run directory written by the trainer")
    source.add_argument("--pretrained", metavar="HF_DIR_OR_NAME", help="a Hugging Face GPT-2 directory or hub name")
    parser.add_argument("--data", metavar="PATH", help="hellaswag_val.jsonl (default: download it into the cache)")
    parser.add_argument("--limit", type=positive, help="evaluate only the first N examples")
    parser.add_argument("--device", default=default_device(), help="default: cuda, then mps, then cpu")
    parser.add_argument("--batch-examples", type=positive, default=4, help="examples (4 candidates each) per forward pass")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
        examples = hellaswag.load_examples(args.data, limit=args.limit)  # before the model: fails fast
        model = load_model(args.ckpt, args.pretrained).to(device)
        result = hellaswag.evaluate(model, examples, device, batch_examples=args.batch_examples, progress=True)
    except (UserError, checkpoint.CheckpointError, OSError, ValueError) as e:  # ValueError: an unknown device
        return report(e)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"HellaSwag: {result['n']} examples  acc {result['acc']:.4f}  acc_norm {result['acc_norm']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
