"""Full weights of a training run, from any engine's checkpoint, in Hugging Face GPT-2 layout.

    python tools/export.py runs/gpt2-124m-zero3 --hf exports/gpt2-124m [--step N] [--overwrite]

ZeRO shards are consolidated by DeepSpeed's own fp32 utility, FSDP's DCP checkpoint is read in one
process; the result loads with ``transformers.GPT2LMHeadModel.from_pretrained(OUT)`` and with
``python -m gpt2_scale.sample --hf OUT``. config.json records the run and step it came from (key ``gpt2_scale``).
"""

import argparse
import sys
from pathlib import Path

from gpt2_scale.errors import quiet_when_the_reader_left


@quiet_when_the_reader_left
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a training run directory (holds config.yaml and checkpoints/)")
    parser.add_argument("--hf", required=True, metavar="OUT", help="directory to write config.json + model.safetensors")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace OUT even if it holds something else (an earlier export of the same run is always replaced)",
    )  # fmt: skip
    args = parser.parse_args(argv)

    from gpt2_scale import checkpoint
    from gpt2_scale.errors import UserError, report
    from gpt2_scale.hf import check_export_target, export_hf

    path = None
    try:
        path = checkpoint.find(args.run_dir, args.step)
        meta = checkpoint.read_meta(path)
        source = {"run": str(Path(args.run_dir).resolve()), "step": meta["step"]}  # kept in config.json
        check_export_target(args.hf, args.overwrite, how="--overwrite", run=source["run"])  # before loading, which takes minutes
        model = checkpoint.model_at(path, meta)
        out = export_hf(model, args.hf, overwrite=args.overwrite, source=source)
    except checkpoint.CheckpointError as e:  # a damaged checkpoint: the way on is another step, not a resume
        if checkpoint.EARLIER in str(e):
            steps = ", ".join(str(int(p.name.removeprefix("step_"))) for p in checkpoint.complete_steps(Path(args.run_dir)) if p != path)
            e = checkpoint.CheckpointError(str(e).replace(checkpoint.EARLIER, f"export another step with --step N (complete: {steps or 'none'})"))
        return report(e)
    except (UserError, ValueError, OSError) as e:  # OSError: no such run, a full disk
        return report(e)
    print(f"exported {model.config.name} ({model.num_params():,} parameters) from {path} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
