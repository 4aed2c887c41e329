"""Full weights of a training run, from any engine's checkpoint, in Hugging Face GPT-2 layout.

    python tools/export.py runs/gpt2-124m-zero3 --hf exports/gpt2-124m [--step N] [--overwrite]

ZeRO shards are consolidated by DeepSpeed's own fp32 utility, FSDP's DCP checkpoint is read in one
process; the result loads with ``transformers.GPT2LMHeadModel.from_pretrained(OUT)`` and with
``python -m gpt2_scale.sample --hf OUT``.
"""

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a training run directory (holds config.yaml and checkpoints/)")
    parser.add_argument("--hf", required=True, metavar="OUT", help="directory to write config.json + model.safetensors")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace OUT even if it holds something else (an earlier export is always replaced)",
    )  # fmt: skip
    args = parser.parse_args(argv)

    from gpt2_scale import checkpoint
    from gpt2_scale.errors import UserError, report
    from gpt2_scale.hf import check_export_target, export_hf

    try:
        check_export_target(args.hf, args.overwrite, how="--overwrite")  # before the minutes a large model takes
        model = checkpoint.load_model(args.run_dir, args.step)
        out = export_hf(model, args.hf, overwrite=args.overwrite)
    except (UserError, checkpoint.CheckpointError, ValueError, OSError) as e:  # OSError: no such run, a full disk
        return report(e)
    print(f"exported {model.config.name} ({model.num_params():,} parameters) from {args.run_dir} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
