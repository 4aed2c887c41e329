"""`gpt2-bench-resume` from a checkout: the tool is gpt2_scale/tools/bench_resume.py (the package must be installed, e.g. pip install -e .)."""

import sys

from gpt2_scale.tools.bench_resume import main

if __name__ == "__main__":
    sys.exit(main())
