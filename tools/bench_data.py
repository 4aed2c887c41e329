"""`gpt2-bench-data` from a checkout: the tool is gpt2_scale/tools/bench_data.py (the package must be installed, e.g. pip install -e .)."""

import sys

from gpt2_scale.tools.bench_data import main

if __name__ == "__main__":
    sys.exit(main())
