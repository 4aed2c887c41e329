"""Compare runs with the OpenAI GPT-2 checkpoint and the GPT-3 model of the same size.

    python tools/compare_baselines.py RUN_DIR [RUN_DIR ...] [--json] [--plot out.png]
    python tools/compare_baselines.py --list     # every published number and its source
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from gpt2_scale import baselines
from gpt2_scale.errors import EXIT_USAGE, UserError, quiet_when_the_reader_left, report
from gpt2_scale.tools.args import check_replaceable


def load_runs(paths: list[str]) -> list[baselines.Run]:
    """The runs; the metrics lines they skipped are printed as warnings (without a traceback), also those
    read before a run that fails, since they often say why it failed."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return [baselines.load_run(path) for path in paths]
        finally:
            for warning in caught:
                print(f"warning: {warning.message}", file=sys.stderr)


@quiet_when_the_reader_left
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run directories written by the trainer")
    parser.add_argument("--json", action="store_true", help="print the comparison as JSON")
    parser.add_argument("--plot", metavar="OUT.png", help="write the loss and HellaSwag curves of all runs")
    parser.add_argument("--list", action="store_true", help="print the baselines with their sources and exit")
    args = parser.parse_args(argv)
    if args.list:
        print(baselines.format_baselines())
        return 0
    if not args.runs:
        parser.print_usage(sys.stderr)
        print("error: give at least one RUN_DIR (or --list)", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.plot:  # a plot replaces only an earlier plot: matplotlib names itself in each of PLOT_FORMATS
            baselines.plot_format(args.plot)
            check_replaceable(args.plot, lambda path: b"atplotlib" in path.read_bytes(), "an earlier plot", "--plot")
        runs = load_runs(args.runs)
        if args.plot:
            baselines.plot(runs, args.plot)
    except (UserError, OSError) as e:
        return report(e)
    results = [baselines.compare(run) for run in runs]
    print(json.dumps(results, indent=2) if args.json else baselines.format_comparison(results))
    if args.plot:
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
