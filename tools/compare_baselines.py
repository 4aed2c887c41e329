"""`gpt2-compare-baselines` from a checkout: the tool is
gpt2_scale/tools/compare_baselines.py (the package must be installed, e.g. pip install -e .)."""

import sys

from gpt2_scale.tools.compare_baselines import main

if __name__ == "__main__":
    sys.exit(main())
